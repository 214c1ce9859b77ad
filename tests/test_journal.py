"""The run journal: durable records, torn lines, one run per output directory."""

from __future__ import annotations

import asyncio

import pytest

from kontext.journal import Journal, JournalLockedError, read_journal


def test_records_fold_into_row_state(tmp_path):
    async def write():
        with Journal(tmp_path) as journal:
            await asyncio.gather(
                journal.record({"event": "creating", "id": "a", "input_hash": "h1", "sent_at": "t"}),
                journal.record({"event": "creating", "id": "b", "input_hash": "h1", "sent_at": "t"}),
            )
            await journal.record(
                {"event": "created", "id": "a", "input_hash": "h1", "prediction": {"id": "p1"}}
            )
            await journal.record(
                {"event": "finished", "id": "a", "input_hash": "h1", "result": {"status": "ok"}}
            )
            await journal.record(
                {"event": "created", "id": "c", "input_hash": "h1", "prediction": {"id": "p2"}}
            )
            await journal.record({"event": "creating", "id": "c", "input_hash": "h2", "sent_at": "t"})

    asyncio.run(write())
    with open(tmp_path / ".kontext" / "journal.jsonl", "a") as handle:
        handle.write('{"event": "finished", "id": "b", "inp')  # a crash mid-write
    state = read_journal(tmp_path / ".kontext" / "journal.jsonl")
    assert state.rows["a"].prediction == {"id": "p1"} and state.rows["a"].result == {"status": "ok"}
    assert state.rows["b"].creating is not None and state.rows["b"].prediction is None
    assert state.rows["c"].input_hash == "h2" and state.rows["c"].prediction is None  # changed row
    assert state.prediction_ids == {"p1", "p2"}


def test_one_run_per_output_directory(tmp_path):
    with Journal(tmp_path):
        with pytest.raises(JournalLockedError, match="another run"):
            Journal(tmp_path)
    Journal(tmp_path).close()  # released on close
