import os
import subprocess
import sys
import textwrap

import pytest

from daemon import atomic


def test_write_json_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "s.json"
    atomic.write_json(p, {"a": 1})
    atomic.write_json(p, {"a": 2, "b": [1, 2]})
    assert atomic.read_json(p) == {"a": 2, "b": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["s.json"]


def test_move_refuses_to_overwrite(tmp_path):
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        atomic.move_file(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == b"A" and (tmp_path / "b").read_bytes() == b"B"


def test_move_into_new_folder_keeps_bytes(tmp_path):
    data = os.urandom(100_000)
    (tmp_path / "a").write_bytes(data)
    atomic.move_file(tmp_path / "a", tmp_path / "x" / "y" / "a2")
    assert (tmp_path / "x" / "y" / "a2").read_bytes() == data
    assert not (tmp_path / "a").exists()


def test_publish_dir_replaces_old_version(tmp_path):
    final = tmp_path / "final"
    for n in (1, 2):
        tmp = tmp_path / f"tmp{n}"
        tmp.mkdir()
        (tmp / "w").write_text(str(n))
        atomic.publish_dir(tmp, final)
    assert (final / "w").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["final"]


@pytest.mark.parametrize("crash_after", [1, 2, 3, "match:move two"])
def test_fault_injection_crashes_right_after_nth_durable_op(tmp_path, crash_after):
    script = textwrap.dedent(f"""
        from daemon import atomic
        atomic.write_text({str(tmp_path / 'one')!r}, "1")
        atomic.write_text({str(tmp_path / 'two')!r}, "2")
        atomic.move_file({str(tmp_path / 'two')!r}, {str(tmp_path / 'three')!r})
        atomic.write_text({str(tmp_path / 'four')!r}, "4")
    """)
    env = dict(os.environ, TRAIND_CRASH_AFTER_OP=str(crash_after))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == atomic.CRASH_EXIT_CODE, r.stderr
    names = sorted(n for n in os.listdir(tmp_path) if not n.startswith("."))
    expected = {1: ["one"], 2: ["one", "two"], 3: ["one", "three"], "match:move two": ["one", "three"]}[crash_after]
    assert names == expected
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no torn temp files


def test_sweep_temps_removes_only_the_named_files_temps(tmp_path) -> None:  # noqa: ANN001
    from daemon.atomic import sweep_temps

    left = [tmp_path / ".training_status.json.ab12cd.tmp", tmp_path / ".j1.error.json.x9.tmp"]
    kept = [tmp_path / ".monitor_token.zz.tmp", tmp_path / "training_status.json", tmp_path / ".training_status.json.x"]
    for p in left + kept:
        p.write_text("{}")
    assert sweep_temps(tmp_path, "training_status.json") == 1
    assert sweep_temps(tmp_path, "*.error.json") == 1
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_publish_dir_removes_what_killed_writers_left_of_the_old_folder(tmp_path):
    """A trainer killed right after a checkpoint's rename, before removing the folder it replaced, left
    `.step_000004.old-<pid>`; every restart killed there added one (the slow crash-point sweep, trainer op 4,
    found 8 after six crashes). The next publication of that name removes them all."""
    final = tmp_path / "step_000004"
    final.mkdir()
    for pid in (11, 12, 13):
        (tmp_path / f".step_000004.old-{pid}").mkdir()
        (tmp_path / f".step_000004.old-{pid}" / "weights").write_bytes(b"x")
    (tmp_path / ".step_000005.old-11").mkdir()  # another name's: not this writer's to remove
    new = tmp_path / ".tmp-new"
    new.mkdir()
    (new / "weights").write_bytes(b"new")
    atomic.publish_dir(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_000005.old-11", "step_000004"]
    assert (final / "weights").read_bytes() == b"new"
