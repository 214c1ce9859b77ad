"""One catalog run's rows through create -> wait -> download, resumable and never paying twice.

`CatalogRun` is Prefect-free: the flow decides how rows are grouped into Prefect task runs and
calls `CatalogRun.run_row` for each row; everything a row needs to go right lives here:

* a row already done with the same inputs, whose output file is still there, is ``skipped``;
* a row with a journaled prediction id is resumed by that id (polled, downloaded), not created;
* a create is journaled (``creating``) before it is sent and (``created``) the moment it answers;
  a create whose answer was lost is looked up in the predictions list before anything else;
* every create waits on one shared rate limiter (inside the client) and a bound on rows in flight;
* 401 and 402 stop the run: rows not yet started stay ``pending`` (unspent, resumable);
* every row ends with a result: its status, and for anything but success, the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kontext.client import DownloadedFile, ReplicateClient, input_fingerprint
from kontext.errors import (
    AccountError,
    AmbiguousCreateError,
    KontextError,
    NotFoundError,
    PredictionAbortedError,
    PredictionCanceledError,
    PredictionTimeoutError,
)
from kontext.journal import Journal, RowState
from kontext.manifest import Manifest, ManifestRow
from kontext.schema import Prediction

logger = logging.getLogger("kontext.engine")
Log = logging.Logger | logging.LoggerAdapter[Any]


class _CreateUnresolved(KontextError):
    """A create's outcome is unknown and no matching prediction could be found."""


@dataclass(frozen=True)
class RunSettings:
    """How each row's prediction is run.

    Attributes:
        prediction_timeout: Seconds from create to a finished prediction; then it is canceled.
        poll_interval: First wait between polls (grows to `max_poll_interval`).
        max_poll_interval: Cap on the wait between polls.
        server_deadline_margin: Seconds past `prediction_timeout` after which the API itself
            cancels the prediction (``Cancel-After``), so a crashed run cannot leave it running.
    """

    prediction_timeout: float = 600.0
    poll_interval: float = 0.5
    max_poll_interval: float = 5.0
    server_deadline_margin: float = 60.0


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _prediction_record(prediction: Prediction) -> dict[str, Any]:
    return {
        "id": prediction.id,
        "status": prediction.status,
        "output": prediction.output,
        "synthetic": prediction.synthetic,
        "created_at": _iso(prediction.created_at),
    }


