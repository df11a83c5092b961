import pytest

from daemon.errors import QueueError
from daemon.jobqueue import JobQueue, original_name
from daemon.states import FailReason, JobState, Priority

NOW = 1_800_000_000.0


@pytest.fixture
def q(tmp_path):
    q = JobQueue(tmp_path / "queue")
    q.ensure()
    return q


def drop(tmp_path, name, data=b'{"text": "x"}\n'):
    p = tmp_path / "inbox" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def test_same_name_twice_never_overwrites(q, tmp_path):
    a = q.admit(drop(tmp_path, "data.jsonl", b"A\n"), Priority.NORMAL, NOW)
    b = q.admit(drop(tmp_path, "data.jsonl", b"B\n"), Priority.NORMAL, NOW)
    assert a.job_id != b.job_id
    assert a.original_name == b.original_name == "data.jsonl"
    assert a.path.read_bytes() == b"A\n" and b.path.read_bytes() == b"B\n"


def test_run_order_is_priority_then_arrival(q, tmp_path):
    low = q.admit(drop(tmp_path, "l.jsonl"), Priority.LOW, NOW)
    n1 = q.admit(drop(tmp_path, "n1.jsonl"), Priority.NORMAL, NOW + 1)
    hi = q.admit(drop(tmp_path, "h.jsonl"), Priority.HIGH, NOW + 2)
    n2 = q.admit(drop(tmp_path, "n2.jsonl"), Priority.NORMAL, NOW + 3)
    assert [e.job_id for e in q.pending()] == [hi.job_id, n1.job_id, n2.job_id, low.job_id]
    assert q.next_pending().job_id == hi.job_id


def test_sequence_survives_a_restart(q, tmp_path):
    a = q.admit(drop(tmp_path, "a.jsonl"), Priority.NORMAL, NOW)
    q2 = JobQueue(q.root)
    b = q2.admit(drop(tmp_path, "a.jsonl"), Priority.NORMAL, NOW)  # same second, same name
    assert b.job_id > a.job_id


def test_full_life_cycle_and_counts(q, tmp_path):
    e = q.admit(drop(tmp_path, "x.jsonl"), Priority.HIGH, NOW)
    assert q.counts()["pending_high"] == 1
    e = q.start(e)
    assert e.state is JobState.PROCESSING and q.counts()["processing"] == 1
    q.finish(e.job_id)
    assert q.counts() == {"pending_high": 0, "pending_normal": 0, "pending_low": 0, "pending": 0,
                          "processing": 0, "done": 1, "failed": 0}


def test_fail_writes_reason_beside_file_then_retry(q, tmp_path):
    e = q.start(q.admit(drop(tmp_path, "x.jsonl"), Priority.NORMAL, NOW))
    q.fail(e.job_id, FailReason.TRAINING_ERROR, "boom", NOW, traceback="tb")
    err = q.read_error(e.job_id)
    assert err["reason"] == "training_error" and err["message"] == "boom" and err["original_name"] == "x.jsonl"
    assert [f.job_id for f in q.failed()] == [e.job_id]  # the .error.json is not listed as a job
    back = q.retry(e.job_id, Priority.LOW, NOW)
    assert back.state is JobState.PENDING and back.priority is Priority.LOW
    assert q.read_error(e.job_id) is None
    assert (q.folder(JobState.FAILED) / (e.job_id + ".error.json.prev")).exists()


def test_reject_and_remove(q, tmp_path):
    r = q.reject(drop(tmp_path, "bad.jsonl", b"\xff\xfe"), {"reason": "invalid_data", "message": "not UTF-8"}, NOW)
    assert r.state is JobState.FAILED and r.path.read_bytes() == b"\xff\xfe"
    p = q.admit(drop(tmp_path, "p.jsonl"), Priority.NORMAL, NOW)
    q.remove(p.job_id, NOW)
    assert q.read_error(p.job_id)["reason"] == "removed"
    with pytest.raises(QueueError, match="not in pending"):
        q.remove(p.job_id, NOW)


def test_find_by_original_name_and_ambiguity(q, tmp_path):
    a = q.admit(drop(tmp_path, "a.jsonl"), Priority.NORMAL, NOW)
    assert q.find("a.jsonl").job_id == a.job_id
    q.admit(drop(tmp_path, "a.jsonl"), Priority.NORMAL, NOW)
    with pytest.raises(QueueError, match="several"):
        q.find("a.jsonl")
    with pytest.raises(QueueError, match="no queued file"):
        q.find("zzz")


def test_odd_names_are_made_safe():
    q = JobQueue("/nonexistent")
    q._seq = 0
    jid = q.new_job_id("../../etc/pass wd.jsonl", NOW)
    assert "/" not in jid and original_name(jid) == "pass_wd.jsonl"


def test_a_duplicate_goes_to_done_with_its_note_and_orphan_notes_are_swept(q, tmp_path):
    entry = q.admit(drop(tmp_path, "twin.jsonl"), Priority.NORMAL, now=1.0)
    moved = q.finish_duplicate(entry.job_id, {"job_id": "x", "original_name": "first.jsonl"}, "repeats first.jsonl", 2.0)
    assert moved.state is JobState.DONE and [e.job_id for e in q.done()] == [entry.job_id]
    assert q.read_duplicate(entry.job_id)["duplicate_of"]["original_name"] == "first.jsonl"
    moved.path.unlink()  # a note whose file is gone (a crash between the note and the move) goes at start-up
    q.ensure()
    assert q.read_duplicate(entry.job_id) is None
