"""deployments/prefect.yaml: checked offline, then deployed and run on a real server and worker."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks import ReplicateCredentials
from tests.helpers import REPO_ROOT, PrefectServer

PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"
SPEC = yaml.safe_load(PREFECT_YAML.read_text())


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_prefect_yaml_is_valid_offline(deployment):
    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    assert flow.name == "edit-catalog"
    flow.validate_parameters(deployment["parameters"])  # raises on an unknown or ill-typed parameter
    assert deployment["parameters"]["credentials"]  # credentials by block name
    assert (REPO_ROOT / deployment["parameters"]["manifest"]).exists()
    assert deployment["schedules"]
    for schedule in deployment["schedules"]:
        parsed = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert parsed.timezone == schedule["timezone"]
    assert deployment["work_pool"]["name"] == "catalog-pool"


def test_prefect_yaml_holds_no_secret():
    text = PREFECT_YAML.read_text()
    assert not re.search(r"r8_[A-Za-z0-9]{8,}|api_token|Bearer ", text)


def test_serve_script_builds_the_same_schedules():
    sys.path.insert(0, str(REPO_ROOT / "deployments"))
    try:
        import serve
    finally:
        sys.path.pop(0)
    built = {d.name: d for d in serve.runner_deployments()}
    for spec in SPEC["deployments"]:
        deployment = built[spec["name"]]
        assert deployment.parameters == spec["parameters"]
        assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in spec["schedules"]]


async def _wait_for_final_state(flow_run_id, seconds: float):
    deadline = time.monotonic() + seconds
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(flow_run_id)
            if flow_run.state and flow_run.state.is_final():
                return flow_run
            if time.monotonic() > deadline:
                return flow_run
            await asyncio.sleep(0.5)


@pytest.mark.slow
def test_deploy_and_run_on_a_real_server_and_worker(sandbox, tmp_path):
    from prefect.deployments import run_deployment

    sandbox.config.latency = 0.2
    prefect = str(Path(sys.executable).with_name("prefect"))
    with PrefectServer(tmp_path / "prefect-home") as server:
        env = server.env()
        created = subprocess.run(
            [prefect, "work-pool", "create", "catalog-pool", "--type", "process"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url).save("catalog")
        deployed = subprocess.run(
            [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        server.spawn([prefect, "worker", "start", "--pool", "catalog-pool", "--limit", "1"], "worker.log")
        out = tmp_path / "nightly"
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            flow_run = run_deployment(
                "edit-catalog/nightly-catalog-refresh", parameters={"output_dir": str(out)}, timeout=0
            )
            final = asyncio.run(_wait_for_final_state(flow_run.id, 240))
        logs = (server.home / "worker.log").read_text()[-4000:]
        assert final.state.is_completed(), f"{final.state!r}\n{logs}"
    results = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    assert len(results) == 12 and set(results["status"]) == {"succeeded"}
    assert sandbox.creates == 12