class CatalogRun:
    """The rows of one manifest (or one shard of it), run into one output directory.

    Args:
        manifest: The checked manifest, or the rows of one shard of it (a run spread over
            processes); `results` follow this order.
        output_dir: Where output files and the journal go.
        client: The API client (its rate limiter is shared by all rows).
        journal: The run journal of `output_dir`.
        concurrency: Rows in flight at once.
        settings: `RunSettings`.
        on_result: Called with each row's final result as it is known.
        log: Where progress lines go (a Prefect run logger in a flow).
    """

    def __init__(
        self,
        manifest: Manifest | Sequence[ManifestRow],
        output_dir: Path,
        client: ReplicateClient,
        journal: Journal,
        *,
        concurrency: int = 16,
        settings: RunSettings | None = None,
        on_result: Callable[[int, dict[str, Any]], Any] | None = None,
        log: Log | None = None,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.rows = list(manifest.rows if isinstance(manifest, Manifest) else manifest)
        self._position = {row.index: position for position, row in enumerate(self.rows)}
        self.output_dir = Path(output_dir)
        self.client = client
        self.journal = journal
        self.settings = settings or RunSettings()
        self.on_result = on_result
        self.log = log or logger
        self._slots = asyncio.Semaphore(concurrency)
        self.stopped: AccountError | None = None
        if journal.exclusive:
            # Downloads a killed run left half-written (we hold the directory's lock: no shard of
            # this run has started yet, and no other run can be writing).
            for partial in self.output_dir.glob(".*.part"):
                partial.unlink(missing_ok=True)
        self.results: list[dict[str, Any]] = [self.planned(row) for row in self.rows]

    # ------------------------------------------------------------------ planning

    def _state(self, row: ManifestRow) -> RowState | None:
        state = self.journal.state.rows.get(row.id)
        return state if state is not None and state.input_hash == row.input_hash else None

    def planned(self, row: ManifestRow) -> dict[str, Any]:
        """The row's result before it runs: ``invalid``, ``skipped`` or ``pending``."""
        if not row.valid:
            return self._result(row, "invalid", error=row.error)
        state = self._state(row)
        done = state.result if state else None
        if done and done.get("status") in ("succeeded", "skipped") and self._output_intact(row, done):
            return {**self._result(row, "skipped"), **_carried(done)}
        return self._result(row, "pending")

    def _output_intact(self, row: ManifestRow, done: dict[str, Any]) -> bool:
        """The file the earlier run saved is still where this run would save it.

        Compared by name, not by the recorded path, so that a run from another working directory
        (a relative ``output_dir``) still recognises its outputs.
        """
        recorded = done.get("output_path")
        path = self.output_dir / row.output_filename
        return bool(recorded) and Path(recorded).name == path.name and path.is_file()

    @property
    def rows_to_run(self) -> list[ManifestRow]:
        return [
            row for row, result in zip(self.rows, self.results, strict=True) if result["status"] == "pending"
        ]

    # ------------------------------------------------------------------ one row

    async def run_row(self, row: ManifestRow, log: Log | None = None) -> dict[str, Any]:
        """Run one planned row to its end and return (and journal) its result.

        Args:
            row: A row of `rows_to_run`.
            log: Where this row's progress lines go (default the run's logger).
        """
        if self.stopped is None:
            async with self._slots:
                if self.stopped is None:
                    result = await self._run(row, log or self.log)
                    await self.journal.record(
                        {"event": "finished", "id": row.id, "input_hash": row.input_hash, "result": result}
                    )
                    return self.set_result(row, result)
        reason = f"not attempted: the run stopped after an account error ({self.stopped})"
        return self.set_result(row, self._result(row, "pending", error=reason))

    def result_of(self, row: ManifestRow) -> dict[str, Any]:
        """`row`'s current result."""
        return self.results[self._position[row.index]]

    def set_result(self, row: ManifestRow, result: dict[str, Any]) -> dict[str, Any]:
        """Record `row`'s result (also one a shard in another process reported)."""
        self.results[self._position[row.index]] = result
        if self.on_result is not None:
            self.on_result(row.index, result)
        return result

    async def _run(self, row: ManifestRow, log: Log) -> dict[str, Any]:
        prediction: Prediction | None = None
        try:
            prediction = await self._resume(row, log)
            if prediction is None:
                prediction = await self._create(row, log)
            if not prediction.is_terminal:
                prediction = await self.client.wait_for_prediction(
                    prediction,
                    timeout=self._time_left(prediction),
                    poll_interval=self.settings.poll_interval,
                    max_poll_interval=self.settings.max_poll_interval,
                )
            self.client.raise_for_status(prediction)
            assert row.edit is not None
            saved = await self.client.download_output(
                prediction.output_urls[0],
                self.output_dir / row.output_filename,
                expected_format=row.edit.output_format,
            )
        except _CreateUnresolved as exc:
            return self._result(row, "unknown", error=str(exc))
        except AccountError as exc:
            if self.stopped is None:
                self.stopped = exc
                log.error("Stopping the run: %s", exc)
            return self._result(row, "failed", prediction, error=str(exc))
        except PredictionTimeoutError as exc:
            status = "canceled" if exc.canceled else "failed"
            what = "canceled" if exc.canceled else "the cancel request failed"
            error = (
                f"prediction {exc.prediction.id} did not finish within "
                f"{self.settings.prediction_timeout:g}s ({what}; last status {exc.prediction.status})"
            )
            log.warning("%s: %s", row.id, error)
            return self._result(row, status, exc.prediction, error=error)
        except (PredictionCanceledError, PredictionAbortedError) as exc:
            return self._result(row, "canceled", exc.prediction, error=str(exc))
        except KontextError as exc:
            log.warning("%s: %s", row.id, exc)
            return self._result(row, "failed", getattr(exc, "prediction", prediction), error=str(exc))
        log.info(
            "%s: prediction %s saved to %s (%dx%d)",
            row.id,
            prediction.id,
            saved.path,
            saved.width,
            saved.height,
        )
        return self._result(row, "succeeded", prediction, saved)

    def _prefer_wait(self) -> int | None:
        """The client's ``Prefer: wait``, never longer than the prediction's own deadline."""
        wait = self.client.prefer_wait
        if wait is None:
            return None
        return max(1, min(wait, int(self.settings.prediction_timeout)))

    def _time_left(self, prediction: Prediction) -> float:
        """Our deadline counts from the prediction's creation, also across a resume."""
        if prediction.created_at is None:
            return self.settings.prediction_timeout
        age = (datetime.now(UTC) - prediction.created_at).total_seconds()
        return max(0.0, self.settings.prediction_timeout - max(0.0, age))

    async def _resume(self, row: ManifestRow, log: Log) -> Prediction | None:
        """The prediction an earlier (crashed or partial) run already made for this row, if usable."""
        state = self._state(row)
        if state is None:
            return None
        if state.prediction is None and state.creating is not None:
            sent_at = datetime.fromisoformat(state.creating["sent_at"])
            found = await self.client.find_prediction(
                state.creating["fingerprint"], sent_at, exclude=self.journal.state.prediction_ids
            )
            if found is None:
                log.info("%s: an earlier create left no prediction; creating", row.id)
                return None
            log.info("%s: adopting prediction %s from an interrupted create", row.id, found.id)
            await self._journal_created(row, found)
            return found
        known = state.prediction
        if known is None:
            return None
        if known.get("synthetic"):  # a proxy's finished answer: nothing to poll, only its URL
            if state.result is not None and state.result.get("status") not in ("succeeded", "skipped"):
                return None
            return Prediction(id=known["id"], status="succeeded", output=known["output"], synthetic=True)
        try:
            prediction = await self.client.get_prediction(known["id"])
        except NotFoundError:
            log.warning("%s: prediction %s is gone; creating anew", row.id, known["id"])
            return None
        if prediction.status in ("failed", "canceled", "aborted"):
            return None  # that attempt is over: a re-run tries again with a fresh create
        if prediction.status == "succeeded" and not prediction.output_urls:
            log.warning(
                "%s: prediction %s is past retention (output removed); creating anew", row.id, prediction.id
            )
            return None
        log.info("%s: resuming prediction %s (%s)", row.id, prediction.id, prediction.status)
        return prediction

    async def _create(self, row: ManifestRow, log: Log) -> Prediction:
        assert row.edit is not None
        api_input = row.edit.to_api(await self.client.prepare_input_image(row.edit.input_image))
        fingerprint = input_fingerprint(api_input)
        sent_at = datetime.now(UTC)
        await self.journal.record(
            {
                "event": "creating",
                "id": row.id,
                "input_hash": row.input_hash,
                "fingerprint": fingerprint,
                "sent_at": sent_at.isoformat(),
            }
        )
        try:
            prediction = await self.client.create_prediction(
                api_input,
                prefer_wait=self._prefer_wait(),
                cancel_after=self.settings.prediction_timeout + self.settings.server_deadline_margin,
            )
        except AmbiguousCreateError as exc:
            log.warning("%s: %s; looking for it", row.id, exc)
            prediction = await self.client.find_prediction(
                fingerprint, exc.sent_at, exclude=self.journal.state.prediction_ids
            )
            if prediction is None:
                raise _CreateUnresolved(
                    f"create outcome unknown ({exc}) and no matching prediction was found; "
                    "check the Replicate dashboard before re-running this row"
                ) from None
            log.info("%s: found prediction %s made by the lost create", row.id, prediction.id)
        await self._journal_created(row, prediction)
        log.info("%s: created prediction %s (%s)", row.id, prediction.id, prediction.status)
        return prediction

    async def _journal_created(self, row: ManifestRow, prediction: Prediction) -> None:
        await self.journal.record(
            {
                "event": "created",
                "id": row.id,
                "input_hash": row.input_hash,
                "prediction": _prediction_record(prediction),
            }
        )

    # ------------------------------------------------------------------ results

    def _result(
        self,
        row: ManifestRow,
        status: str,
        prediction: Prediction | None = None,
        saved: DownloadedFile | None = None,
        *,
        error: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": row.id,
            "image_url": row.image_url,
            "prompt": row.prompt,
            "status": status,
            "prediction_id": prediction.id if prediction else None,
            "output_url": (prediction.output_urls or [None])[0] if prediction else None,
            "output_path": str(saved.path) if saved else None,
            "sha256": saved.sha256 if saved else None,
            "width": saved.width if saved else None,
            "height": saved.height if saved else None,
            "error": error,
            "input_hash": row.input_hash,
            "created_at": _iso(prediction.created_at) if prediction else None,
            "completed_at": _iso(prediction.completed_at) if prediction else None,
            "predict_time_s": prediction.predict_time if prediction else None,
            **row.extra,
        }


_CARRIED = (
    "prediction_id",
    "output_url",
    "output_path",
    "sha256",
    "width",
    "height",
    "created_at",
    "completed_at",
    "predict_time_s",
)


def _carried(done: dict[str, Any]) -> dict[str, Any]:
    """What a skipped row keeps from the run that made its output."""
    return {key: done.get(key) for key in _CARRIED}


@dataclass
class ShardOutcome:
    """What one shard of a run spread over processes did.

    Attributes:
        results: One result per row of the shard, in the shard's order.
        stopped: Why the shard stopped early (an account error), or None.
    """

    results: list[dict[str, Any]]
    stopped: str | None = None

    def __repr__(self) -> str:  # Prefect logs a failed task's result: keep that line short
        counts = Counter(result["status"] for result in self.results)
        return f"ShardOutcome({dict(counts)}, stopped={self.stopped!r})"


async def run_shard(
    rows: Sequence[ManifestRow],
    output_dir: Path,
    client: ReplicateClient,
    *,
    concurrency: int = 16,
    settings: RunSettings | None = None,
    log: Log | None = None,
) -> ShardOutcome:
    """Run one shard of a catalog run in this process, with its own client.

    The run that owns `output_dir` planned the rows and holds the directory's lock; a shard appends
    to the same journal, re-reads it first (so a shard run again after its worker was lost resumes
    its predictions instead of creating them again) and never touches other shards' files.
    """
    with Journal(output_dir, exclusive=False) as journal:
        run = CatalogRun(
            rows, output_dir, client, journal, concurrency=concurrency, settings=settings, log=log
        )
        await asyncio.gather(*(run.run_row(row) for row in run.rows_to_run))
    return ShardOutcome(run.results, str(run.stopped) if run.stopped else None)
