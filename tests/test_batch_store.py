"""The batch store: rows on disk, survive a reopen, pages, and clear errors for what it can't read."""

from __future__ import annotations

import sqlite3

import pytest

from netota_daemon.daemon.batch_store import BatchRow, BatchStore, BatchStoreError


def test_batches_survive_a_reopen_and_only_unfinished_ones_are_active(tmp_path):
    store = BatchStore(tmp_path)
    store.create(BatchRow("b1", 1.0, "fw.ufw", "running", {"policy": {"state": "running"}}))
    store.create(BatchRow("b2", 2.0, "fw.ufw", "preflight", {"policy": {}}))
    store.save("b1", "finished", {"policy": {"state": "finished"}})
    store.close()
    reopened = BatchStore(tmp_path)
    assert reopened.get("b1") == BatchRow("b1", 1.0, "fw.ufw", "finished", {"policy": {"state": "finished"}})
    assert [r.id for r in reopened.active()] == ["b2"]
    assert reopened.get("nope") is None


def test_the_same_file_as_the_job_journal_holds_both(tmp_path):
    from netota_daemon.daemon.journal import JobJournal, JobRecord

    journal = JobJournal(tmp_path)
    journal.create(JobRecord(id="j1", device="a", firmware="fw.ufw"))
    store = BatchStore(tmp_path)
    store.create(BatchRow("b1", 1.0, "fw.ufw", "running", {}))
    assert journal.get("j1") is not None and store.get("b1") is not None
    assert store.path == journal.path


def test_a_row_this_version_cant_read_is_a_clear_error(tmp_path):
    store = BatchStore(tmp_path)
    store.create(BatchRow("b1", 1.0, "fw.ufw", "running", {}))
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    db.execute("UPDATE batches SET data = '[1, 2' WHERE id = 'b1'")
    db.commit()
    with pytest.raises(BatchStoreError, match="batch 'b1' in the journal can't be read"):
        store.get("b1")


def test_an_unusable_state_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BatchStoreError, match="can't open the batch journal"):
        BatchStore(tmp_path / "file")


def test_only_the_newest_ended_batches_are_kept(tmp_path):
    store = BatchStore(tmp_path)
    for n in range(1, 8):
        store.create(BatchRow(f"b{n}", float(n), "fw.ufw", "running" if n == 2 else "finished", {}))
    assert store.prune(keep=3) == 3  # b1, b3, b4: b2 is unfinished and stays
    assert [r.id for r in store.page(limit=10).rows] == ["b7", "b6", "b5", "b2"]
    assert store.prune(keep=3) == 0
