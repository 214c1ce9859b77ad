"""The run journal: durable records, torn lines, one run per output directory."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from pathlib import Path

import pytest

from kontext.journal import Journal, JournalFollower, JournalLockedError, read_journal


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


def test_a_record_written_after_a_torn_line_is_kept(tmp_path):
    path = tmp_path / ".kontext" / "journal.jsonl"
    path.parent.mkdir()
    path.write_text('{"event": "created", "id": "a", "input_hash": "h", "prediction": {"id": "p1"}}\n{"ev')

    async def write():
        with Journal(tmp_path) as journal:
            await journal.record(
                {"event": "created", "id": "b", "input_hash": "h", "prediction": {"id": "p2"}}
            )

    asyncio.run(write())
    assert read_journal(path).prediction_ids == {"p1", "p2"}


def _append_from_another_process(output_dir: str, writer: int, records: int) -> None:
    async def write():
        with Journal(Path(output_dir), exclusive=False, durable=False) as journal:
            for batch in range(0, records, 10):
                await asyncio.gather(
                    *(
                        journal.record(
                            {
                                "event": "created",
                                "id": f"w{writer}-{i}",
                                "input_hash": "h" * 200,  # long lines make interleaving likelier
                                "prediction": {"id": f"p{writer}-{i}"},
                            }
                        )
                        for i in range(batch, batch + 10)
                    )
                )

    asyncio.run(write())


def test_shards_in_other_processes_append_whole_lines_while_the_owner_holds_the_lock(tmp_path):
    # A run spread over processes (a Dask task runner): the flow's process owns the directory,
    # every shard appends to the same journal.
    with Journal(tmp_path) as owner:
        with multiprocessing.get_context("spawn").Pool(3) as pool:
            pool.starmap(_append_from_another_process, [(str(tmp_path), w, 200) for w in range(3)])
        with pytest.raises(JournalLockedError):
            Journal(tmp_path)  # a second run is still refused
        assert owner.exclusive
    lines = (tmp_path / ".kontext" / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 600
    assert all(json.loads(line)["event"] == "created" for line in lines)
    assert len(read_journal(tmp_path / ".kontext" / "journal.jsonl").prediction_ids) == 600


def test_the_follower_reads_whole_new_lines_once(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "created", "id": "old"}\n')
    follower = JournalFollower(path)  # starts at the end: only what is appended from now on
    assert follower.read_new() == []
    with open(path, "a") as handle:
        handle.write('{"event": "finished", "id": "a"}\n{"event": "finis')  # a line being written
        handle.flush()
        assert [e["id"] for e in follower.read_new()] == ["a"]
        handle.write('hed", "id": "b"}\n{"torn\n{"event": "finished", "id": "c"}\n')
    assert [e["id"] for e in follower.read_new()] == ["b", "c"]  # the torn line is skipped
    assert follower.read_new() == []
