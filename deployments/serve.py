"""Serve the scheduled catalog refreshes without a work pool: `python deployments/serve.py`.

The schedules and parameters are read from `deployments/prefect.yaml`, so they are defined once.
Needs a running Prefect server (`prefect server start`); schedules do not fire on the embedded one.
Runs execute in this process, from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` section of prefect.yaml."""
    return yaml.safe_load(path.read_text())["deployments"]


def runner_deployments(path: Path = PREFECT_YAML) -> list[Any]:
    """One `RunnerDeployment` per prefect.yaml deployment, for `prefect.serve`."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    deployments = []
    for spec in deployment_specs(path):
        flow = load_flow_from_entrypoint(str(REPO_ROOT / spec["entrypoint"]))
        schedules = [
            Cron(item["cron"], timezone=item.get("timezone"), active=item.get("active", True))
            for item in spec.get("schedules", [])
        ]
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters"),
                schedules=schedules,
            )
        )
    return deployments


def main() -> None:
    from prefect import serve

    os.chdir(REPO_ROOT)  # the parameters' relative paths are relative to the repository
    sys.path.insert(0, str(REPO_ROOT))
    serve(*runner_deployments())


if __name__ == "__main__":
    main()
