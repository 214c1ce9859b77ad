"""Nothing lost, nothing paid twice, nothing leaked: faults, lost creates, crashes, secrets, downloads."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import time
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from kontext.client import ReplicateClient
from kontext.sandbox import Sandbox, SandboxConfig
from tests.helpers import TOKEN, good_rows, manifest, read_results, run_flow
from tests.helpers import cli as _cli
from tests.helpers import cli_env as _env


def test_fault_mix_every_good_row_succeeds_once(sandbox_env, tmp_path):
    sb = sandbox_env
    sb.config.latency = 0.3
    sb.config.create_rate_limit = 1200
    sb.config.create_burst = 3
    sb.config.poll_error_every = 7
    sb.config.reset_every_poll = 11
    sb.config.truncate_download_every = 5
    rows = good_rows(240)
    for i in range(0, 240, 20):
        rows[i]["prompt"] = f"broken {i} [fail]"
    for i in range(7, 240, 40):
        rows[i]["prompt"] = f"stuck {i} [hang]"
    out = tmp_path / "out"
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, rows)),
        output_dir=str(out),
        concurrency=24,
        prediction_timeout=3,
        prefer_wait=1,
        max_failure_ratio=0.2,
    )
    results = read_results(out / "results.csv")
    bad_fail = {r["id"] for r in rows if "[fail]" in r["prompt"]}
    bad_hang = {r["id"] for r in rows if "[hang]" in r["prompt"]}
    by_id = results.set_index("id")
    assert set(by_id.loc[sorted(bad_fail), "status"]) == {"failed"}
    assert all("simulated model error" in e for e in by_id.loc[sorted(bad_fail), "error"])
    assert set(by_id.loc[sorted(bad_hang), "status"]) == {"canceled"}
    good = set(by_id.index) - bad_fail - bad_hang
    assert set(by_id.loc[sorted(good), "status"]) == {"succeeded"}
    assert sb.creates == 240  # exactly one create per row, through 429s, 503s, resets and cuts
    assert sb.count(origin="api", status=429) > 0 and sb.count(origin="api", status=503) > 0
    for pid in by_id.loc[sorted(bad_hang), "prediction_id"]:
        assert sb.predictions[pid]["status"] == "canceled"
    assert state.is_completed()


def test_low_credit_throttle_is_waited_out(sandbox_env, tmp_path):
    sandbox_env.config.create_rate_limit = 20  # one create every 3 s, as a low-credit account sees
    sandbox_env.config.create_burst = 1
    state, summary = run_flow(manifest=str(manifest(tmp_path, good_rows(3))), output_dir=str(tmp_path / "o"))
    assert summary.counts == {"succeeded": 3} and sandbox_env.creates == 3
    throttled = [r for r in sandbox_env.requests if r.status == 429]
    assert throttled, "the low-credit limit should have throttled some creates"
    for response in throttled:  # the body's retry_after and the header agree, and were honoured
        assert int(response.response_headers["retry-after"]) >= 1


def test_lost_create_responses_are_found_not_recreated(sandbox_env, tmp_path):
    sandbox_env.config.drop_create_response_every = 3
    state, summary = run_flow(manifest=str(manifest(tmp_path, good_rows(9))), output_dir=str(tmp_path / "o"))
    assert summary.counts == {"succeeded": 9}
    assert sandbox_env.creates == 9  # the three lost responses were found in the predictions list


def test_create_that_failed_ambiguously_is_recorded_unknown(sandbox_env, tmp_path):
    sandbox_env.config.create_error_every = 2  # a 503 that (here) created nothing
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, good_rows(4))),
        output_dir=str(tmp_path / "o"),
        concurrency=1,
        max_failure_ratio=1,
    )
    results = read_results(tmp_path / "o" / "results.csv")
    assert list(results["status"]) == ["succeeded", "unknown", "succeeded", "unknown"]
    assert "no matching prediction was found" in results["error"][1]
    assert sandbox_env.creates == 2


def _kill_when(proc, condition, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def _journal(out: Path) -> str:
    path = out / ".kontext" / "journal.jsonl"
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("point", ["creating", "polling", "downloading"])
def test_sigkill_at_each_step_then_rerun(sandbox, tmp_path, point):
    n = 8
    path = manifest(tmp_path, good_rows(n))
    out = tmp_path / "out"
    args = ["run", str(path), "--out", str(out), "--concurrency", "4"]
    if point == "creating":
        sandbox.config.latency = 3  # creates are held open by Prefer: wait
        condition = lambda: _journal(out).count('"creating"') >= 2  # noqa: E731
    elif point == "polling":
        sandbox.config.latency = 3
        args += ["--prefer-wait", "0"]
        condition = lambda: _journal(out).count('"created"') >= 2  # noqa: E731
    else:
        sandbox.config.latency = 0.1
        sandbox.config.download_latency = 3
        condition = lambda: sandbox.count(origin="output") >= 2  # noqa: E731
    proc = _cli(args, _env(sandbox))
    assert _kill_when(proc, condition), proc.communicate()[1][-3000:]
    if (out / "results.csv").exists():
        pd.read_csv(out / "results.csv")  # whatever moment the kill hit, the results file parses
    sandbox.config.download_latency = 0
    rerun = _cli(["run", str(path), "--out", str(out), "--concurrency", "4"], _env(sandbox))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    results = read_results(out / "results.csv")
    assert len(results) == n and set(results["status"]) <= {"succeeded", "skipped"}
    assert sandbox.creates == n
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".part", ".tmp"))]
    assert not leftovers


def test_repeated_kills_always_leave_a_parsable_results_file(sandbox, tmp_path):
    sandbox.config.latency = 0.2
    path = manifest(tmp_path, good_rows(30))
    out = tmp_path / "out"
    for finished in (3, 10, 20):
        proc = _cli(["run", str(path), "--out", str(out), "--concurrency", "3"], _env(sandbox))
        _kill_when(proc, lambda f=finished: _journal(out).count('"finished"') >= f)
        assert len(pd.read_csv(out / "results.csv")) == 30
    rerun = _cli(["run", str(path), "--out", str(out)], _env(sandbox))
    assert rerun.wait(timeout=300) == 0
    assert sandbox.creates == 30


def test_wrong_token_stops_the_run_with_one_message(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_not_the_right_token_at_all")
    monkeypatch.setenv("REPLICATE_BASE_URL", sandbox.base_url)
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, good_rows(40))), output_dir=str(tmp_path / "o"), concurrency=2
    )
    assert state.is_failed() and "401" in state.message
    assert summary.counts.get("pending", 0) >= 30 and sandbox.creates == 0
    assert "r8_not_the_right_token_at_all" not in state.message


def test_token_is_never_logged_stored_or_sent_to_the_output_host(sandbox_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sandbox_env.config.poll_error_every = 3
    sandbox_env.config.truncate_download_every = 4
    rows = good_rows(6)
    rows[2]["prompt"] = "x [fail]"
    out = tmp_path / "out"
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, rows)), output_dir=str(out), prefer_wait=None, max_failure_ratio=1
    )
    flow_run_id = state.state_details.flow_run_id

    async def stored_text():
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            flow_runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        return "\n".join(
            [
                *(log.message for log in logs),
                *(json.dumps(a.data) for a in artifacts),
                *(fr.model_dump_json() for fr in flow_runs),
            ]
        )

    text = asyncio.run(stored_text())
    assert "SKU-000" in text  # the logs and artifacts are really there
    everything = [text, caplog.text, (out / "results.csv").read_text(), _journal(out), repr(summary)]
    assert all(TOKEN not in chunk for chunk in everything)
    output_requests = [r for r in sandbox_env.requests if r.origin == "output"]
    assert output_requests and all("authorization" not in r.headers for r in output_requests)


def test_download_checks_size_content_and_decoding(sandbox_env, tmp_path):
    sandbox_env.config.corrupt_download_every = 1
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, good_rows(2))), output_dir=str(tmp_path / "a"), max_failure_ratio=1
    )
    results = read_results(tmp_path / "a" / "results.csv")
    assert set(results["status"]) == {"failed"}
    assert all("does not decode as an image" in e for e in results["error"])
    assert not [p for p in (tmp_path / "a").iterdir() if p.suffix == ".jpg"]

    sandbox_env.config.corrupt_download_every = None

    async def capped():
        async with ReplicateClient(
            api_token=sandbox_env.token, base_url=sandbox_env.base_url, max_download_bytes=1000
        ) as client:
            p = await client.create_prediction({"prompt": "x", "input_image": good_rows(1)[0]["image_url"]})
            p = client.raise_for_status(await client.wait_for_prediction(p, timeout=30))
            await client.download_output(p.output_urls[0], tmp_path / "b" / "x.webp")

    with pytest.raises(Exception, match="over the 1000-byte cap"):
        asyncio.run(capped())
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_tls_verification_is_on_by_default():
    client = ReplicateClient(api_token="x", base_url="https://api.replicate.com")
    for http in (client._http, client._downloads):
        context = http._transport._pool._ssl_context
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_proxy_base_url_keeps_the_token_on_its_own_origin(tmp_path, monkeypatch):
    config = SandboxConfig(token=TOKEN, latency=0.05, path_prefix="/replicate")
    with Sandbox(config) as sb:
        monkeypatch.setenv("REPLICATE_API_TOKEN", sb.token)
        monkeypatch.setenv("REPLICATE_BASE_URL", sb.base_url)
        state, summary = run_flow(
            manifest=str(manifest(tmp_path, good_rows(3))), output_dir=str(tmp_path / "o")
        )
        assert summary.counts == {"succeeded": 3}
        assert all("authorization" not in r.headers for r in sb.requests if r.origin == "output")
