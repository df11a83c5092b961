"""Every durable file operation of traind goes through here.

Atomic write: temp file in the same folder, flush, fsync, `os.replace`, fsync the
folder. A reader sees the old bytes or the new ones, never a torn file, and a
power cut leaves one of the two.

One home for durable operations also gives the fault-injection hook one home:
with `TRAIND_CRASH_AFTER_OP=n` in the environment, the process dies
(`os._exit(86)`) right after its n-th durable operation, so tests can crash at
every point of a sequence and check what survives; `TRAIND_CRASH_AFTER_OP=match:TEXT`
dies after the first operation whose description contains TEXT (a point whose
number depends on timing). With `TRAIND_CRASH_ONCE=PATH` as well it dies only
if PATH does not exist yet, and creates it first: one crash, then restarts live.

The same home gives "disk full" its injection: with `TRAIND_ENOSPC_AT=SITE[,SITE...]`
every write at that site raises `OSError(ENOSPC)` part-way through (after some
bytes went to the temp file), as a full disk does. Sites: `checkpoint`, `adapter`,
`status`, `history`, `queue`, `intake`, `log`, `upload`; `SITE/fsync` fails the
fsync of that site's writes instead (`fsync` alone: every fsync), and `match:TEXT`
any write whose description holds TEXT. With `TRAIND_ENOSPC_ARMED=PATH` it is
armed only while PATH exists, and PATH's content, when not empty, names the
sites instead: a test arms, moves and disarms it at run time (space is back).
Unset, both hooks are inert.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CRASH_EXIT_CODE = 86
_ops_done = 0


def _durable_op_done(what: str) -> None:
    """Count a durable operation; die here if a test armed this point."""
    global _ops_done
    _ops_done += 1
    armed = os.environ.get("TRAIND_CRASH_AFTER_OP")
    if not armed:
        return
    hit = armed[len("match:"):] in what if armed.startswith("match:") else _ops_done == int(armed)
    once = os.environ.get("TRAIND_CRASH_ONCE")  # a marker file: the crash happens once, not in every restart
    if hit and once:
        if os.path.exists(once):
            return
        with open(once, "w") as f:
            f.write(what)
    if hit:
        os.write(2, f"traind: injected crash after durable op {_ops_done} ({what})\n".encode())
        os._exit(CRASH_EXIT_CODE)


def enospc_due(site: str | None, what: str = "", stage: str = "write") -> bool:
    """True when a test armed a disk-full failure for this write (docstring above)."""
    armed, gate = os.environ.get("TRAIND_ENOSPC_AT", ""), os.environ.get("TRAIND_ENOSPC_ARMED")
    if gate:
        try:
            with open(gate, encoding="utf-8") as f:
                armed = f.read().strip() or armed
        except OSError:  # no gate file: disarmed
            return False
    for spec in filter(None, armed.split(",")):
        spec = spec.strip()
        if spec.startswith("match:"):
            hit = stage == "write" and spec[len("match:"):] in what
        elif stage == "fsync":
            hit = spec in ("fsync", f"{site}/fsync")
        else:
            hit = spec == site
        if hit:
            return True
    return False


def inject_enospc(site: str | None, path: str | os.PathLike, stage: str = "write") -> None:
    """Raise OSError(ENOSPC) for `path` here when a test armed this site."""
    if enospc_due(site, f"{site} {path}", stage):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {site} {stage})", str(path))


def _fsync(fd: int, site: str | None, path: str | os.PathLike) -> None:
    inject_enospc(site, path, "fsync")
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644, site: str | None = None) -> None:
    """Atomically replace `path` with `data`.

    Any failure (a full disk, a failed fsync) removes the temp file and raises:
    the previous file stays as it was. A failed fsync is never retried on the
    same file (the kernel may have dropped the dirty pages and a second fsync
    would report success): the caller writes the whole file again later.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2  # an injected failure lands mid-file, as a real one does
            f.write(data[:half])
            f.flush()
            inject_enospc(site, path)
            f.write(data[half:])
            f.flush()
            _fsync(f.fileno(), site, path)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    _durable_op_done(f"write {path.name}")


def write_text(path: str | os.PathLike, text: str, mode: int = 0o644, site: str | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode, site)


def write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644, site: str | None = None) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"), mode, site)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def move_file(src: str | os.PathLike, dst: str | os.PathLike, site: str | None = None) -> None:
    """Move `src` to `dst` durably; refuses to overwrite an existing `dst`.

    Same filesystem: one rename (atomic). Across filesystems: copy to a temp
    name beside `dst`, fsync, rename, then unlink `src` (a crash in between
    leaves both copies, never none).
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(dst))
    try:
        inject_enospc(site, dst)  # a rename needs room for the new directory entry
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        _copy_across_devices(src, dst, site)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)
    _durable_op_done(f"move {src.name} -> {dst.parent.name}/{dst.name}")


def _copy_across_devices(src: Path, dst: Path, site: str | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            _fsync(out.fileno(), site, dst)
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    except BaseException:  # a full disk mid-copy: no half copy is left beside the original
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(dst.parent)
    os.unlink(src)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, site: str | None = None) -> None:
    """Copy `src` to `dst` atomically (temp, fsync, rename); refuses to overwrite."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            inject_enospc(site, dst)
            _fsync(out.fileno(), site, dst)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(dst.parent)
    _durable_op_done(f"copy {src.name} -> {dst.name}")


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike, site: str | None = None) -> None:
    """Make a fully written folder visible under its final name in one rename.

    Files inside are fsynced first. An existing `final_dir` is moved aside and
    removed only after the new one is in place, so a crash leaves one of them.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    for p in tmp_dir.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                _fsync(f.fileno(), site, p)
    fsync_dir(tmp_dir)
    # A writer killed after its rename but before removing the old folder left `.<name>.old-<its pid>`; each
    # such kill of a later one (another pid) would add one more. The one writer of this name removes them.
    for stale in final_dir.parent.glob(f".{final_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    _durable_op_done(f"publish {final_dir.name}")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_temps(folder: str | os.PathLike, name_glob: str) -> int:
    """Remove the temp files that interrupted atomic writes of files named `name_glob` left in
    `folder` (`.<name>.<random>.tmp`: a writer killed between its temp file and the rename).

    Only the one writer of those files may call this, holding what makes it the one (the
    daemon lock, the trainer lock), or it could delete another writer's temp file in flight.
    Returns how many were removed.
    """
    removed = 0
    for tmp in Path(folder).glob(f".{name_glob}.*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_file(path: str | os.PathLike) -> None:
    """Unlink durably (missing is fine)."""
    path = Path(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
    _durable_op_done(f"remove {path.name}")
