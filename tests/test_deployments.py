"""deployments/: prefect.yaml checked offline, then deployed and run for real.

The offline tests check prefect.yaml with Prefect's own models and the flow's signature (what
`prefect deploy` and the server would reject, or silently skip). The slow tests start a real
`prefect server start` (own PREFECT_HOME and database, loopback port), then run the nightly
deployment end to end against the local sandbox: once through `prefect deploy` and a process
worker, once through `deployments/serve.py`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema
import pytest
import yaml
from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectNotFound, ParameterTypeError, SignatureMismatchError
from prefect.flows import load_flow_from_entrypoint
from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate
from prefect.workers.process import ProcessWorker

from blocks import ReplicateCredentials
from kontext.sandbox import Sandbox, SandboxConfig
from tests.helpers import EXAMPLES, REPO_ROOT, TOKEN, PrefectServer, read_results

DEPLOYMENTS_DIR = REPO_ROOT / "deployments"
PREFECT_YAML = DEPLOYMENTS_DIR / "prefect.yaml"
SPEC: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())
DEPLOYMENTS: list[dict[str, Any]] = SPEC["deployments"]
NIGHTLY = next(d for d in DEPLOYMENTS if d["name"].startswith("nightly"))
POOL = NIGHTLY["work_pool"]["name"]
BLOCK = NIGHTLY["parameters"]["credentials"]
PREFECT = str(Path(sys.executable).with_name("prefect"))
RUN_TIMEOUT = 180  # seconds a triggered run may take to finish (it takes ~5 s)

by_name = pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])


def _flow(deployment: dict[str, Any]) -> Flow:
    file, _, function = deployment["entrypoint"].rpartition(":")
    return load_flow_from_entrypoint(f"{REPO_ROOT / file}:{function}")


def _load_serve_module() -> Any:
    spec = importlib.util.spec_from_file_location("deployments_serve", DEPLOYMENTS_DIR / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ offline


def test_prefect_yaml_passes_prefects_own_schema():
    # Prefect's own model of prefect.yaml is private (it moved between releases): skip, not fail.
    models = pytest.importorskip("prefect.cli.deploy._models", reason="Prefect's prefect.yaml model moved")
    PrefectYamlModel, RawScheduleConfig = models.PrefectYamlModel, models.RawScheduleConfig  # noqa: N806
    # `prefect deploy` only warns that it skips a file its model rejects, then fails on something
    # else ("An entrypoint must be provided"): this says what is wrong.
    model = PrefectYamlModel.model_validate(SPEC)
    assert [d.name for d in model.deployments] == [d["name"] for d in DEPLOYMENTS]
    assert len({d["name"] for d in DEPLOYMENTS}) == len(DEPLOYMENTS)
    for deployment in DEPLOYMENTS:
        for schedule in deployment["schedules"]:
            RawScheduleConfig.model_validate(schedule)  # no unknown keys, one of cron/interval/rrule


@by_name
def test_entrypoint_loads_as_the_catalog_flow(deployment):
    flow = _flow(deployment)
    assert isinstance(flow, Flow)
    assert flow.name == "edit-catalog"


@by_name
def test_parameters_validate_against_the_flow(deployment):
    flow = _flow(deployment)
    params = deployment["parameters"]
    # The flow's signature (pydantic): unknown names, wrong types, missing `manifest` all raise.
    flow.validate_parameters(params)
    # The OpenAPI schema the server enforces on every run of the deployment.
    validate(
        params, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True, ignore_required=False
    )
    # Credentials by the name of a saved block (lowercase letters, digits, dashes), not a token.
    assert re.fullmatch(r"[a-z0-9-]+", params["credentials"])
    if "://" not in params["manifest"]:
        assert (REPO_ROOT / params["manifest"]).is_file()  # relative to the clone (the pull step)


def test_a_wrong_parameter_is_caught():
    flow = _flow(NIGHTLY)
    with pytest.raises(SignatureMismatchError, match="concurrencie"):
        flow.validate_parameters({**NIGHTLY["parameters"], "concurrencie": 4})
    with pytest.raises(ParameterTypeError, match="aspect_ratio"):
        flow.validate_parameters({**NIGHTLY["parameters"], "aspect_ratio": "7:5"})


@by_name
def test_schedules_are_valid_crons_with_a_timezone(deployment):
    assert deployment["schedules"]
    for item in deployment["schedules"]:
        assert item.get("timezone"), "a cron without a timezone runs in UTC"
        schedule = CronSchedule(cron=item["cron"], timezone=item["timezone"])  # croniter and IANA checks
        assert schedule.timezone == item["timezone"]
        assert item.get("active", True) is True
        # What the server's scheduler computes: nightly fires once a day, hourly once an hour.
        server_schedule = ServerCronSchedule(cron=item["cron"], timezone=item["timezone"])
        start = datetime(2026, 3, 28, tzinfo=UTC)  # across the European DST change
        dates = asyncio.run(server_schedule.get_dates(n=4, start=start))
        steps = {(b - a).total_seconds() / 3600 for a, b in zip(dates, dates[1:], strict=False)}
        if deployment["name"].startswith("nightly"):
            assert steps <= {23, 24, 25}
            local = [d.astimezone(ZoneInfo(item["timezone"])) for d in dates]
            assert len({(d.hour, d.minute) for d in local}) == 1  # the same local time every day
        if deployment["name"].endswith("hourly"):
            assert steps == {1}


def test_every_deployment_targets_the_process_pool():
    # prefect.yaml names the pool; its type is set where it is created: the README's command.
    readme = (DEPLOYMENTS_DIR / "README.md").read_text()
    assert f"prefect work-pool create {POOL} --type process" in readme
    variables = ProcessWorker.get_default_base_job_template()["variables"]
    for deployment in DEPLOYMENTS:
        assert deployment["work_pool"]["name"] == POOL
        job_variables = deployment["work_pool"].get("job_variables") or {}
        jsonschema.validate(job_variables, {**variables, "additionalProperties": False})


def test_pull_step_runs_in_the_clone_the_deployment_was_made_from():
    (build,) = SPEC["build"]
    (pull,) = SPEC["pull"]
    step = "prefect.deployments.steps.set_working_directory"
    assert build[step] == {"id": "clone", "directory": "."}  # the deploying process's real cwd
    assert pull[step] == {"directory": "{{ clone.directory }}"}
    assert not any("$PWD" in value for value in _strings(SPEC))  # stale in a non-shell subprocess


SECRET_PATTERNS = [
    re.compile(r"r8_[A-Za-z0-9]{6,}"),  # a Replicate token ("r8_..." as a placeholder is fine)
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._-]{8,}"),
    # a credential-named key set to a long mix of letters and digits
    re.compile(
        r"(?i)(token|api[_-]?key|secret|password)\s*[:=]\s*['\"]?"
        r"(?=[\w-]*\d)(?=[\w-]*[a-z])[\w-]{20,}"
    ),
]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


@pytest.mark.parametrize("name", ["prefect.yaml", "serve.py", "README.md"])
def test_no_secret_in_the_deployment_files(name):
    text = (DEPLOYMENTS_DIR / name).read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{name}: {pattern.search(text).group(0)!r}"
    assert TOKEN not in text


def test_no_secret_looking_value_in_prefect_yaml():
    for value in _strings(SPEC):
        assert not re.search(r"(?i)token|secret|password|api[_-]?key", value), value
        # a long unbroken mix of letters and digits looks like a credential
        for word in re.findall(r"[A-Za-z0-9_+/=-]{24,}", value):
            assert not (re.search(r"\d", word) and re.search(r"[A-Za-z]", word)), word


def test_serve_builds_the_same_deployments():
    serve = _load_serve_module()
    built = {d.name: d for d in serve.runner_deployments()}
    assert set(built) == {d["name"] for d in DEPLOYMENTS}
    for spec in DEPLOYMENTS:
        deployment = built[spec["name"]]
        assert deployment.parameters == spec["parameters"]
        assert deployment.tags == spec["tags"]
        assert deployment.description == spec["description"]
        assert deployment.work_pool_name is None  # served: runs in the serve process
        schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
        assert schedules == [(s["cron"], s["timezone"], s.get("active", True)) for s in spec["schedules"]]
        limit = spec.get("concurrency_limit")
        if isinstance(limit, dict):
            assert deployment.concurrency_limit == limit["limit"]
            assert deployment.concurrency_options.collision_strategy == limit["collision_strategy"]


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    serve = _load_serve_module()
    for extra, message in [
        ({"triggers": [{"enabled": True}]}, "triggers"),
        ({"schedules": [{"cron": "0 2 * * *", "timezone": "UTC", "replaces": "old"}]}, "replaces"),
    ]:
        path = tmp_path / "prefect.yaml"
        path.write_text(yaml.safe_dump({"deployments": [{**NIGHTLY, **extra}]}))
        with pytest.raises(ValueError, match=message):
            serve.runner_deployments(path)


# ------------------------------------------------------------------------ real server, slow


class _Server(PrefectServer):
    """A real Prefect server whose scheduler service is off.

    Otherwise the hourly schedule could fire while a test runs (at a quarter past) and the worker
    would run it too: 12 more predictions and files written into the clone.
    """

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
            PREFECT_RUNNER_POLL_FREQUENCY="1",  # serve.py picks up a triggered run within a second
        )
        return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    with _Server(tmp_path_factory.mktemp("prefect-home")) as running:
        yield running


class _Process:
    """A subprocess in its own process group, logging to a file; stopped (bounded) on exit."""

    def __init__(self, args: list[str], log: Path, *, cwd: Path, env: dict[str, str]):
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tail(self, chars: int = 4000) -> str:
        self._file.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def __enter__(self) -> _Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                if self.proc.poll() is not None:
                    break
                os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            else:
                self.proc.wait()
        finally:
            self._file.close()


def _example_manifest(tmp_path: Path) -> Path:
    """A copy of the bundled example (12 rows; image paths relative to the manifest's folder)."""
    folder = tmp_path / "manifest"
    shutil.copytree(EXAMPLES / "images", folder / "images")
    shutil.copy(EXAMPLES / "manifest.csv", folder / "manifest.csv")
    return folder / "manifest.csv"


def _save_block(server: _Server, sandbox: Sandbox) -> None:
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url).save(BLOCK, overwrite=True)


