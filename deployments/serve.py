"""Serve the scheduled catalog refreshes without a work pool: ``python deployments/serve.py``.

The deployments (names, schedules, parameters, tags, concurrency limits) are read from
``deployments/prefect.yaml``, so they are defined in one place; only the work pool and the
build/pull steps, which a served deployment does not use, are left out. Runs execute as
subprocesses of this process, in the repository root, so the relative paths of the parameters
mean the same as for a worker. It needs a running Prefect server (``prefect server start`` and
``PREFECT_API_URL``): schedules do not fire on Prefect's embedded server. Stop it with Ctrl-C
(its schedules are paused until it serves again).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"

# Keys of a prefect.yaml deployment that `Flow.to_deployment` takes under the same name.
SERVED_KEYS = ("description", "tags", "version", "parameters", "paused", "enforce_parameter_schema")
# Keys that only matter to `prefect deploy` and workers.
WORKER_ONLY_KEYS = ("work_pool", "build", "push", "pull")


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` section of prefect.yaml."""
    return yaml.safe_load(path.read_text())["deployments"]


def to_schedule(item: dict[str, Any]) -> Any:
    """A `prefect.schedules.Schedule` from one prefect.yaml ``schedules`` entry."""
    from prefect.schedules import Schedule

    kwargs = dict(item)
    if isinstance(kwargs.get("interval"), int | float):
        kwargs["interval"] = timedelta(seconds=kwargs["interval"])
    if isinstance(kwargs.get("anchor_date"), str):
        kwargs["anchor_date"] = datetime.fromisoformat(kwargs["anchor_date"])
    try:
        return Schedule(**kwargs)
    except TypeError as exc:  # a key Prefect's Schedule does not know: say so, do not drop it
        raise ValueError(f"schedule {item!r} cannot be served: {exc}") from exc


def to_concurrency_limit(value: Any) -> Any:
    """``concurrency_limit`` as `Flow.to_deployment` takes it (an int, or limit and strategy)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if isinstance(value, dict):
        return ConcurrencyLimitConfig(**value)
    return value


def runner_deployments(path: Path = PREFECT_YAML) -> list[Any]:
    """One `RunnerDeployment` per prefect.yaml deployment, for `prefect.serve`."""
    from prefect.flows import load_flow_from_entrypoint

    deployments = []
    for spec in deployment_specs(path):
        unknown = set(spec) - {"name", "entrypoint", "schedules", "concurrency_limit"}
        unknown -= set(SERVED_KEYS) | set(WORKER_ONLY_KEYS)
        if unknown:
            raise ValueError(f"deployment {spec['name']!r}: serve.py does not handle {sorted(unknown)}")
        file, _, function = spec["entrypoint"].rpartition(":")
        flow = load_flow_from_entrypoint(f"{REPO_ROOT / file}:{function}")
        options = {key: spec[key] for key in SERVED_KEYS if key in spec}
        if "concurrency_limit" in spec:
            options["concurrency_limit"] = to_concurrency_limit(spec["concurrency_limit"])
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                schedules=[to_schedule(item) for item in spec.get("schedules") or []],
                **options,
            )
        )
    return deployments


def worker_deployments(deployments: list[Any]) -> list[str]:
    """Those of `deployments` that already exist on the server as work-pool deployments.

    Serving over one (same flow and name, made by ``prefect deploy``) would keep its work pool and
    drop its pull steps: its runs would crash. They have to be deleted first.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                taken.append(name)
    return taken


def main() -> int:
    from prefect import serve

    os.chdir(REPO_ROOT)  # entrypoints and the parameters' relative paths are relative to the clone
    deployments = runner_deployments()
    if taken := worker_deployments(deployments):
        print(
            "These deployments exist for a work pool (made by `prefect deploy`); a worker runs them:",
            file=sys.stderr,
        )
        for name in taken:
            print(f"  prefect deployment delete '{name}'   # to serve it from here instead", file=sys.stderr)
        return 1
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
