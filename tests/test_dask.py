"""The catalog flow on a `DaskTaskRunner` over a local cluster of worker processes.

The rows are split into shards that run in the Dask workers, each with its own client (the
credentials block loaded in the worker) and its share of the limits, all appending to one journal.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from blocks import ReplicateCredentials
from tests.helpers import REPO_ROOT, good_rows, manifest, prefect_env, read_results, run_flow

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
prefect_dask = pytest.importorskip("prefect_dask", reason="the dask extra is not installed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.LocalCluster]:
    """Two Dask worker processes, one thread each: a shard per worker at a time."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


def _run_on_dask(cluster, **params):
    return run_flow(prefect_dask.DaskTaskRunner(address=cluster.scheduler_address), **params)


async def _task_runs_and_logs(flow_run_id) -> tuple[list, list[str]]:
    async with get_client() as client:
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return task_runs, [log.message for log in logs]


def _shard_pids(flow_run_id, shards: int) -> set[int]:
    """Process ids the shards reported running in (their log lines reach the server in batches)."""
    for _ in range(100):  # up to ~20 s for the workers' log batches; returns as soon as they are in
        _, messages = asyncio.run(_task_runs_and_logs(flow_run_id))
        pids = {
            int(m) for text in messages for m in re.findall(r"^Shard of \d+ row\(s\) in process (\d+)", text)
        }
        if len(pids) >= shards:
            return pids
        asyncio.run(asyncio.sleep(0.2))  # poll interval of a bounded wait for the log batches
    return pids


def test_flow_spreads_rows_over_dask_workers_and_pays_once(cluster, sandbox, tmp_path):
    ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url).save("dask-test", overwrite=True)
    rows = good_rows(12)
    rows[4]["prompt"] = "broken [fail]"
    rows[7]["guidance"] = "eleven"  # invalid: never sent
    path = manifest(tmp_path, rows)
    out = tmp_path / "out"

    state, summary = _run_on_dask(
        cluster, manifest=str(path), output_dir=str(out), credentials="dask-test", concurrency=8, shards=2
    )
    assert summary.counts == {"succeeded": 10, "failed": 1, "invalid": 1}
    assert state.is_failed() and "2 of 12 rows" in state.message  # over the 10 % threshold
    assert sandbox.creates == 11  # one per valid row
    results = read_results(out / "results.csv")
    assert list(results["id"]) == [r["id"] for r in rows]  # one result row per input row, in order
    assert results["status"][4] == "failed" and "simulated model error" in results["error"][4]
    assert results["error"][7] == "guidance: must be a number (got 'eleven')"
    assert all((out / f"{r['id']}.jpg").is_file() for i, r in enumerate(rows) if i not in (4, 7))

    flow_run_id = state.state_details.flow_run_id
    task_runs, _ = asyncio.run(_task_runs_and_logs(flow_run_id))
    names = sorted(t.name for t in task_runs)
    assert names == [
        "edit-shard-1-of-2 SKU-000..SKU-005 (6 rows)",
        "edit-shard-2-of-2 SKU-006..SKU-011 (5 rows)",
    ]
    assert sorted(t.state.type.value for t in task_runs) == ["COMPLETED", "FAILED"]
    pids = _shard_pids(flow_run_id, 2)
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one

    # Again: finished rows are skipped, the failed one is tried once more, nothing else is paid.
    state, summary = _run_on_dask(
        cluster, manifest=str(path), output_dir=str(out), credentials="dask-test", shards=2
    )
    assert summary.counts == {"skipped": 10, "failed": 1, "invalid": 1}
    assert sandbox.creates == 12


def test_an_account_error_in_a_shard_stops_the_run_with_rows_pending(cluster, sandbox, tmp_path):
    ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url).save("dask-test", overwrite=True)
    sandbox.config.billing_required = True
    path = manifest(tmp_path, good_rows(20))
    out = tmp_path / "out"
    state, summary = _run_on_dask(
        cluster, manifest=str(path), output_dir=str(out), credentials="dask-test", concurrency=2, shards=2
    )
    assert state.is_failed() and "Run stopped" in state.message and "402" in summary.stopped_reason
    assert summary.counts.get("pending", 0) >= 14  # not attempted: nothing spent, resumable
    assert sandbox.creates == 0

    sandbox.config.billing_required = False
    state, summary = _run_on_dask(cluster, manifest=str(path), output_dir=str(out), credentials="dask-test")
    assert state.is_completed() and summary.counts == {"succeeded": 20}
    assert sandbox.creates == 20


def test_the_threaded_default_still_runs_one_task_run_per_row(sandbox_env, tmp_path):
    # The same parameters without a Dask runner: `shards` is ignored, rows are their own task runs.
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, good_rows(3))), output_dir=str(tmp_path / "o"), shards=2
    )
    task_runs, _ = asyncio.run(_task_runs_and_logs(state.state_details.flow_run_id))
    assert sorted(t.name for t in task_runs) == ["edit-SKU-000", "edit-SKU-001", "edit-SKU-002"]


EMBEDDED_SCRIPT = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect_dask import DaskTaskRunner
from flows.edit_catalog import edit_catalog

runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None})
state = asyncio.run(edit_catalog.with_options(task_runner=runner)(
    manifest=sys.argv[1], output_dir=sys.argv[2], shards=2, return_state=True
))

async def task_runs():
    async with get_client() as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        return [run.name for run in await client.read_task_runs(flow_run_filter=flow_run)]

print(json.dumps({"state": state.type.value, "task_runs": asyncio.run(task_runs())}))
"""


def test_on_prefects_embedded_server_the_shards_report_to_the_flows_server(sandbox, tmp_path):
    # No PREFECT_API_URL: the flow starts Prefect's embedded server. Its shards must record their
    # task runs there, not start an embedded server of their own in every Dask worker.
    env = prefect_env(None, tmp_path / "prefect-home", sandbox)
    path = manifest(tmp_path, good_rows(4))
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED_SCRIPT, str(path), str(tmp_path / "out")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["state"] == "COMPLETED"
    assert sorted(result["task_runs"]) == [
        "edit-shard-1-of-2 SKU-000..SKU-001 (2 rows)",
        "edit-shard-2-of-2 SKU-002..SKU-003 (2 rows)",
    ]
    assert (done.stdout + done.stderr).count("Starting temporary server") == 1
    assert sandbox.creates == 4
