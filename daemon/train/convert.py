"""GGUF bases: a `.gguf` file converted once into a Hugging Face model folder, cached under `paths.models`.

    from daemon.train.convert import ensure_converted
    folder = ensure_converted(Path("smollm2.Q4_1.gguf"), cfg.path("models"), progress=print)

What llama.cpp and Ollama users hold is a GGUF file. transformers reads one
(`from_pretrained(..., gguf_file=...)`, dequantizing every tensor), but will not
save what it read ("The model is quantized with gguf and is not serializable"),
and reading it costs seconds to minutes at every start. So traind converts it
once: the architecture's config and tokenizer (with the chat template) from the
GGUF's metadata, every tensor dequantized by the `gguf` package and renamed by
transformers' own GGUF tables, loaded into a model built from that config
(no quantization_config: plain weights), then saved as safetensors with the
tokenizer. From then on the folder is what the trainer, `sample`, `eval` and
consolidation load, like any other base.

The cache is keyed by the file's content (sha256): `models/gguf/<sha256[:16]>-<name>/`,
with `traind_gguf.json` beside the weights (source path, sha256, architecture,
tensor types, seconds, bytes). A file already hashed is recognised by its path,
size and mtime (the trust make and rsync place in them) so a start does not read
gigabytes again. The folder is written under a temp name and renamed when
complete, under a lock, so ranks that start together convert once.

Weights are saved in the GGUF's own float type where all its matrices have one
(F32, F16, BF16), and in float16 for quantized types (float32 should a weight
not fit float16's range): half the size of fp32, and a dequantized weight (an
fp16 scale times a 4- or 8-bit integer, plus an fp16 offset) keeps 11 significant
bits. Measured on SmolLM2-135M Q4_1: max |logit diff| 0.04 against the GGUF read
directly in fp32 (logits up to 35; bfloat16 would be 0.18).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from daemon import atomic, lock
from daemon.bases import GgufError, gguf_header
from daemon.errors import TraindError
from daemon.jsonl import sha256_of

log = logging.getLogger(__name__)

MARKER = "traind_gguf.json"
SUBDIR = "gguf"
CONVERT_VERSION = 1  # bump when what is written changes: part of the marker, an older folder is converted again
LOCK_WAIT_SECONDS = 3600.0  # another rank (or instance) converting the same file: a large GGUF takes minutes
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

Progress = Callable[[str], None]


class ConversionError(TraindError):
    """The GGUF cannot be converted; the message names what (an architecture, a tensor type) and why."""


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The conversion record of a converted folder (None for any other folder)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def source_of(folder: Path) -> dict[str, Any] | None:
    """What a converted folder was made from, for lineage (adapter manifests, lineage.json); None for others."""
    m = read_marker(folder)
    if m is None or "sha256" not in m:
        return None
    return {"path": m.get("source", {}).get("path"), "sha256": m["sha256"], "architecture": m.get("architecture"),
            "tensor_types": m.get("tensor_types"), "converted": str(folder)}


def _by_stat(root: Path, source: Path) -> Path | None:
    """A complete converted folder made from this very file (same path, size and mtime)."""
    key = _stat_key(source)
    for marker_file in sorted(root.glob(f"*/{MARKER}")):
        m = read_marker(marker_file.parent)
        if m and m.get("convert_version") == CONVERT_VERSION and m.get("source") == key:
            return marker_file.parent
    return None


def _by_content(root: Path, sha: str) -> Path | None:
    """A complete converted folder of a file with these bytes (another path, a copy, a touched file)."""
    for marker_file in sorted(root.glob(f"{sha[:16]}-*/{MARKER}")):
        m = read_marker(marker_file.parent)
        if m and m.get("convert_version") == CONVERT_VERSION and m.get("sha256") == sha:
            return marker_file.parent
    return None


def ensure_converted(source: Path, models_dir: Path, progress: Progress | None = None) -> Path:
    """The Hugging Face folder converted from the GGUF file `source` (converting it on first use)."""
    say = progress or (lambda text: None)
    root = models_dir / SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    if (folder := _by_stat(root, source)) is not None:
        return folder
    fd = lock.take(root / ".convert.lock", LOCK_WAIT_SECONDS, poll=0.5)
    if fd is None:
        raise ConversionError(f"another process has held {root / '.convert.lock'} for {LOCK_WAIT_SECONDS:.0f} s")
    try:
        if (folder := _by_stat(root, source)) is not None:  # converted by whoever held the lock before us
            return folder
        say(f"hashing {source.name} ({source.stat().st_size / 2**20:.0f} MiB)")
        sha = sha256_of(source)
        if (folder := _by_content(root, sha)) is not None:
            return folder
        return convert(source, root / f"{sha[:16]}-{_name(source)}", sha, say)
    finally:
        os.close(fd)


def _name(source: Path) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in source.stem)
    return keep[:80] or "model"


def convert(source: Path, dest: Path, sha: str, say: Progress) -> Path:
    """Write the converted folder of `source` to `dest` (which must not exist), with its marker."""
    t0 = time.monotonic()
    try:
        header = gguf_header(source)
    except GgufError as e:
        raise ConversionError(str(e)) from e
    import gguf

    reader = gguf.GGUFReader(source)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    check_types(reader, types)
    check_disk(reader, dest.parent, source)
    say(f"converting {source.name} ({header.architecture}, {', '.join(types)}; {source.stat().st_size / 2**20:.0f} MiB)")
    with _one_reader(gguf, source, reader):
        model, tokenizer, dtype = build(source, reader, say)
    del reader
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        say(f"writing {dest.name}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        seconds = time.monotonic() - t0
        atomic.write_json(tmp / MARKER, {
            "convert_version": CONVERT_VERSION, "source": _stat_key(source), "sha256": sha,
            "architecture": header.architecture, "tensor_types": types, "saved_dtype": dtype,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "seconds": round(seconds, 2), "bytes": size, "gguf_bytes": source.stat().st_size,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions(),
        })
        tmp.chmod(0o755)
        atomic.publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"converted {source.name} in {seconds:.1f} s: {size / 2**20:.0f} MiB in {dest}")
    return dest


def check_disk(reader: Any, root: Path, source: Path) -> None:
    """Refuse, with the numbers, a conversion the disk under `paths.models` cannot hold."""
    import numpy as np

    dtype = _saved_dtype(reader)
    need = int(sum(int(np.prod(t.shape)) for t in reader.tensors) * (4 if dtype == "float32" else 2) * 1.05) + 2**26
    free = shutil.disk_usage(root).free
    if free < need:
        raise ConversionError(f"not enough disk in {root} to convert {source.name}: the folder needs about "
                              f"{need / 2**30:.2f} GiB ({dtype}) and {free / 2**30:.2f} GiB is free")


def check_types(reader: Any, types: list[str]) -> None:
    """Refuse, naming them, tensor types the installed gguf package cannot dequantize."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    bad = []
    for name in types:
        qtype = GGMLQuantizationType[name]
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros(size, dtype=np.uint8), qtype)  # one block of zeros: supported or not
        except NotImplementedError:
            bad.append(name)
    if bad:
        users = sorted({t.name for t in reader.tensors if t.tensor_type.name in bad})
        raise ConversionError(
            f"the gguf package cannot dequantize tensor type(s) {', '.join(bad)} (used by {len(users)} tensor(s), "
            f"e.g. {users[0]}); convert the model to another type with llama.cpp (Q8_0, Q4_K_M, F16 are read)")


