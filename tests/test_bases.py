"""`base_model` checked at validate time (stdlib, no torch): a folder that would not load, a GGUF that is not one."""

import json
import struct
from pathlib import Path

import pytest

from daemon.bases import gguf_header, problems_with
from daemon.config import config_from_dict
from daemon.errors import ConfigError


def _model_folder(folder: Path, config: dict | None = None, weights: bool = True, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "llama"}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def _gguf(path: Path, version: int = 3, tensors: int = 1, arch: str = "llama") -> Path:
    key, value = b"general.architecture", arch.encode()
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, tensors, 1) + kv)
    return path


def _validate(tmp_path: Path, base: Path) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"base_model": str(base)}, tmp_path)
    return e.value


def test_a_folder_without_weights_is_refused_at_validate_time(tmp_path):
    err = _validate(tmp_path, _model_folder(tmp_path / "m", weights=False))
    assert "`base_model`" in str(err) and "has no weights" in str(err)


def test_a_config_that_names_no_model_is_refused(tmp_path):
    err = _validate(tmp_path, _model_folder(tmp_path / "m", config={"hello": 1}))
    assert "names no model" in str(err)


def test_a_folder_without_a_tokenizer_is_refused(tmp_path):
    err = _validate(tmp_path, _model_folder(tmp_path / "m", tokenizer=False))
    assert "has no tokenizer" in str(err)


def test_a_sharded_folder_missing_a_shard_is_refused(tmp_path):
    folder = _model_folder(tmp_path / "m", weights=False)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    err = _validate(tmp_path, folder)
    assert "missing 1 weight shard" in str(err) and "model-00002-of-00002.safetensors" in str(err)


def test_a_complete_folder_and_a_gguf_pass(tmp_path):
    folder = _model_folder(tmp_path / "m")
    assert config_from_dict({"base_model": str(folder)}, tmp_path).base_model_path == folder
    gguf = _gguf(tmp_path / "x.Q4_1.gguf")
    cfg = config_from_dict({"base_model": "x.Q4_1.gguf"}, tmp_path)  # relative to the config's folder
    assert cfg.base_model_path == gguf
    assert gguf_header(gguf).architecture == "llama"


@pytest.mark.parametrize("content, needle", [
    (b"not a gguf at all", "does not start with the GGUF magic"),
    (b"GGUF\x03\x00", "cut short"),
    (b"GGUF" + struct.pack("<IQQ", 1, 1, 0), "GGUF version 1"),
])
def test_a_file_that_is_not_a_readable_gguf_is_refused(tmp_path, content, needle):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    assert needle in str(_validate(tmp_path, path))


def test_a_missing_gguf_is_refused(tmp_path):
    assert "does not exist" in str(_validate(tmp_path, tmp_path / "gone.gguf"))
    assert problems_with(_gguf(tmp_path / "empty.gguf", tensors=0)) == [f"{tmp_path / 'empty.gguf'} holds no tensors (a vocabulary-only GGUF?)"]


def test_a_gguf_without_the_suffix_is_recognised_by_its_magic(tmp_path):
    # Ollama keeps a model as ~/.ollama/models/blobs/sha256-<digest>, with no suffix
    blob = _gguf(tmp_path / "sha256-0123abcd")
    assert config_from_dict({"base_model": str(blob)}, tmp_path).base_model_path == blob
    (tmp_path / "notes").write_text("not a model")
    assert "not a Hugging Face model folder" in str(_validate(tmp_path, tmp_path / "notes"))
