"""The catalog flow end to end against the sandbox, counting its creates."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from kontext.manifest import RESULT_COLUMNS
from kontext.schema import OUTPUT_SIZES
from tests.helpers import EXAMPLES, IMAGES, good_rows, manifest, read_results, run_flow
from tests.helpers import cli as _cli
from tests.helpers import cli_env as _env


def test_all_good_manifest(sandbox_env, tmp_path):
    rows = good_rows(6)
    rows[1]["aspect_ratio"] = "16:9"
    rows[2]["output_format"] = "png"
    out = tmp_path / "out"
    state, summary = run_flow(manifest=str(manifest(tmp_path, rows)), output_dir=str(out), aspect_ratio="1:1")
    assert state.is_completed() and summary.counts == {"succeeded": 6}
    assert sandbox_env.creates == 6
    results = read_results(out / "results.csv")
    assert list(results.columns) == [*RESULT_COLUMNS, "title", "aspect_ratio", "output_format"]
    assert list(results["id"]) == [r["id"] for r in rows]
    for _, row in results.iterrows():
        fmt = row["output_format"] or "jpg"
        size = OUTPUT_SIZES[row["aspect_ratio"] or "1:1"]
        path = Path(row["output_path"])
        assert path == out / f"{row['id']}.{fmt}"
        with Image.open(path) as image:
            assert image.format == {"jpg": "JPEG", "png": "PNG"}[fmt] and image.size == size
        assert (int(row["width"]), int(row["height"])) == size
        assert row["prediction_id"] in sandbox_env.predictions and row["sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".kontext"]


def test_mixed_valid_and_invalid_rows(sandbox_env, tmp_path):
    rows = good_rows(4)
    rows[1]["guidance"] = "eleven"
    rows[3]["image_url"] = "not/here.jpg"
    out = tmp_path / "out"
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, rows)), output_dir=str(out), max_failure_ratio=0.5
    )
    assert state.is_completed()
    assert summary.counts == {"succeeded": 2, "invalid": 2}
    assert sandbox_env.creates == 2  # nothing spent on an invalid row
    results = read_results(out / "results.csv")
    assert list(results["status"]) == ["succeeded", "invalid", "succeeded", "invalid"]
    assert results["error"][1] == "guidance: must be a number (got 'eleven')"
    assert results["error"][3].startswith("image_url: no readable image file")


def test_failures_and_hangs_are_recorded_and_the_threshold_decides(sandbox_env, tmp_path):
    rows = good_rows(5)
    rows[1]["prompt"] = "broken [fail]"
    rows[3]["prompt"] = "stuck [hang]"
    out = tmp_path / "out"
    path = manifest(tmp_path, rows)
    state, summary = run_flow(manifest=str(path), output_dir=str(out), prediction_timeout=1.0)
    assert state.is_failed() and "2 of 5 rows" in state.message
    results = read_results(out / "results.csv")
    assert list(results["status"]) == ["succeeded", "failed", "succeeded", "canceled", "succeeded"]
    assert "simulated model error" in results["error"][1]
    assert "did not finish within 1s" in results["error"][3]
    hung = results["prediction_id"][3]
    assert sandbox_env.predictions[hung]["status"] == "canceled"  # canceled at the deadline

    state, _ = run_flow(
        manifest=str(path), output_dir=str(tmp_path / "out2"), prediction_timeout=1.0, max_failure_ratio=0.5
    )
    assert state.is_completed()


def test_rerun_creates_nothing_and_a_changed_row_exactly_one(sandbox_env, tmp_path):
    rows = good_rows(5)
    out = tmp_path / "out"
    path = manifest(tmp_path, rows)
    run_flow(manifest=str(path), output_dir=str(out))
    assert sandbox_env.creates == 5
    first = read_results(out / "results.csv")

    state, summary = run_flow(manifest=str(path), output_dir=str(out))
    assert state.is_completed() and summary.counts == {"skipped": 5}
    assert sandbox_env.creates == 5
    again = read_results(out / "results.csv")
    assert list(again["prediction_id"]) == list(first["prediction_id"])

    rows[2]["prompt"] = "a changed prompt"
    (out / "SKU-004.jpg").unlink()  # a lost output file is fetched again, not paid again
    run_flow(manifest=str(manifest(tmp_path, rows)), output_dir=str(out))
    assert sandbox_env.creates == 6
    final = read_results(out / "results.csv")
    assert list(final["status"]) == ["skipped", "skipped", "succeeded", "skipped", "succeeded"]
    assert final["prediction_id"][4] == first["prediction_id"][4]
    assert (out / "SKU-004.jpg").exists()


def test_rows_that_failed_after_paying_are_fetched_not_paid_again(sandbox_env, tmp_path):
    path = manifest(tmp_path, good_rows(3))
    sandbox_env.config.truncate_download_every = 1  # every download breaks off: the rows fail
    state, summary = run_flow(manifest=str(path), output_dir=str(tmp_path / "o"), max_failure_ratio=1)
    assert summary.counts == {"failed": 3} and sandbox_env.creates == 3
    sandbox_env.config.truncate_download_every = None
    state, summary = run_flow(manifest=str(path), output_dir=str(tmp_path / "o"))
    assert summary.counts == {"succeeded": 3} and sandbox_env.creates == 3  # downloaded, not re-created


def test_rerun_from_another_working_directory_still_skips(sandbox_env, tmp_path, monkeypatch):
    path = manifest(tmp_path, good_rows(3))
    monkeypatch.chdir(tmp_path)
    run_flow(manifest=str(path), output_dir="out")
    state, summary = run_flow(manifest=str(path), output_dir=str(tmp_path / "out"))
    assert summary.counts == {"skipped": 3} and sandbox_env.creates == 3


def test_account_error_stops_the_run_and_leaves_rows_pending(sandbox_env, tmp_path):
    sandbox_env.config.billing_required = True
    out = tmp_path / "out"
    path = manifest(tmp_path, good_rows(30))
    state, summary = run_flow(manifest=str(path), output_dir=str(out), concurrency=2)
    assert state.is_failed() and "Run stopped" in state.message
    assert "402" in summary.stopped_reason
    assert summary.counts.get("pending", 0) >= 20  # not attempted: nothing spent, resumable
    sandbox_env.config.billing_required = False
    state, summary = run_flow(manifest=str(path), output_dir=str(out), concurrency=4)
    assert state.is_completed() and summary.counts == {"succeeded": 30}
    assert sandbox_env.creates == 30


def test_task_runs_are_named_after_rows(sandbox_env, tmp_path):
    state, _ = run_flow(manifest=str(manifest(tmp_path, good_rows(3))), output_dir=str(tmp_path / "o"))

    async def names():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            flow_run = await client.read_flow_run(state.state_details.flow_run_id)
        return {r.name for r in runs}, flow_run

    task_names, flow_run = asyncio.run(names())
    assert {"edit-SKU-000", "edit-SKU-001", "edit-SKU-002"} <= task_names
    assert flow_run.name.startswith("catalog-catalog-")
    assert {"flux-kontext-dev", "manifest:catalog"} <= set(flow_run.tags)


def test_large_manifests_are_grouped(sandbox_env, tmp_path):
    state, summary = run_flow(
        manifest=str(manifest(tmp_path, good_rows(40))),
        output_dir=str(tmp_path / "o"),
        max_task_runs=8,
        concurrency=8,
    )
    assert summary.counts == {"succeeded": 40} and sandbox_env.creates == 40

    async def count():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        return sorted(r.name for r in runs)

    names = asyncio.run(count())
    assert len(names) == 8 and names[0] == "edit-SKU-000..SKU-004 (5 rows)"


def test_sigkill_mid_run_then_rerun_pays_once_per_row(sandbox, tmp_path):
    sandbox.config.latency = 1.5
    n = 12
    path = manifest(tmp_path, good_rows(n))
    out = tmp_path / "out"
    journal = out / ".kontext" / "journal.jsonl"
    proc = _cli(["run", str(path), "--out", str(out), "--concurrency", "4"], _env(sandbox))
    deadline = time.monotonic() + 120
    # Wait (by observing the journal, bounded) until predictions exist and some rows are done.
    while time.monotonic() < deadline and proc.poll() is None:
        text = journal.read_text() if journal.exists() else ""
        if text.count('"finished"') >= 2 and text.count('"created"') > text.count('"finished"'):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    created_before = sandbox.creates
    assert 0 < created_before < n

    rerun = _cli(["run", str(path), "--out", str(out), "--concurrency", "4"], _env(sandbox))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    results = read_results(out / "results.csv")
    assert set(results["status"]) <= {"succeeded", "skipped"} and len(results) == n
    assert sandbox.creates == n  # exactly one create per row, across the crash
    assert len(set(results["prediction_id"])) == n
    assert not [p for p in out.iterdir() if p.name.endswith((".part", ".tmp"))]


def test_cli_exit_codes(sandbox, tmp_path):
    good = manifest(tmp_path, good_rows(2), "good.csv")
    mixed = manifest(
        tmp_path, [*good_rows(1), {"id": "bad", "image_url": "x.jpg", "prompt": "p"}], "mixed.csv"
    )
    missing = manifest(tmp_path, [{"image_url": str(IMAGES[0])}], "missing.csv")

    def code(args, env):
        proc = _cli(args, env)
        stdout, stderr = proc.communicate(timeout=300)
        return proc.returncode, stdout + stderr

    rc, text = code(["run", str(good), "--out", str(tmp_path / "a")], _env())
    assert rc == 2 and "kontext demo" in text  # no credentials
    rc, text = code(["run", str(missing), "--out", str(tmp_path / "b")], _env(sandbox))
    assert rc == 2 and "prompt" in text
    rc, text = code(["run", str(good), "--out", str(tmp_path / "c")], _env(sandbox))
    assert rc == 0 and "succeeded: 2" in text
    rc, text = code(
        ["run", str(mixed), "--out", str(tmp_path / "d"), "--max-failure-ratio", "1"], _env(sandbox)
    )
    assert rc == 1 and "bad: invalid" in text
    before = sandbox.creates
    rc, text = code(["validate", str(mixed)], _env())
    assert rc == 1 and "1 invalid" in text and "$0.03" in text and sandbox.creates == before
    rc, text = code(["validate", str(good)], _env())
    assert rc == 0


def test_demo_manifest_runs_from_a_copy(sandbox_env, tmp_path):
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy)
    state, summary = run_flow(manifest=str(copy / "manifest.csv"), output_dir=str(tmp_path / "demo"))
    assert state.is_completed() and summary.counts == {"succeeded": 12}
