"""The catalog run in the Prefect UI, in headless Chromium: named task runs, artifacts, gallery.

Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it) and the `playwright`
package (a test dependency), driven with `executable_path`: no browser download. Screenshots go to
`screenshots/` at the repository root (or $KONTEXT_SCREENSHOT_DIR).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from prefect.events.clients import PrefectEventsClient
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.helpers import EXAMPLES, REPO_ROOT, PrefectServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
    ),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("KONTEXT_SCREENSHOT_DIR", REPO_ROOT / "screenshots"))


async def _wait_until_recorded(flow_run_id, *, task_runs: int, artifacts: int, seconds: float = 120) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    deadline = time.monotonic() + seconds
    async with get_client() as client:
        while time.monotonic() < deadline:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            if len(runs) >= task_runs and len({a.key for a in found}) >= artifacts:
                return
            await asyncio.sleep(0.25)
    raise AssertionError(f"the server recorded {len(runs)} task runs and {len(found)} artifacts")


def test_catalog_run_in_the_prefect_ui(sandbox, tmp_path, monkeypatch):
    from flows.edit_catalog import edit_catalog

    manifest = tmp_path / "examples" / "manifest.csv"
    shutil.copytree(EXAMPLES, manifest.parent)
    text = manifest.read_text().replace("Place the lamp on an office desk", "[fail] Place the lamp on a desk")
    manifest.write_text(text)
    monkeypatch.setenv("REPLICATE_API_TOKEN", sandbox.token)
    monkeypatch.setenv("REPLICATE_BASE_URL", sandbox.base_url)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with PrefectServer(tmp_path / "prefect-home") as server:
        # Prefect's events worker is one per process and keeps the server it first talked to (the
        # session's test server); task runs are recorded from events, so point it at this server.
        EventsWorker.drain_all()
        EventsWorker.set_client_override(PrefectEventsClient, api_url=server.api_url)
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                state = asyncio.run(
                    edit_catalog(manifest=str(manifest), output_dir=str(tmp_path / "out"), return_state=True)
                )
                EventsWorker.drain_all()
        finally:
            EventsWorker.set_client_override(None)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            flow_run_id = state.state_details.flow_run_id
            # The server records task runs and artifacts from events, asynchronously: wait (bounded)
            # until the API has them all, so the page shows what the run did, not a partial view.
            asyncio.run(_wait_until_recorded(flow_run_id, task_runs=12, artifacts=4))
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            try:
                _check_pages(page, server.ui_url, flow_run_id)
            except Exception:
                page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    assert state.is_completed()


def _check_pages(page, ui_url: str, flow_run_id) -> None:
    """The flow run's task runs and artifacts, the results table and the gallery; screenshots."""
    page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
    page.get_by_text("Task Runs", exact=True).first.click()
    page.get_by_text("edit-MUG-001", exact=True).first.wait_for()
    body = page.inner_text("body")
    assert "catalog-manifest-" in body  # the run's name
    assert {"edit-MUG-001", "edit-LAMP-202", "edit-CHR-502"} <= set(body.split("\n"))
    page.screenshot(path=str(SHOTS / "flow-run-task-runs.png"), full_page=True)

    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("catalog-manifest-gallery", exact=True).first.wait_for()
    keys = set(page.inner_text("body").split("\n"))
    assert {f"catalog-manifest-{k}" for k in ("progress", "results", "summary", "gallery")} <= keys
    page.screenshot(path=str(SHOTS / "flow-run-artifacts.png"), full_page=True)

    page.get_by_text("catalog-manifest-results", exact=True).first.click()
    page.get_by_text("LAMP-202", exact=True).first.wait_for()
    assert "prediction" in page.inner_text("body")
    page.screenshot(path=str(SHOTS / "results-table.png"), full_page=True)

    page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("catalog-manifest-gallery", exact=True).first.click()
    page.get_by_text("Before / after", exact=True).first.wait_for()
    thumbnails = "[...document.images].filter(i => i.src.startsWith('data:') && i.naturalWidth > 0)"
    page.wait_for_function(f"() => {thumbnails}.length >= 20")  # before and after, rendered
    assert "simulated model error" in page.inner_text("body")  # the failed row, with its reason
    page.screenshot(path=str(SHOTS / "gallery.png"), full_page=True)
