"""POST /api/queue: upload a JSONL file into the inbox, through the daemon's normal intake.

The body is the raw file (no multipart: nothing to buffer, no extra parser).
It is streamed to `<inbox>/[high|low/].<name>.<random>.part` in chunks, counted
against a byte limit (413 as soon as it is exceeded, the partial file removed),
fsynced, then given its final name with a no-clobber hard link (an existing
file gets a `-N` suffix instead of being replaced). The intake ignores hidden
and `.part` names, so the daemon only ever sees complete files.

A full disk (at any write, or free space below `service.min_free_bytes` with
the upload counted) answers 507 Insufficient Storage with the folder and the
free bytes, and leaves nothing in the inbox.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import unicodedata
import uuid
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

import anyio
from fastapi import APIRouter, HTTPException, Query, Request

from daemon import atomic, diskspace
from daemon.states import Priority
from monitor.deps import MonitorState, StateDep, WriteAuth
from monitor.models import UploadResult

log = logging.getLogger(__name__)
router = APIRouter(tags=["queue"], dependencies=[WriteAuth])

# Letters and digits of any script (\w, after NFC), '.', '_', '-': a name stays recognisable
# in its own language, while format characters (bidi overrides, zero-width) and
# punctuation a shell or a path would read stay out.
_NAME = re.compile(r"^[^\W_][\w.-]*\.jsonl$", re.IGNORECASE)
MAX_NAME_BYTES = 180  # the queue adds a ~26-byte prefix; file names stop at 255 bytes
WRITE_BATCH = 1 << 20  # bytes gathered before one write in a worker thread
MAX_SUFFIX = 1000


def clean_name(raw: str) -> str:
    """A plain file name from whatever the client sent: basename only, no odd characters."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = re.sub(r"\s+", "_", unicodedata.normalize("NFC", base))
    if not base.lower().endswith(".jsonl"):
        raise HTTPException(400, "only .jsonl files can be queued")
    if not _NAME.match(base) or len(base.encode("utf-8")) > MAX_NAME_BYTES:
        raise HTTPException(400, f"file name must be letters, digits, '.', '_' or '-' (at most {MAX_NAME_BYTES} bytes in UTF-8), "
                                 "not starting with '.' or '-', ending .jsonl")
    return base


def upload_limit(state: MonitorState) -> int:
    intake_limit = state.cfg.intake.max_file_bytes  # 0: the daemon sets no limit
    return min(state.settings.max_upload_bytes, intake_limit) if intake_limit else state.settings.max_upload_bytes


def inbox_folder(state: MonitorState, priority: Priority) -> Path:
    inbox = state.cfg.path("inbox")
    return inbox if priority is Priority.NORMAL else inbox / priority.value


def publish(part: Path, folder: Path, name: str) -> str:
    """Give `part` its final name without ever replacing a file; returns the name used."""
    stem = name[: -len(".jsonl")]
    for n in range(MAX_SUFFIX):
        final = folder / (name if n == 0 else f"{stem}-{n}.jsonl")
        try:
            os.link(part, final)  # fails with EEXIST instead of overwriting, atomically
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            if final.exists():  # no hard links on this filesystem: check, then rename
                continue
            os.rename(part, final)
        else:
            os.unlink(part)
        atomic.fsync_dir(folder)
        return final.name
    raise HTTPException(409, f"too many files named like {name} in the inbox")


def _write(out: BinaryIO, data: bytes) -> None:
    half = len(data) // 2  # an injected full disk (daemon/atomic.py) lands mid-file, as a real one does
    out.write(data[:half])
    atomic.inject_enospc("upload", out.name)
    out.write(data[half:])


def insufficient_storage(folder: Path, detail: str) -> HTTPException:
    free = diskspace.free_bytes(folder)
    return HTTPException(507, f"not enough disk space for the upload: {folder} has {free} bytes free ({detail}); "
                              "nothing was queued, free some space and send it again")


async def _receive(request: Request, out: BinaryIO, limit: int) -> int:
    size, batch = 0, bytearray()
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload is larger than the limit of {limit} bytes")
        batch += chunk
        if len(batch) >= WRITE_BATCH:
            await anyio.to_thread.run_sync(_write, out, bytes(batch))
            batch.clear()
    if batch:
        await anyio.to_thread.run_sync(_write, out, bytes(batch))
    await anyio.to_thread.run_sync(out.flush)
    await anyio.to_thread.run_sync(os.fsync, out.fileno())
    return size


@router.post("/api/queue", response_model=UploadResult, status_code=201,
             summary="Upload a JSONL file (raw request body) into the inbox with a priority",
             openapi_extra={"requestBody": {"required": True, "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(
    state: StateDep, request: Request,
    name: Annotated[str, Query(max_length=255, description="original file name; only its base name is used")],
    priority: Annotated[Literal["high", "normal", "low"], Query()] = "normal",
) -> UploadResult:
    final_name = clean_name(name)
    limit = upload_limit(state)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload is larger than the limit of {limit} bytes")
    folder = inbox_folder(state, Priority(priority))
    folder.mkdir(parents=True, exist_ok=True)
    min_free = state.cfg.service.min_free_bytes
    if min_free and declared and declared.isdigit() and diskspace.free_bytes(folder) < min_free + int(declared):
        raise insufficient_storage(folder, f"the upload and service.min_free_bytes = {min_free} would not fit")
    part = folder / f".{final_name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open(part, "xb") as out:
            size = await _receive(request, out, limit)
        if size == 0:
            raise HTTPException(400, "empty upload")
        written = publish(part, folder, final_name)
    except OSError as e:
        if not diskspace.is_disk_full(e):
            raise
        log.warning("upload of %s refused: %s", final_name, e)
        raise insufficient_storage(folder, e.strerror or str(e)) from None
    finally:
        if part.exists():
            part.unlink()
    log.info("queued upload %s (%d bytes, %s priority)", written, size, priority)
    return UploadResult(name=written, priority=priority, size=size)
