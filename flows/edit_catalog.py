"""The catalog flow: a CSV manifest in, bounded fan-out of predictions, a results manifest out.

Fan-out design (measured, see README "Performance"): each Prefect task run `edit_rows` carries a
group of rows through create -> wait -> download with the core's `CatalogRun`. Small manifests get
one row per task run (``edit-SKU123``), so the UI reads like the catalog; large ones get groups
sized to keep a flow run near `max_task_runs` task runs, because thousands of task runs in one
flow run strain Prefect's embedded SQLite server while adding nothing a row's log lines and the
results artifact do not already say. All rows share one HTTP client, one create rate limiter and
one bound on predictions in flight, whatever the grouping.

On a task runner that spreads work over processes or machines (a `DaskTaskRunner`, say), the rows
to run are split into `shards` task runs instead (`edit_shard`), each self-contained: its own
client (credentials loaded where it runs), an equal share of the concurrency and of the create
rate limit, and appends to the same journal, so resume and never-paying-twice hold across
processes. The flow follows their progress by reading the journal.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, wait
from prefect.logging import get_run_logger
from prefect.runtime import flow_run as runtime_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.artifacts import publish_final_artifacts, publish_progress, tag_flow_run
from kontext.client import ReplicateClient
from kontext.engine import CatalogRun, RunSettings, ShardOutcome, run_shard
from kontext.journal import Journal, JournalFollower
from kontext.manifest import (
    ManifestRow,
    load_manifest,
    remove_stale_temporaries,
    results_frame,
    write_csv_atomic,
)
from kontext.ratelimit import RateLimiter
from kontext.schema import MODEL, AspectRatio, OutputFormat
from tasks.predictions import get_replicate_client

FAILURE_STATUSES = ("failed", "canceled", "unknown", "invalid")


class CatalogSummary(BaseModel):
    """What a catalog run did, returned by the flow and printed by the CLI."""

    manifest: str
    output_dir: str
    results: str
    total: int
    counts: dict[str, int]
    failure_ratio: float
    stopped_reason: str | None = None
    failures: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.counts.get("succeeded", 0) + self.counts.get("skipped", 0) == self.total


def _flow_run_name() -> str:
    manifest = str(runtime_flow_run.parameters.get("manifest", "catalog"))
    stem = Path(manifest.rstrip("/")).stem or "catalog"
    return f"catalog-{stem}-{datetime.now(UTC):%Y-%m-%d}"


def _group_name(rows: list[ManifestRow]) -> str:
    if len(rows) == 1:
        return f"edit-{rows[0].id}"
    return f"edit-{rows[0].id}..{rows[-1].id} ({len(rows)} rows)"


async def _run_client(
    credentials: str | None,
    prefer_wait: int | None,
    max_creates_per_minute: float,
    concurrency: int,
    log: Any,
) -> ReplicateClient:
    """The client a run (or one shard of it) uses: its own create rate limiter, a connection pool
    sized to the predictions in flight, and retries logged to the run's logger."""
    client = await get_replicate_client(
        credentials,
        prefer_wait=prefer_wait,
        rate_limiter=RateLimiter(max_creates_per_minute),
        max_connections=max(concurrency * 2, 10),
    )
    client.log = log  # retries (429 and the wait, 503, truncated downloads) show in the run's logs
    return client


@task(name="edit_rows", cache_policy=NO_CACHE)
async def edit_rows(run: CatalogRun, rows: list[ManifestRow]) -> State:
    """Carry a group of rows through create -> wait -> download; Failed if any row failed."""
    log = get_run_logger()
    results = await asyncio.gather(*(run.run_row(row, log=log) for row in rows))
    failed = [r for r in results if r["status"] in FAILURE_STATUSES]
    summary = ", ".join(f"{r['id']}: {r['status']}" for r in results)
    if failed:
        reasons = "; ".join(f"{r['id']}: {r['error']}" for r in failed)
        return Failed(message=f"{len(failed)} of {len(rows)} row(s) did not succeed: {reasons}", data=results)
    return Completed(message=summary, data=results)


class ShardOptions(BaseModel):
    """What each shard of a run spread over processes gets: its share of the run's limits."""

    concurrency: int
    max_creates_per_minute: float
    prefer_wait: int | None
    settings: RunSettings