def build(source: Path, reader: Any, say: Progress) -> tuple[Any, Any, str]:
    """(model with plain weights, tokenizer with its chat template, saved dtype name) from the GGUF."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    transformers.utils.logging.disable_progress_bar()  # progress is said through `say`, not drawn on stderr

    folder, name = str(source.parent), source.name
    say(f"reading {name}'s architecture from its metadata")
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as e:  # "GGUF model with architecture X is not supported yet."
        raise ConversionError(f"{source.name}: {e} transformers reads GGUF files of: "
                              f"{', '.join(sorted(gguf_utils.GGUF_SUPPORTED_ARCHITECTURES))}") from e
    for attr in ("quantization_config",):  # the GGUF's own quantization: the weights saved here are plain
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = _saved_dtype(reader)
    config.dtype = dtype
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ConversionError(f"{source.name}: {config.model_type} is not a causal language model "
                                  f"transformers can build ({e})") from e
    n = len(reader.tensors)
    with _progress_into(gguf_utils, say, f"dequantizing {n} tensors"):
        tensors = gguf_utils.load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model,
                                                  torch_dtype=getattr(torch, dtype))["tensors"]
    if dtype == "float16" and any(bool(t.isinf().any()) for t in tensors.values() if t.is_floating_point()):
        log.info("%s: a weight exceeds float16's range; converting in float32", source.name)
        dtype = config.dtype = "float32"
        with _progress_into(gguf_utils, say, f"dequantizing {n} tensors again (float32)"):
            tensors = gguf_utils.load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model,
                                                      torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    # Whatever is saved must have come from the GGUF (a tied head shares the embedding). Non-persistent buffers
    # (rotary frequencies) stay on the meta device: they are not saved, and loading the folder computes them.
    missing = [k for k, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ConversionError(f"{source.name}: {len(missing)} weight(s) of the {config.model_type} model are not in "
                              f"the GGUF (e.g. {', '.join(missing[:3])}); transformers' GGUF tables do not cover it")
    if result.unexpected_keys:
        log.warning("%s: %d tensor(s) not used by the model: %s", source.name, len(result.unexpected_keys),
                    ", ".join(result.unexpected_keys[:5]))
    say(f"building the tokenizer and chat template from {name}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s has no chat template: chat files are refused on this base; text and "
                    "prompt/completion files train as usual", source.name)
    return model, tokenizer, dtype


def _saved_dtype(reader: Any) -> str:
    """The GGUF's float type when every matrix has it; float16 when they are quantized (module docstring)."""
    names = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    for name in ("F32", "F16", "BF16"):
        if names == {name}:
            return FLOAT_TYPES[name]
    return "float32" if "F32" in names else "float16"


