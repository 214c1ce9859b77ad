"""`kontext run` with no Prefect server configured starts one early and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, good_rows, manifest, prefect_env

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_records_everything_on_the_early_server_and_stops_it(sandbox, tmp_path):
    home = tmp_path / "prefect-home"
    path = manifest(tmp_path, good_rows(3))
    done = subprocess.run(
        [sys.executable, "-m", "kontext.cli", "run", str(path), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=prefect_env(None, home, sandbox), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "3 rows (succeeded: 3)" in done.stdout
    assert "Error logging to API" not in output and "did not start" not in output
    assert "Starting temporary server" not in output  # Prefect did not start its embedded one
    # Everything reached Prefect's database in PREFECT_HOME, the one the embedded server uses.
    with sqlite3.connect(home / "prefect.db") as db:
        (flow_runs,) = db.execute("select count(*) from flow_run where state_type = 'COMPLETED'").fetchone()
        task_runs = {name for (name,) in db.execute("select name from task_run")}
        logs = [message for (message,) in db.execute("select message from log")]
    assert flow_runs == 1
    assert task_runs == {"edit-SKU-000", "edit-SKU-001", "edit-SKU-002"}
    assert any(message.startswith("Done: {'succeeded': 3}") for message in logs)  # the last log line


def test_a_killed_run_takes_its_server_with_it(sandbox, tmp_path):
    sandbox.config.latency = 30  # the run is still going when it is killed
    path = manifest(tmp_path, good_rows(2))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kontext.cli", "run", str(path), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        env=prefect_env(None, tmp_path / "home", sandbox),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (servers := _children(proc.pid)):  # the server is its first child
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # poll interval of a bounded wait for the child to appear
        while sandbox.creates < 2:  # the flow is running on that server
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # poll interval of a bounded wait for the creates
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while _alive(servers[0]):
        assert time.monotonic() < deadline, "the server outlived the killed run"
        time.sleep(0.05)  # poll interval of a bounded wait for the server's exit


def test_a_configured_server_wins_and_the_early_one_is_stopped_unused(sandbox_env, tmp_path):
    # Prefect's settings name a server (here the test harness's, as a profile would): the run goes
    # there, and the server started before Prefect was imported is stopped, unused.
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from kontext.cli import run_flow
    from kontext.prefect_server import EarlyPrefectServer

    server = EarlyPrefectServer()
    path = manifest(tmp_path, good_rows(2), name="configured-server.csv")
    summary = run_flow({"manifest": str(path), "output_dir": str(tmp_path / "out")}, server)
    assert summary.counts == {"succeeded": 2}
    assert server.proc.poll() is not None  # stopped

    async def runs():
        async with get_client() as client:
            name = FlowRunFilterName(like_="catalog-configured-server-")
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=name))

    assert len(asyncio.run(runs())) == 1  # recorded on the configured server


@pytest.mark.parametrize(
    ("profiles", "env", "starts"),
    [
        (None, {}, True),  # no profiles file: Prefect would start its embedded server
        ('active = "local"\n[profiles.local]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n', {}, False),
        ('active = "local"\n[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n', {}, True),
        ('[profiles.ephemeral]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n', {}, False),  # default
        (
            'active = "local"\n[profiles.local]\n[profiles.cloud]\nPREFECT_API_URL = "https://x"\n',
            {"PREFECT_PROFILE": "cloud"},
            False,
        ),
        ("not toml [", {}, True),
        (None, {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, False),
        (None, {"KONTEXT_EARLY_SERVER": "0"}, False),
    ],
)
def test_the_early_server_starts_only_when_nothing_names_a_server(
    tmp_path, monkeypatch, profiles, env, starts
):
    from kontext.prefect_server import EarlyPrefectServer

    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "KONTEXT_EARLY_SERVER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if profiles is not None:
        (tmp_path / "profiles.toml").write_text(profiles)
    monkeypatch.setattr(EarlyPrefectServer, "__init__", lambda self: None)  # no process for this
    assert (EarlyPrefectServer.start_if_embedded() is not None) is starts
