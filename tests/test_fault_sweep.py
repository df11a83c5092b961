"""Crash-point sweep: kill the real daemon (or its trainer child) right after its n-th
durable operation, restart, and check the product promise: no file lost, none trained
twice, no debris in the queue, the adapter and the history agree; and against an
uninterrupted run of the same files: each version's sample ledger is the same (the same
samples in the same steps), and with every good file done the adapter is the same within 1e-5.

    TRAIND_CRASH_AFTER_OP=n           the service dies (exit 86) after its n-th durable op
    TRAIND_CRASH_AFTER_OP=match:TEXT  ... after the first durable op whose description has TEXT
    TRAIND_TRAINER_CRASH_AFTER_OP=n   every trainer child dies after its n-th durable op

The service's numbering depends on timing (status writes), so the points are a
sample; `pytest -m slow` sweeps many more. Each run prints where it crashed
(`-s` to see it).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from daemon.adapters import read_current
from daemon.jobqueue import ERROR_SUFFIX
from bench.harness import lines_of, time_scale, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e

GOOD = {"a_text.jsonl": lines_of("text.jsonl", 24), "b_alpaca.jsonl": lines_of("alpaca.jsonl", 30)}
BAD = {"c_bad.jsonl": json.dumps([{"text": "a"}, {"text": "b"}])}  # a JSON array, not JSONL
# Checkpoints every 2 steps (the files have 6 and 7 steps), so a child does 3 durable
# ops per checkpoint and 3 per adapter publication. A file whose child keeps dying on
# the same op fails with reason `crashed` after 6 crashes: explicit, never lost.
SETTINGS = dict(training={"checkpoint_every_steps": 2},
                service={"max_crashes_per_file": 6, "restart_backoff_seconds": 0.1})
CRASH_RE = re.compile(r"injected crash after durable op (\d+) \((.*)\)")
CRASH_EXIT = 86

SERVICE_POINTS = [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow),
                  pytest.param(5, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow), 13]
# Named child points (every child dies at its first op so described): a checkpoint's
# latest.json (its step folder published, the pointer not yet moved), the second adapter
# version's folder (published, current.json not yet moved: every child dies there, so the
# second file fails as `crashed` after 6 crashes, explicit, never lost) and current.json (the commit point, after
# which the restarted child answers "already trained"). Named, so that a new file in a
# checkpoint does not move them: the numbering shifts with every durable op added.
TRAINER_POINTS = [pytest.param("match:write latest.json", marks=pytest.mark.slow),
                  pytest.param("match:publish v0002", marks=pytest.mark.slow), "match:write current.json"]
# The child's numbered ops, deterministic: 4 per checkpoint (ledger.json, state.json, the step
# folder, latest.json) and 4 per adapter (the step log and manifest.json in its folder, the version
# folder, current.json): 12 for the first file (checkpoints at steps 2 and 4), 16 for the second.
TRAINER_OPS = 28


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models_dir):
    """The uninterrupted run of the same files: its adapter weights and each file's sample ledger
    (checked once against the trainer's plan of the file: every train line once per epoch)."""
    from types import SimpleNamespace

    from bench.soak_checks import adapter_tensors, ledgers, train_lines_of
    from daemon.sample_ledger import check_ledger

    d = Daemon(write_instance(tmp_path_factory.mktemp("sweep-ref") / "inst", models_dir, **SETTINGS))
    try:
        for name, text in {**GOOD, **BAD}.items():
            d.drop(name, text)
        run_to_the_end(d.start())
        ref = {"adapter": adapter_tensors(d.cfg.path("adapters")), "ledgers": ledgers(d.cfg.path("adapters"))}
        db = d.history()
        try:
            formats = {e.original_name: db.job(e.job_id)["format"] for e in d.queue.done()}
        finally:
            db.close()
        for name, text in GOOD.items():
            lines = train_lines_of(SimpleNamespace(settings=SETTINGS), name, text, models_dir, formats[name])
            entry = ref["ledgers"][name]
            assert check_ledger(entry["ledger"], lines, epochs=1, steps=entry["steps"]) == [], name
        return ref
    finally:
        d.close()


@pytest.fixture
def make_daemon(tmp_path, models_dir):
    made: list[Daemon] = []

    def make(env: dict | None = None) -> Daemon:
        d = Daemon(write_instance(tmp_path / "inst", models_dir, **SETTINGS), env=env)
        for name, text in {**GOOD, **BAD}.items():
            d.drop(name, text)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


# ---------------------------------------------------------------- running


def settled(d: Daemon) -> bool:
    """Every file has reached done/ or failed/ and this process (not the one before a
    restart: its last status may say idle too) says idle, its signal handlers in place."""
    c = d.queue.counts()
    inbox = [p for p in d.cfg.path("inbox").rglob("*") if p.is_file()]
    st = d.status() or {}
    return (not inbox and c["pending"] == 0 and c["processing"] == 0 and c["done"] + c["failed"] >= 3
            and st.get("status") == "idle" and st.get("pid") == d.proc.pid)


def run_until_crash_or_settled(d: Daemon, timeout: float = 240) -> int:
    """The exit code: 86 when the armed op came, else 0 after a stop once all is settled
    (the stop's own status writes may still reach the armed op: 86 again)."""
    deadline = time.time() + timeout * time_scale()
    while time.time() < deadline:
        code = d.proc.poll()
        if code is not None:
            return code
        if settled(d):
            return d.stop()
        time.sleep(0.1)
    raise AssertionError(f"neither crashed nor settled in {timeout:.0f} s\n{d.log_tail()}")


def run_to_the_end(d: Daemon, timeout: float = 240) -> None:
    timeout *= time_scale()  # a point whose every trainer child crashes restarts 18 of them: slow when the machine is
    deadline = time.time() + timeout
    while not settled(d):
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({d.proc.returncode}) before settling\n{d.log_tail()}")
        if time.time() > deadline:
            raise AssertionError(f"not settled in {timeout:.0f} s; queue {d.queue.counts()}\n{d.log_tail()}")
        time.sleep(0.1)
    assert d.stop() == 0, d.log_tail()


def crashes_in(path: Path) -> list[str]:
    """`op n (what)` for every injected crash written to this log."""
    if not path.exists():
        return []
    return [f"op {m.group(1)} ({m.group(2)})" for m in CRASH_RE.finditer(path.read_text(errors="replace"))]


# ---------------------------------------------------------------- the promise


def check_invariants(d: Daemon, crashed_ok: bool) -> dict:
    """Every input exactly once under queue/ in the right place; no debris; the adapter
    holds each done job once; the history holds each kept step once. Returns a summary."""
    queue, inputs = d.cfg.path("queue"), {**GOOD, **BAD}
    inbox_left = [p for p in d.cfg.path("inbox").rglob("*") if p.is_file()]
    assert not inbox_left, f"left in the inbox: {inbox_left}"
    assert not d.queue.processing() and not d.queue.pending(), d.queue.counts()
    debris = [p for p in queue.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert not debris, f"debris in queue/: {debris}"

    files = [p for p in queue.rglob("*") if p.is_file()]
    data = [p for p in files if not p.name.endswith((ERROR_SUFFIX, ERROR_SUFFIX + ".prev"))]
    for name, text in inputs.items():
        homes = [p.relative_to(queue) for p in data if p.read_bytes() == text.encode()]
        assert len(homes) == 1, f"{name} is in {len(homes)} places under queue/: {homes}"
    assert len(data) == len(inputs), f"unexpected files under queue/: {[p.relative_to(queue) for p in data]}"

    done = {e.original_name: e.job_id for e in d.queue.done()}
    failed = {e.original_name: e.job_id for e in d.queue.failed()}
    reasons = {name: (d.queue.read_error(job_id) or {}).get("reason") for name, job_id in failed.items()}
    for name in BAD:
        assert reasons.get(name) == "invalid_data", f"{name}: done={name in done}, reason {reasons.get(name)}"
    for name in GOOD:
        ok = name in done or (crashed_ok and reasons.get(name) == "crashed")
        assert ok, f"{name}: done={name in done}, failed reason {reasons.get(name)}"
    errors = sorted(p.name for p in (queue / "failed").glob("*" + ERROR_SUFFIX))
    assert errors == sorted(j + ERROR_SUFFIX for j in failed.values()), f"error files without their file: {errors}"

    current = read_current(d.cfg.path("adapters"))
    trained = list(current.manifest.trained_jobs) if current else []
    assert sorted(trained) == sorted(done.values()), f"adapter trained_jobs {trained} != done {sorted(done.values())}"
    assert len(trained) == len(set(trained)), f"a job twice in the adapter: {trained}"

    db = d.history()
    try:
        # The history knows every file the folders hold, in the same state.
        records = {name: db.job(j) for name, j in {**done, **failed}.items()}
        missing = sorted(name for name, r in records.items() if r is None)
        assert not missing, f"no history record for {missing}, though their files are in done/ or failed/"
        wrong = {name: r["state"] for name, r in records.items() if r["state"] != ("done" if name in done else "failed")}
        assert not wrong, f"history job state disagrees with the folder: {wrong}"
        # The kept jobs' steps, in training order: each step once, global steps contiguous.
        global_step = 0
        for job_id in trained:
            total = db.job(job_id)["total_steps"]
            rows = db.steps(job_id)
            assert total and [r["step"] for r in rows] == list(range(1, total + 1)), \
                f"{job_id}: steps {[r['step'] for r in rows]} of {total}"
            assert [r["global_step"] for r in rows] == list(range(global_step + 1, global_step + total + 1)), \
                f"{job_id}: global steps {[r['global_step'] for r in rows]} after {global_step}"
            global_step += total
        crashes = {name: r["crashes"] for name, r in records.items()}
    finally:
        db.close()
    if current:
        assert current.manifest.global_step == global_step
    return {"done": sorted(done), "failed": {n: reasons[n] for n in sorted(failed)},
            "adapter_version": current.version if current else None, "global_step": global_step,
            "crashes": crashes}


def check_against_reference(d: Daemon, reference: dict) -> dict:
    """Each version's sample ledger equals the uninterrupted run's for its file (the same samples in
    the same steps, none twice); with every good file done, the adapter equals the uninterrupted
    run's within 1e-5."""
    from bench.soak_checks import adapter_tensors, ledgers

    got = ledgers(d.cfg.path("adapters"))
    for name, entry in got.items():
        assert not entry.get("twice"), f"{name} published twice in the lineage"
        assert entry["ledger"] == reference["ledgers"][name]["ledger"], \
            f"{name}: its sample ledger differs from the uninterrupted run's:\n{entry['ledger']}\n{reference['ledgers'][name]['ledger']}"
    diff = None
    if sorted(got) == sorted(GOOD):
        a, b = adapter_tensors(d.cfg.path("adapters")), reference["adapter"]
        diff = max(float((a[k] - b[k]).abs().max()) for k in b)
        assert diff <= 1e-5, f"the adapter differs from the uninterrupted run's by {diff:.3e}"
    return {"ledgers_checked": sorted(got), "adapter_diff": diff}


def debris_outside_queue(d: Daemon) -> dict[str, list[str]]:
    """Temp and moved-aside folders in adapters/ and checkpoints/ (the trainer's own)."""
    out = {}
    for name in ("adapters", "checkpoints"):
        root = d.cfg.path(name)
        out[name] = sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                           if p.name.endswith(".tmp") or ".old-" in p.name)
    return out


def check_debris(d: Daemon) -> dict[str, list[str]]:
    """A crashed publication may leave its own temp folder, but the next one sweeps it:
    leftovers never pile up (each is a full adapter). Checkpoint temp folders are swept
    by the next trainer at its start, so at most the last killed one's remains."""
    debris = debris_outside_queue(d)
    assert len(debris["adapters"]) <= 1, f"adapter leftovers pile up: {debris['adapters']}"
    assert len(debris["checkpoints"]) <= 1, f"checkpoint leftovers pile up: {debris['checkpoints']}"
    return debris


# ---------------------------------------------------------------- the sweeps


def service_point(make_daemon, reference, n: int | str) -> None:  # noqa: ANN001
    """Crash the service after op n (or after the op `match:TEXT` names), restart it clean, check."""
    t0 = time.time()
    d = make_daemon(env={"TRAIND_CRASH_AFTER_OP": str(n)}).start()
    code = run_until_crash_or_settled(d)
    assert code in (0, CRASH_EXIT), f"first run exited {code}\n{d.log_tail()}"
    where = crashes_in(d.cfg.root / "daemon_test_stdout.log")
    assert (code == CRASH_EXIT) == bool(where), (code, where)
    if isinstance(n, str) and n.startswith("match:"):
        assert where and n[len("match:"):] in where[0], f"no crash after the op {n!r}: {where}"
    d.close()  # the child dies with the service; make sure before the restart

    del d.env["TRAIND_CRASH_AFTER_OP"]
    run_to_the_end(d.start())  # restart without injection
    summary = check_invariants(d, crashed_ok=False)
    summary.update(check_against_reference(d, reference))
    debris = check_debris(d)
    print(f"\nSERVICE n={n}: {'crashed after ' + where[0] if where else 'beyond its ops (finished)'}; "
          f"{summary}; debris outside queue/ {debris}; {time.time() - t0:.1f} s")


def trainer_point(make_daemon, reference, n: int | str) -> None:  # noqa: ANN001
    t0 = time.time()
    d = make_daemon(env={"TRAIND_TRAINER_CRASH_AFTER_OP": str(n)}).start()
    run_to_the_end(d)  # the service lives through every child crash
    where = crashes_in(d.cfg.path("logs") / "trainer_stderr.log")
    if isinstance(n, str) and n.startswith("match:"):
        assert where and all(n[len("match:"):] in w for w in where), f"no crash after the op {n!r}: {where}"
    first = check_invariants(d, crashed_ok=True)
    first.update(check_against_reference(d, reference))

    del d.env["TRAIND_TRAINER_CRASH_AFTER_OP"]
    run_to_the_end(d.start())  # a clean restart over what the crashes left
    summary = check_invariants(d, crashed_ok=True)
    summary.update(check_against_reference(d, reference))
    assert summary == first, "a restart changed the outcome"
    debris = check_debris(d)
    print(f"\nTRAINER n={n}: {len(where)} child crash(es) {sorted(set(where))}; {summary}; "
          f"debris outside queue/ {debris}; {time.time() - t0:.1f} s")


@pytest.mark.parametrize("n", SERVICE_POINTS)
def test_service_crash_after_op(make_daemon, reference, n):
    service_point(make_daemon, reference, n)


@pytest.mark.parametrize("n", TRAINER_POINTS)
def test_trainer_crash_after_op(make_daemon, reference, n):
    trainer_point(make_daemon, reference, n)


def test_service_crash_after_moving_a_refused_file(make_daemon, reference):
    # The crash comes right after c's move to failed/ (named, not numbered: status writes
    # shift the numbering); the restart must give it its history record.
    service_point(make_daemon, reference, "match:move c_bad.jsonl -> failed/")


@pytest.mark.slow
@pytest.mark.parametrize("n", range(1, 41))
def test_service_crash_sweep(make_daemon, reference, n):
    service_point(make_daemon, reference, n)


@pytest.mark.slow
@pytest.mark.parametrize("n", range(1, TRAINER_OPS + 1))
def test_trainer_crash_sweep(make_daemon, reference, n):
    trainer_point(make_daemon, reference, n)
