"""The run journal: a durable, append-only record of every prediction a catalog run makes.

Lives at ``<output_dir>/.kontext/journal.jsonl``. Before a create is sent, a ``creating`` line is on
disk; the moment the API answers, a ``created`` line with the prediction id; when the row ends, a
``finished`` line with its result. A run that crashes anywhere can therefore be resumed: a row
with a prediction id is polled (not created again), a row caught between ``creating`` and
``created`` is looked up in the predictions list, and a row that finished with the same inputs and
whose file is still there is skipped.

Writes use group commit: records that arrive while a write is in progress go to disk together
with one ``fsync``, so durability costs little even with many rows in flight.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kontext.errors import KontextError

JOURNAL_DIR = ".kontext"
JOURNAL_FILE = "journal.jsonl"


class JournalLockedError(KontextError):
    """Another run is using the same output directory."""


@dataclass
class RowState:
    """What the journal knows about one row's latest inputs.

    Attributes:
        input_hash: The inputs the state is about; a changed row starts a fresh state.
        creating: The ``creating`` record of a create whose answer was never recorded.
        prediction: The last created prediction (id, status, output, synthetic), if any.
        result: The last ``finished`` result row, if any.
    """

    input_hash: str | None = None
    creating: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    result: dict[str, Any] | None = None


@dataclass
class JournalState:
    rows: dict[str, RowState] = field(default_factory=dict)
    #: Every prediction id the journal has ever recorded (never adopt one of these twice).
    prediction_ids: set[str] = field(default_factory=set)


def read_journal(path: Path) -> JournalState:
    """Fold a journal file into per-row state. A torn last line (a crash mid-write) is ignored."""
    state = JournalState()
    if not path.exists():
        return state
    with open(path, "rb") as handle:
        for event in _parse_lines(handle):
            apply_event(state, event)
    return state


def _parse_lines(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The records of journal lines; a line torn by a killed writer is skipped."""
    for line in lines:
        try:
            yield json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue


def apply_event(state: JournalState, event: dict[str, Any]) -> None:
    row_id, input_hash, kind = event.get("id"), event.get("input_hash"), event.get("event")
    if row_id is None:
        return
    row = state.rows.get(row_id)
    if row is None or row.input_hash != input_hash:
        row = state.rows[row_id] = RowState(input_hash=input_hash)
    if kind == "creating":
        row.creating, row.prediction, row.result = event, None, None
    elif kind == "created":
        row.creating, row.prediction = None, event.get("prediction")
        state.prediction_ids.add(event["prediction"]["id"])
    elif kind == "finished":
        row.creating, row.result = None, event.get("result")


class Journal:
    """Appends records durably; holds an exclusive lock on the output directory while open.

    Args:
        output_dir: The run's output directory (the journal lives in its ``.kontext`` folder).
        durable: fsync every batch of records.
        exclusive: Take the directory's lock (the run that owns the directory). A shard of a run
            spread over several processes (a Dask task runner) opens it with ``exclusive=False``:
            the owning run holds the lock, and every writer locks the file for each append.
    """

    def __init__(self, output_dir: Path, *, durable: bool = True, exclusive: bool = True):
        self.dir = Path(output_dir) / JOURNAL_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / JOURNAL_FILE
        self.durable = durable
        self.exclusive = exclusive
        self._lock_fd: int | None = None
        if exclusive:
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise JournalLockedError(
                    f"another run is writing to {output_dir} (lock {self.dir / 'lock'}); "
                    "wait for it to finish or use another output directory"
                ) from None
        self.state = read_journal(self.path)
        self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, event: dict[str, Any]) -> None:
        """Append `event`; returns once it is on disk (written and, if durable, fsynced)."""
        apply_event(self.state, event)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((json.dumps(event, separators=(",", ":"), default=str), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await future

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write, [line for line, _ in batch])
            except Exception as exc:  # surface the failure to every waiter
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write(self, lines: list[str]) -> None:
        # Whole lines only, one writer at a time: shards in other processes append to this file too.
        fd = self._file.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            # A writer killed mid-line left a torn record: start on a line of our own, or the
            # first record written after it would be glued to it and lost when read.
            torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
            self._file.write("\n" * torn + "".join(line + "\n" for line in lines))
            self._file.flush()
            if self.durable:
                os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._file.close()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class JournalFollower:
    """The records appended to a journal since the last look: whole lines only, in order.

    The run that spreads its rows over other processes follows their progress this way.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._rest = b""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        *lines, self._rest = (self._rest + data).split(b"\n")
        return list(_parse_lines(lines))
