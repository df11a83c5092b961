"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (no llama.cpp build): the merged model
(f16 or q8_0) and a LoRA adapter, with the checks that can run here.

    from daemon.train.gguf_export import write_model, write_lora
    arch = architecture(config)                       # refuses, naming why, what llama.cpp cannot be given
    write_model(path, merged_state, config, base_folder, source_gguf, "q8_0")
    write_lora(path, adapter_state, adapter_config, config)

Tensor names are llama.cpp's, from gguf-py's own tables (`get_tensor_name_map`), the reverse of what
daemon/train/convert.py reads through transformers. Llama's q and k rows are permuted the way llama.cpp's
converter does (its rope pairs adjacent rows; Hugging Face's pairs halves): transformers undoes the same
permutation when it reads a llama GGUF. For a LoRA only B is permuted (the rows of B·A are B's rows).

Metadata: where the base came from a GGUF file, every key of that file (hyperparameters, tokenizer, chat
template) is carried over as it was, bar the file type; otherwise the hyperparameters come from the model's
config and the tokenizer from its tokenizer.json (byte-level BPE: llama.cpp's `gpt2` tokenizer model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from daemon.errors import TraindError

log = logging.getLogger(__name__)

# Hugging Face model_type -> (llama.cpp architecture, q/k permuted). Only the ones whose names, hyperparameters
# and read-back were checked here; another architecture is refused rather than written half right.
ARCHITECTURES = {"llama": ("llama", True), "qwen3": ("qwen3", False)}
TYPES = ("f16", "q8_0")
Q8_BLOCK = 32
# Keys the writer sets itself, or that no longer hold once the tensors are re-encoded.
_NOT_COPIED = ("GGUF.", "general.architecture", "general.type", "general.file_type", "general.quantization_version")


class GgufExportError(TraindError):
    """The GGUF cannot be written; the message names what and why."""


def architecture(config: Any, what: str) -> tuple[str, bool]:
    """(llama.cpp architecture name, whether q/k are permuted) for a transformers config, or refuse."""
    import gguf

    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GgufExportError(f"{what}: the base's architecture {model_type!r} cannot be written as GGUF by traind "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))}): its llama.cpp tensor names and "
                              "metadata are not mapped here")
    name, permuted = ARCHITECTURES[model_type]
    if name not in gguf.MODEL_ARCH_NAMES.values():
        raise GgufExportError(f"{what}: the installed gguf package {_version('gguf')} has no {name!r} architecture")
    return name, permuted


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def permute_rows(w: Any, n_head: int) -> Any:
    """Hugging Face's rotary layout of q/k rows (halves) to llama.cpp's (adjacent pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_enum(name: str) -> Any:
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def gguf_name(hf_name: str, tmap: Any, what: str) -> str:
    found = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise GgufExportError(f"{what}: tensor {hf_name} has no llama.cpp name in gguf-py's tables")
    return found


def _permute_for(hf_name: str, config: Any, permuted: bool) -> int | None:
    """The head count to permute this tensor's rows with, or None."""
    if not permuted:
        return None
    if hf_name.endswith("self_attn.q_proj.weight"):
        return int(config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def model_tensors(state: dict[str, Any], config: Any, what: str) -> dict[str, Any]:
    """{llama.cpp name: fp32 torch tensor in llama.cpp's layout} of a merged model's state dict."""
    import gguf

    name, permuted = architecture(config, what)
    tmap = gguf.get_tensor_name_map(_arch_enum(name), int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for hf_name, t in state.items():
        if tied and hf_name == "lm_head.weight":  # llama.cpp uses token_embd when there is no output tensor
            continue
        w = t.detach().float()
        heads = _permute_for(hf_name, config, permuted)
        out[gguf_name(hf_name, tmap, what)] = permute_rows(w, heads) if heads else w
    return out


def _copy_metadata(writer: Any, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for field in reader.fields.values():
        if field.name.startswith(_NOT_COPIED) or not field.types:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            log.warning("%s: key %s is a nested array; not carried over", source.name, field.name)
            continue
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _metadata_from_folder(writer: Any, config: Any, folder: Path, name: str) -> None:
    """Hyperparameters from the config, tokenizer from tokenizer.json (byte-level BPE) and tokenizer_config.json."""
    import gguf

    writer.add_name(folder.name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope:
        writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))

    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "a SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else repr(model.get("type"))
        raise GgufExportError(f"{folder / 'tokenizer.json'}: the tokenizer is {kind}: only a byte-level BPE tokenizer "
                              "is written to GGUF from a folder (a base converted from a GGUF keeps that file's own)")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {a["content"]: a["id"] for a in tok.get("added_tokens") or []}
    vocab.update(special)
    size = max(int(config.vocab_size), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok, name))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    special_vocab.add_to_gguf(writer, quiet=True)
    if not special_vocab.chat_template:
        template = _chat_template(folder)
        if template:
            writer.add_chat_template(template)


def _pre_tokenizer(tok: dict[str, Any], arch: str) -> str:
    """llama.cpp's name for the pre-tokenizer (llama-vocab.cpp refuses to load a name it does not know): a plain
    ByteLevel split is GPT-2's regex."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence" and any(p.get("type") == "Split" for p in pre.get("pretokenizers") or []):
        return "qwen2" if arch.startswith("qwen") else "llama-bpe"  # the regex each family's own models split by
    raise GgufExportError(f"tokenizer.json: pre-tokenizer {pre.get('type')!r} has no llama.cpp name known here")


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = cfg.get("chat_template")
    return template if isinstance(template, str) else None


def rounded(t: Any, kind: str) -> Any:
    """`t` as the GGUF of `kind` holds it, back in fp32 (what _add writes, read back): the reference a read-back
    check compares with, so that it measures the file, not the precision chosen."""
    import gguf
    import torch

    if kind == "f32" or t.ndim < 2:
        return t.float()
    if kind == "q8_0" and t.shape[-1] % Q8_BLOCK == 0:
        q = gguf.quants.quantize(t.detach().float().contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        return torch.from_numpy(back.reshape(t.shape).copy())
    return t.detach().half().float()


def read_back_kwargs(path: Path, config: Any) -> dict[str, Any]:
    """What transformers' GGUF reader misses for this file: it maps no qwen3 `attention.key_length` to head_dim
    (it takes Qwen3's default, 128), so the check passes the head size the file itself holds."""
    if getattr(config, "model_type", None) != "qwen3":
        return {}
    keys = read_keys(path)
    return {"head_dim": int(keys["qwen3.attention.key_length"])}


def _add(writer: Any, name: str, t: Any, kind: str) -> None:
    """One tensor as `kind` (f32, f16, q8_0): vectors stay f32 as llama.cpp keeps norms; q8_0 needs rows in
    blocks of 32 (others are written f16)."""
    import gguf
    import numpy as np

    data = t.detach().float().contiguous().numpy()
    if kind == "f32" or data.ndim < 2:
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def write_model(path: Path, state: dict[str, Any], config: Any, folder: Path, source: Path | None, kind: str) -> int:
    """Write the merged model `state` as a GGUF of `kind` (f16 or q8_0); returns the tensors written."""
    import gguf

    what = "merged-gguf"
    if kind not in TYPES:
        raise GgufExportError(f"{what}: --type {kind!r} is not one of {', '.join(TYPES)}")
    name, _ = architecture(config, what)
    tensors = model_tensors(state, config, what)
    writer = gguf.GGUFWriter(path, name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        if source is not None:
            _copy_metadata(writer, source)
        else:
            _metadata_from_folder(writer, config, folder, name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, t in tensors.items():
            _add(writer, tname, t, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return len(tensors)


def lora_pairs(adapter_state: dict[str, Any], config: Any, what: str) -> dict[str, tuple[Any, Any]]:
    """{llama.cpp base tensor name: (A, B)} of a PEFT adapter's weights, B's rows permuted where the base's are."""
    import gguf

    name, permuted = architecture(config, what)
    tmap = gguf.get_tensor_name_map(_arch_enum(name), int(config.num_hidden_layers))
    halves: dict[str, dict[str, Any]] = {}
    for key, t in adapter_state.items():
        base = key.removeprefix("base_model.model.")
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if base.endswith(suffix):
                halves.setdefault(base[: -len(suffix)] + ".weight", {})[part] = t.detach().float()
                break
        else:
            raise GgufExportError(f"{what}: adapter tensor {key} is not a LoRA A or B matrix (embedding or bias "
                                  "adapters cannot be written as a llama.cpp LoRA)")
    out = {}
    for hf_name, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise GgufExportError(f"{what}: adapter tensor {hf_name} has only lora_{''.join(ab)}")
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            raise GgufExportError(f"{what}: the adapter changes lm_head, which this base ties to its embeddings: "
                                  "llama.cpp has no output tensor to apply it to")
        heads = _permute_for(hf_name, config, permuted)
        b = permute_rows(ab["B"], heads) if heads else ab["B"]
        out[gguf_name(hf_name, tmap, what)] = (ab["A"], b)
    return out


def write_lora(path: Path, pairs: dict[str, tuple[Any, Any]], alpha: float, config: Any, label: str) -> None:
    """Write a llama.cpp LoRA adapter: `<tensor>.lora_a` (r x in) and `<tensor>.lora_b` (out x r) in f32, with
    `adapter.lora.alpha` (llama.cpp scales B·A by alpha / r)."""
    import gguf

    name, _ = architecture(config, "gguf-lora")
    writer = gguf.GGUFWriter(path, name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(label)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tname, (a, b) in pairs.items():
            _add(writer, tname + ".lora_a", a, "f32")
            _add(writer, tname + ".lora_b", b, "f32")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_tensors(path: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Tensors of a GGUF file, dequantized to fp32 torch tensors in their numpy (row-major) shape."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        if names is not None and t.name not in names:
            continue
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(data.reshape(shape).copy())
    return out


def read_keys(path: Path) -> dict[str, Any]:
    """A GGUF's metadata, its arrays shortened to their length (for reports and tests)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for field in reader.fields.values():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            out[field.name] = f"[{len(field.data)} items]"
        elif field.types:
            out[field.name] = field.contents()
    return out
