"""Shared fixtures (the embedded model built once, a fast instance, a lock holder) and the run's hooks (the `gpu`
marker, waits scaled to the machine's load). The daemon driver and instance writer are bench/harness.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bench.harness import REPO, write_instance
from daemon.config import Config, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpus_missing(item: pytest.Item) -> str | None:
    """Why `item`, a `gpu` test (`@pytest.mark.gpu`, `@pytest.mark.gpu(count=2)`), cannot run here; None if it can."""
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return None
    need, have = marker.kwargs.get("count", 1), _cuda_devices()
    return None if have >= need else f"needs {need} NVIDIA GPU{'s' if need > 1 else ''} with CUDA; torch sees {have}"


def _gpus_asked(config: pytest.Config) -> bool:
    return config.getoption("markexpr", "").strip() == "gpu" or os.environ.get("TRAIND_REQUIRE_GPU") == "1"


def _time_scale(workers: int) -> float:
    """How much slower than a quiet machine this one is now: the 1-minute load per core, counting the xdist
    workers about to start as one more each, between 1 and 4. The harness's waits and pytest-timeout's limit
    are multiplied by it, so the end-to-end tests wait on their conditions for longer on a busy machine
    instead of failing them (a person may also set it)."""
    if os.environ.get("TRAIND_TEST_TIME_SCALE"):
        return float(os.environ["TRAIND_TEST_TIME_SCALE"])
    try:
        per_core = (os.getloadavg()[0] + workers) / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return round(min(4.0, max(1.0, per_core)), 2)


def _xdist_workers(config: pytest.Config) -> int:
    """The workers pytest-xdist will start (0 without it, or in a worker: the controller already counted them)."""
    if hasattr(config, "workerinput"):
        return 0
    n = getattr(config.option, "numprocesses", None)
    if n in ("auto", "logical"):
        return os.cpu_count() or 1
    return int(n or 0)


def pytest_configure(config: pytest.Config) -> None:
    scale = _time_scale(_xdist_workers(config))
    os.environ["TRAIND_TEST_TIME_SCALE"] = str(scale)  # the harness (and what it starts) reads it
    # pytest-timeout takes --timeout, else the ini's `timeout`: scale whichever applies (the ini's alone left
    # option.timeout None, so the limit stayed 300 s on a busy machine)
    try:
        limit = getattr(config.option, "timeout", None) or config.getini("timeout")
    except ValueError:  # pytest-timeout not installed
        limit = None
    if scale > 1 and limit:
        config.option.timeout = float(limit) * scale


def pytest_report_header(config: pytest.Config) -> str:
    return f"traind: waits and timeouts scaled x{os.environ.get('TRAIND_TEST_TIME_SCALE')} for this machine's load"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the default run a `gpu` test on a machine without its GPUs is skipped, with the reason."""
    if _gpus_asked(config):
        return
    for item in items:
        if (reason := _gpus_missing(item)) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A run that asks for the GPU tests (`-m gpu`, or TRAIND_REQUIRE_GPU=1) fails a `gpu` test whose GPUs are
    missing instead of skipping it: a GPU box whose devices torch does not see cannot report them as passed."""
    if _gpus_asked(item.config) and (reason := _gpus_missing(item)) is not None:
        pytest.fail(f"{reason} (GPU tests were asked for)", pytrace=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the embedded model for the whole session, built up front so that
    no daemon under test spends its first durable operations building it."""
    import torch

    from daemon.train.tinymodel import ensure_embedded

    folder = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 busy shared cores run several times slower
    try:
        ensure_embedded(folder)
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def instance(tmp_path: Path, models_dir: Path) -> tuple[Config, Path]:
    """A fresh instance folder with the fast test config."""
    path = write_instance(tmp_path / "inst", models_dir)
    return load_config(path), path


@pytest.fixture
def lock_holder(cfg) -> Iterator[int]:  # noqa: ANN001 (each module has its own `cfg`)
    """A process that holds the daemon lock, as a running (or hung) daemon does; yields its pid."""
    code = ("import sys, time; from daemon.lock import acquire; acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg.path("status") / "daemon.lock")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def skip_or_fail(reason: str) -> None:
    """A test that cannot run here for want of something outside traind (chromium, a mount): skipped when run by
    hand; failed under bin/test.sh (TRAIND_STRICT=1), which installs chromium and runs where mounts work, so a
    missing install step or a refused mount there is a failure, never a quiet skip."""
    if os.environ.get("TRAIND_STRICT") == "1":
        pytest.fail(f"{reason} (bin/test.sh sets TRAIND_STRICT=1: this must run here)", pytrace=False)
    pytest.skip(reason)