class _one_reader:
    """transformers parses the GGUF's metadata anew for the config, the tokenizer and the tensors (seconds each:
    the vocabulary is a Python list of 50k-250k strings): hand it the reader already made for this file."""

    def __init__(self, module: Any, source: Path, reader: Any) -> None:
        self.module, self.source, self.reader = module, source, reader

    def __enter__(self) -> None:
        self.saved = self.module.GGUFReader
        saved, source, reader = self.saved, self.source.resolve(), self.reader

        def reader_for(path: Any, *args: Any, **kwargs: Any) -> Any:
            return reader if Path(path).resolve() == source and not args and not kwargs else saved(path, *args, **kwargs)

        self.module.GGUFReader = reader_for

    def __exit__(self, *exc: Any) -> None:
        self.module.GGUFReader = self.saved


class _progress_into:
    """Report transformers' GGUF tensor loop (its tqdm) through `say`, every tenth of the way."""

    def __init__(self, module: Any, say: Progress, what: str) -> None:
        self.module, self.say, self.what = module, say, what

    def __enter__(self) -> None:
        self.saved = self.module.tqdm
        say, what = self.say, self.what

        def tqdm(iterable: Iterable, **_: Any) -> Iterable:
            items = list(iterable)
            tenth = max(1, len(items) // 10)
            t0 = time.monotonic()
            for i, item in enumerate(items):
                if i % tenth == 0 and i:
                    say(f"{what}: {100 * i // len(items)}% ({time.monotonic() - t0:.0f} s)")
                yield item

        self.module.tqdm = tqdm

    def __exit__(self, *exc: Any) -> None:
        self.module.tqdm = self.saved


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "gguf", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
