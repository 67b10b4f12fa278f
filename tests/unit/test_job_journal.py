"""The job journal's progress files: written off the caller's thread, in order, the latest progress winning."""

from __future__ import annotations

import json
import threading

from scheduler import job_journal
from scheduler.job_journal import JobJournal, JobProgress
from scheduler.jobs import JobStatus


def _progress(step: int, status: JobStatus = JobStatus.RUNNING) -> JobProgress:
    return JobProgress(status, start_version=0, step=step, last_loss=0.5, error=None, created_at=1.0)


def _on_disk(journal: JobJournal, job_id: str) -> dict:
    return json.loads((journal.root / f"{job_id}.progress.json").read_text())


def test_flush_leaves_each_jobs_latest_progress_on_disk(tmp_path):
    journal = JobJournal(tmp_path)
    for step in (1, 2, 3):
        journal.save_progress("job-a", _progress(step))
    journal.save_progress("job-b", _progress(7, JobStatus.PAUSED))
    journal.flush()
    assert _on_disk(journal, "job-a")["step"] == 3
    job_b = _on_disk(journal, "job-b")
    assert (job_b["step"], job_b["status"]) == (7, "paused")


def test_a_save_returns_while_the_disk_is_stuck_and_a_later_save_still_lands_last(tmp_path, monkeypatch):
    """The step loop runs on the service's event loop: a write that waits on the file system must not hold it."""
    real_write = job_journal._write_atomic
    writing, release = threading.Event(), threading.Event()

    def stuck_write(path, payload):
        writing.set()
        assert release.wait(10.0), "the test never released the write"
        real_write(path, payload)

    monkeypatch.setattr(job_journal, "_write_atomic", stuck_write)
    journal = JobJournal(tmp_path)
    journal.save_progress("job-a", _progress(1))  # returns although its write cannot finish yet
    assert writing.wait(10.0)
    journal.save_progress("job-a", _progress(2))  # queued behind the stuck write
    journal.save_progress("job-a", _progress(3, JobStatus.SUCCEEDED))  # replaces the queued one
    assert not (tmp_path / "job-a.progress.json").exists()
    release.set()
    journal.flush()
    on_disk = _on_disk(journal, "job-a")
    assert (on_disk["step"], on_disk["status"]) == (3, "succeeded")


def test_a_failed_write_is_logged_and_later_saves_still_work(tmp_path, monkeypatch, caplog):
    real_write = job_journal._write_atomic
    calls = []

    def failing_once(path, payload):
        calls.append(payload["step"])
        if len(calls) == 1:
            raise OSError("disk full")
        real_write(path, payload)

    monkeypatch.setattr(job_journal, "_write_atomic", failing_once)
    journal = JobJournal(tmp_path)
    journal.save_progress("job-a", _progress(1))
    journal.flush()
    journal.save_progress("job-a", _progress(2))
    journal.flush()
    assert "could not write the progress of job job-a" in caplog.text
    assert _on_disk(journal, "job-a")["step"] == 2


def test_a_save_that_waits_is_on_disk_when_it_returns(tmp_path, monkeypatch):
    """A status change waits for its write (and those queued before it), however slow the disk."""
    real_write = job_journal._write_atomic
    release = threading.Event()

    def slow_write(path, payload):
        assert release.wait(10.0), "the test never released the write"
        real_write(path, payload)

    monkeypatch.setattr(job_journal, "_write_atomic", slow_write)
    journal = JobJournal(tmp_path)
    journal.save_progress("job-a", _progress(4))
    threading.Timer(0.2, release.set).start()  # the disk comes back only after save_progress was called
    journal.save_progress("job-a", _progress(5, JobStatus.CANCELLED), wait=True)  # no flush() needed
    on_disk = _on_disk(journal, "job-a")
    assert (on_disk["step"], on_disk["status"]) == (5, "cancelled")