@task(name="edit_shard", cache_policy=NO_CACHE)
async def edit_shard(
    rows: list[ManifestRow], output_dir: str, credentials: str | None, options: ShardOptions
) -> State:
    """Run one shard of the rows wherever the task runner puts it, with a client of its own.

    Credentials are loaded here (the block by name, or this process's environment), so the token
    never travels with the task. Failed if any row of the shard did not succeed.
    """
    log = get_run_logger()
    log.info("Shard of %d row(s) in process %d on %s", len(rows), os.getpid(), socket.gethostname())
    client = await _run_client(
        credentials, options.prefer_wait, options.max_creates_per_minute, options.concurrency, log
    )
    async with client:
        outcome = await run_shard(
            rows,
            Path(output_dir),
            client,
            concurrency=options.concurrency,
            settings=options.settings,
            log=log,
        )
    counts = Counter(r["status"] for r in outcome.results)
    failed = [r for r in outcome.results if r["status"] in FAILURE_STATUSES]
    if failed or outcome.stopped:
        reasons = "; ".join(f"{r['id']}: {r['error']}" for r in failed[:20])
        return Failed(message=f"{dict(counts)}: {outcome.stopped or reasons}", data=outcome)
    return Completed(message=str(dict(counts)), data=outcome)


def _spreads_over_processes() -> bool:
    """Whether this flow run's task runner runs tasks outside this process (Dask, Ray, ...)."""
    context = FlowRunContext.get()
    return context is not None and not isinstance(context.task_runner, ThreadPoolTaskRunner)