def _delete_deployments(client: Any) -> None:
    for deployment in client.read_deployments():
        client.delete_deployment(deployment.id)


def _run_and_wait(client: Any, deployment_id: Any, parameters: dict[str, Any], watch: _Process) -> Any:
    """Trigger one run of the deployment with these parameters; its final flow run."""
    flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        flow_run = client.read_flow_run(flow_run.id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        assert watch.proc.poll() is None, f"{watch.log.name} exited:\n{watch.tail()}"
        assert time.monotonic() < deadline, (
            f"not final after {RUN_TIMEOUT} s: {flow_run.state!r}\n{watch.tail()}"
        )
        time.sleep(0.5)  # poll interval of a bounded wait for the run's state


def _assert_catalog_done(flow_run: Any, out: Path, sandbox: Sandbox, log: str) -> None:
    assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{log}"
    results = read_results(out / "results.csv")
    assert len(results) == 12
    assert set(results["status"]) == {"succeeded"}, results[["id", "status", "error"]]
    assert sandbox.creates == 12


@pytest.mark.slow
def test_deploy_from_prefect_yaml_and_run_with_a_process_worker(server, tmp_path):
    env = server.env()
    with Sandbox(SandboxConfig(token=TOKEN, latency=0.2)) as sandbox:
        created = subprocess.run(
            [PREFECT, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        _save_block(server, sandbox)

        # Deploy as the README says, from the repository root. A stale $PWD (a subprocess started
        # with cwd= inherits its parent's) must not matter.
        deployed = subprocess.run(
            [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            cwd=REPO_ROOT,
            env={**env, "PWD": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            assert client.read_work_pool(POOL).type == "process"
            deployments = {}
            for spec in DEPLOYMENTS:
                deployment = client.read_deployment_by_name(f"edit-catalog/{spec['name']}")
                deployments[spec["name"]] = deployment
                assert deployment.work_pool_name == POOL
                assert deployment.entrypoint == spec["entrypoint"]
                assert deployment.parameters == spec["parameters"]
                assert deployment.pull_steps == [
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
                ]
                assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
                    (s["cron"], s["timezone"], s.get("active", True)) for s in spec["schedules"]
                ]
            nightly = deployments[NIGHTLY["name"]]

            # A worker started anywhere runs the flow in the clone (the pull step).
            worker_cwd = tmp_path / "worker"
            worker_cwd.mkdir()
            with _Process(
                [PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
                tmp_path / "worker.log",
                cwd=worker_cwd,
                env=env,
            ) as worker:
                out = tmp_path / "out"
                params = {"manifest": str(_example_manifest(tmp_path)), "output_dir": str(out)}
                flow_run = _run_and_wait(client, nightly.id, params, worker)
                log = worker.tail()
            assert flow_run.parameters["credentials"] == BLOCK  # the rest from prefect.yaml
            ids = [nightly.id, *(d.id for d in deployments.values())]
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
            assert [r.id for r in runs] == [flow_run.id]  # nothing else ran
            _delete_deployments(client)
        _assert_catalog_done(flow_run, out, sandbox, log)


@pytest.mark.slow
def test_serve_script_serves_and_runs_the_same_deployments(server, tmp_path):
    env = server.env()
    with Sandbox(SandboxConfig(token=TOKEN, latency=0.2)) as sandbox:
        _save_block(server, sandbox)
        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            serve_cwd = tmp_path / "elsewhere"
            serve_cwd.mkdir()
            # Over a work-pool deployment of the same name, serve.py refuses and says what to do.
            _delete_deployments(client)
            try:
                client.read_work_pool(POOL)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            taken = _load_serve_module().runner_deployments()[0]
            taken.work_pool_name = POOL
            taken.apply()
            refused = subprocess.run(
                [sys.executable, str(DEPLOYMENTS_DIR / "serve.py")],
                cwd=serve_cwd, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert f"prefect deployment delete 'edit-catalog/{taken.name}'" in refused.stderr
            _delete_deployments(client)

            with _Process(
                [sys.executable, str(DEPLOYMENTS_DIR / "serve.py")],
                tmp_path / "serve.log",
                cwd=serve_cwd,
                env={**env, "PWD": str(serve_cwd)},
            ) as served:
                deadline = time.monotonic() + 120
                while len(found := client.read_deployments()) < len(DEPLOYMENTS):
                    assert served.proc.poll() is None, f"serve.py exited:\n{served.tail()}"
                    assert time.monotonic() < deadline, f"serve.py did not deploy:\n{served.tail()}"
                    time.sleep(0.25)  # poll interval of a bounded wait for serve.py's deployments
                assert {d.name for d in found} == {d["name"] for d in DEPLOYMENTS}
                nightly = client.read_deployment_by_name(f"edit-catalog/{NIGHTLY['name']}")
                assert nightly.work_pool_name is None
                assert nightly.parameters == NIGHTLY["parameters"]
                assert [s.schedule.cron for s in nightly.schedules] == [
                    s["cron"] for s in NIGHTLY["schedules"]
                ]
                out = tmp_path / "out"
                params = {"manifest": str(_example_manifest(tmp_path)), "output_dir": str(out)}
                flow_run = _run_and_wait(client, nightly.id, params, served)
                log = served.tail()
            _delete_deployments(client)
        _assert_catalog_done(flow_run, out, sandbox, log)
