"""daemon.service.child.socket_folder: one private socket folder per instance, taken over after a kill."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from daemon.service.child import socket_folder


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_same_instance_same_folder_and_a_dead_socket_is_cleared(tmpdir_env: Path) -> None:
    config = tmpdir_env / "inst" / "status" / "running_config.json"
    first = socket_folder(config)
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o700 and Path(first).parent == tmpdir_env
    (Path(first) / "trainer.sock").write_text("")  # what a service killed with SIGKILL leaves
    assert socket_folder(config) == first and os.listdir(first) == []
    assert socket_folder(tmpdir_env / "other" / "status" / "running_config.json") != first
    assert len(os.path.join(first, "trainer.sock")) < len(str(tmpdir_env)) + 40  # short: sockets fit 107 bytes


def test_a_folder_of_that_name_open_to_others_is_not_used(tmpdir_env: Path) -> None:
    config = tmpdir_env / "inst" / "status" / "running_config.json"
    squatted = socket_folder(config)
    os.rmdir(squatted)
    os.mkdir(squatted, 0o777)
    os.chmod(squatted, 0o777)  # as another user could have made it
    fresh = socket_folder(config)
    assert fresh != squatted and stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def test_a_tmpdir_too_long_for_a_socket_gives_way_to_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A deep $TMPDIR (a CI job's, pytest-xdist's) would make the socket path longer than a unix socket takes:
    the daemon failed to start with "AF_UNIX path too long". Its folder goes under /tmp instead, said once."""
    import shutil
    import tempfile
    from multiprocessing.connection import Listener

    deep = tmp_path / ("d" * 60) / ("e" * 30)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = socket_folder(tmp_path / "inst" / "status" / "running_config.json")
    try:
        assert Path(folder).parent == Path("/tmp") and "too long for the trainer's socket path" in caplog.text
        Listener(os.path.join(folder, "trainer.sock"), family="AF_UNIX").close()  # binds: the path fits
    finally:
        shutil.rmtree(folder, ignore_errors=True)