def _split(rows: list[ManifestRow], parts: int) -> list[list[ManifestRow]]:
    """`rows` in `parts` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(rows), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [rows[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


async def _run_in_shards(
    run: CatalogRun,
    todo: list[ManifestRow],
    *,
    shards: int,
    out: Path,
    credentials: str | None,
    concurrency: int,
    max_creates_per_minute: float,
    prefer_wait: int | None,
    settings: RunSettings,
) -> str | None:
    """Submit the rows to the flow's task runner in `shards` task runs; why the run stopped, if it did.

    Rows are in flight at once in every shard, so each gets ``1/shards`` of `concurrency` and of
    `max_creates_per_minute`: together they never exceed the run's limits.
    """
    log = get_run_logger()
    chunks = _split(todo, max(1, min(shards, len(todo))))
    options = ShardOptions(
        concurrency=max(1, concurrency // len(chunks)),
        max_creates_per_minute=max_creates_per_minute / len(chunks),
        prefer_wait=prefer_wait,
        settings=settings,
    )
    log.info(
        "Spreading %d row(s) over %d shard(s) of the task runner, %d in flight and %.4g creates/min each",
        len(todo),
        len(chunks),
        options.concurrency,
        options.max_creates_per_minute,
    )
    futures: list[PrefectFuture[Any]] = []
    api_url = PREFECT_API_URL.value()
    if not api_url:
        # Prefect's embedded server: tell the shards where it is (the settings travel with each
        # task), or every worker process starts an embedded server of its own, ~10 s each, and
        # records the shards' task runs and logs there, out of this run's sight.
        async with get_client() as prefect_client:
            api_url = str(prefect_client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        for number, rows in enumerate(chunks, 1):
            span = rows[0].id if len(rows) == 1 else f"{rows[0].id}..{rows[-1].id}"
            name = f"edit-shard-{number}-of-{len(chunks)} {span} ({len(rows)} row{'s' * (len(rows) > 1)})"
            futures.append(
                edit_shard.with_options(task_run_name=name).submit(rows, str(out), credentials, options)
            )
    by_id = {row.id: row for row in todo}
    follower = JournalFollower(out / ".kontext" / "journal.jsonl")

    def follow() -> None:  # rows other processes finished, for the progress artifact and results
        for event in follower.read_new():
            row = by_id.get(event.get("id"))
            if event.get("event") == "finished" and row and event.get("input_hash") == row.input_hash:
                run.set_result(row, event["result"])

    async def following() -> None:
        while True:
            await asyncio.sleep(1.0)
            follow()

    follower_task = asyncio.create_task(following())
    try:
        await asyncio.to_thread(wait, futures)
    finally:
        follower_task.cancel()
    follow()
    stopped = None
    for number, (rows, future) in enumerate(zip(chunks, futures, strict=True), 1):
        outcome = await future.state.aresult(raise_on_failure=False)
        if isinstance(outcome, ShardOutcome):
            for row, result in zip(rows, outcome.results, strict=True):
                run.set_result(row, result)
            stopped = stopped or outcome.stopped
            continue
        # The shard's task run crashed (its worker was lost, its credentials would not load):
        # rows it did not finish stay pending; the journal lets the next run resume them.
        reason = f"shard {number} of {len(chunks)} did not finish: {future.state.message or outcome}"
        log.error(reason)
        for row in rows:
            if (result := run.result_of(row))["status"] == "pending":
                run.set_result(row, {**result, "error": reason})
        stopped = stopped or reason
    return stopped


@flow(name="edit-catalog", flow_run_name=_flow_run_name, log_prints=True)
async def edit_catalog(
    manifest: str,
    output_dir: str = "catalog-output",
    results: str | None = None,
    credentials: str | None = None,
    aspect_ratio: AspectRatio = "match_input_image",
    num_inference_steps: int = 28,
    guidance: float = 2.5,
    seed: int | None = None,
    output_format: OutputFormat = "jpg",
    output_quality: int = 80,
    disable_safety_checker: bool = False,
    go_fast: bool = True,
    concurrency: int = 16,
    max_creates_per_minute: float = 600,
    prediction_timeout: float = 600,
    max_failure_ratio: float = 0.1,
    prefer_wait: int | None = 10,
    max_task_runs: int = 500,
    shards: int | None = None,
    artifact_key: str | None = None,
) -> CatalogSummary:
    """Edit every image of a CSV manifest with FLUX.1 Kontext [dev]; write a results manifest.

    Every row is checked before anything is spent (a bad row is recorded ``invalid`` with the field
    and value at fault). Rows done in an earlier run with the same inputs are ``skipped``; rows a
    crashed run left mid-flight are resumed by their prediction id. Predictions run with at most
    `concurrency` in flight and `max_creates_per_minute` creates a minute, each canceled if it
    has not finished within `prediction_timeout` seconds. The results manifest (one row per input
    row, input order) is refreshed while the run goes and written atomically.

    Args:
        manifest: CSV path or fsspec URL with columns ``image_url`` (or ``input_image``) and
            ``prompt``; optional ``id`` and per-row model inputs (``guidance``, ``seed``, ...).
        output_dir: Local directory for the edited images and the run journal.
        results: Where the results CSV goes; default ``<output_dir>/results.csv``.
        credentials: Name of a saved `ReplicateCredentials` block; default the environment
            (``REPLICATE_API_TOKEN``, ``REPLICATE_BASE_URL``).
        aspect_ratio, num_inference_steps, guidance, seed, output_format, output_quality,
            disable_safety_checker, go_fast: Model input defaults for rows that do not set them.
        concurrency: Predictions in flight at once.
        max_creates_per_minute: Create rate limit shared by all rows (Replicate's is 600).
        prediction_timeout: Seconds a prediction may take before it is canceled.
        max_failure_ratio: The run ends Failed when more than this share of rows did not succeed.
        prefer_wait: Seconds a create may wait for the result (``Prefer: wait``), or None.
        max_task_runs: Rows are grouped so that the run has at most about this many task runs.
        shards: Only with a task runner that runs tasks in other processes or on other machines
            (``edit_catalog.with_options(task_runner=DaskTaskRunner(...))``): the rows are split
            into this many task runs, each with its own client and ``1/shards`` of `concurrency`
            and `max_creates_per_minute`. Default: one per 8 of `concurrency`. The output
            directory must be one every worker sees (a shared filesystem on a real cluster).
        artifact_key: Key prefix for the run's artifacts (default from the manifest name), stable
            across runs so that they can be compared in the UI.

    Returns:
        A `CatalogSummary`.

    Example:
        ```python
        from flows.edit_catalog import edit_catalog

        summary = edit_catalog(
            manifest="examples/manifest.csv",
            output_dir="demo-output",
            credentials="catalog",
            output_format="jpg",
        )
        print(summary.counts)
        ```
    """
    log = get_run_logger()
    defaults = {
        "aspect_ratio": aspect_ratio,
        "num_inference_steps": num_inference_steps,
        "guidance": guidance,
        "seed": seed,
        "output_format": output_format,
        "output_quality": output_quality,
        "disable_safety_checker": disable_safety_checker,
        "go_fast": go_fast,
    }
    if "://" in output_dir and not output_dir.startswith("file://"):
        raise ValueError(
            f"output_dir must be a local directory, got {output_dir!r} (remote output is not supported yet)"
        )
    checked = load_manifest(manifest, defaults)
    out = Path(output_dir.removeprefix("file://"))
    results_file = Path(results) if results else out / "results.csv"
    stem = Path(str(manifest).rstrip("/")).stem or "catalog"
    key = artifact_key or f"catalog-{stem}"
    extra_columns = [c for c in checked.columns if c not in ("id", "image_url", "prompt")]
    await tag_flow_run(["flux-kontext-dev", f"manifest:{stem}"])
    log.info(
        "Manifest %s: %d rows, %d valid, %d invalid",
        manifest,
        len(checked.rows),
        len(checked.valid_rows),
        len(checked.invalid_rows),
    )
    for row in checked.invalid_rows[:20]:
        log.warning("Row %d (id %s) is invalid: %s", row.index + 1, row.id, row.error)

    client = await _run_client(credentials, prefer_wait, max_creates_per_minute, concurrency, log)
    started = datetime.now(UTC)
    settings = RunSettings(prediction_timeout=prediction_timeout)
    stopped: str | None = None
    async with client:  # closed however the run ends (a locked output directory included)
        with Journal(out) as journal:
            dirty = asyncio.Event()
            run = CatalogRun(
                checked,
                out,
                client,
                journal,
                concurrency=concurrency,
                settings=settings,
                on_result=lambda index, result: dirty.set(),
                log=log,
            )
            todo = run.rows_to_run
            log.info(
                "%d row(s) to run, %d skipped as already done",
                len(todo),
                sum(r["status"] == "skipped" for r in run.results),
            )

            def refresh() -> None:
                write_csv_atomic(results_frame(run.results, extra_columns), results_file)

            remove_stale_temporaries(results_file)
            refresh()
            await publish_progress(key, run.results, started)

            async def refresher() -> None:
                while True:
                    await dirty.wait()
                    dirty.clear()
                    await asyncio.to_thread(refresh)
                    await publish_progress(key, run.results, started)
                    await asyncio.sleep(2.0)  # at most one refresh every 2 s, however many rows end

            size = max(1, math.ceil(len(todo) / max(1, max_task_runs)))
            groups = [todo[i : i + size] for i in range(0, len(todo), size)]
            in_flight = asyncio.Semaphore(max(1, math.ceil(concurrency / size)) + 1)

            async def run_group(rows: list[ManifestRow]) -> None:
                async with in_flight:
                    if run.stopped is None:
                        await edit_rows.with_options(task_run_name=_group_name(rows))(
                            run, rows, return_state=True
                        )
                    else:
                        await asyncio.gather(*(run.run_row(row) for row in rows))

            refresher_task = asyncio.create_task(refresher())
            try:
                # No `tags(...)` around the task runs: a tagged task run acquires tag concurrency
                # slots through one serialised service, which measured 2.4 s before the first row
                # started and stalls of ~1.8 s later (B1). The flow run carries the tags instead.
                if _spreads_over_processes() and todo:
                    stopped = await _run_in_shards(
                        run,
                        todo,
                        shards=shards or math.ceil(concurrency / 8),
                        out=out,
                        credentials=credentials,
                        concurrency=concurrency,
                        max_creates_per_minute=max_creates_per_minute,
                        prefer_wait=prefer_wait,
                        settings=settings,
                    )
                else:
                    await asyncio.gather(*(run_group(rows) for rows in groups))
                    stopped = str(run.stopped) if run.stopped else None
            finally:
                refresher_task.cancel()
                refresh()
    finished = datetime.now(UTC)

    counts = Counter(r["status"] for r in run.results)
    total = len(run.results)
    failures = [r for r in run.results if r["status"] in FAILURE_STATUSES]
    summary = CatalogSummary(
        manifest=str(manifest),
        output_dir=str(out),
        results=str(results_file),
        total=total,
        counts=dict(counts),
        failure_ratio=len(failures) / total if total else 0.0,
        stopped_reason=stopped,
        failures=[{"id": r["id"], "status": r["status"], "error": r["error"]} for r in failures],
    )
    images = [row.edit.input_image if row.edit else row.image_url for row in checked.rows]
    await publish_final_artifacts(key, run.results, summary, started, finished, MODEL, images)
    log.info("Done: %s; results in %s", dict(counts), results_file)
    if stopped is not None:
        return Failed(
            message=f"Run stopped: {stopped}. Rows not attempted are pending and will run next time.",
            data=summary,
        )
    if summary.failure_ratio > max_failure_ratio:
        return Failed(
            message=f"{len(failures)} of {total} rows did not succeed "
            f"({summary.failure_ratio:.1%} > max_failure_ratio {max_failure_ratio:.1%})",
            data=summary,
        )
    return summary
