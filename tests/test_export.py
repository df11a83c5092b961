"""`trainctl export` (issue 30, item 3): a kept adapter version as PEFT, merged Hugging Face, merged GGUF (f16,
q8_0), GGUF LoRA and an Ollama Modelfile, each checked by numbers the test computes itself (logits of base +
adapter with PEFT, the merged weights), not by the export's own report.

Default run: the embedded Qwen3 model, and a tiny random Llama (its q/k permutation) built from it in seconds.
`slow`: SmolLM2-135M from its GGUF (the base GGUF's own tensors and metadata).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.harness import write_instance
from daemon import adapters
from daemon.cli import main
from daemon.config import Config, load_config

PROBES = ["a probe the test chose", "and another, longer one to check the export"]


def ctl(capsys: pytest.CaptureFixture, cfg: Config, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["--config", str(cfg.root / "config.json"), *args])
    return rc, capsys.readouterr().out


def publish_store(cfg: Config, lora_std: float = 0.1) -> None:
    """v1 (pruned below), v2 current with a LoRA that moves the logits, v3 held by the forgetting gate."""
    import torch

    from daemon.train.model import load_for_training, publish_adapter

    threads = torch.get_num_threads()
    try:
        lm = load_for_training(cfg, seed=cfg.training.seed)
    finally:
        torch.set_num_threads(threads)
    folder = cfg.path("adapters")
    base = adapters.config_base(cfg)
    m1 = {"version": 1, "parent_version": None, "generation": 0, "base_model": base, "job_id": "job-one",
          "sha256": "1" * 64, "original_name": "one.jsonl", "trained_jobs": ["job-one"], "global_step": 3, "steps": 3}
    publish_adapter(folder, lm.model, m1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained LoRA: B is no longer zero, so base + adapter differs from the base
        for name, p in lm.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * lora_std)
    dataset = [{"sha256": "1" * 64, "job_id": "job-one", "original_name": "one.jsonl", "version": 1, "generation": 0,
                "steps": 3},
               {"sha256": "2" * 64, "job_id": "job-two", "original_name": "facts.jsonl", "version": 2, "generation": 0,
                "steps": 5}]
    m2 = {**m1, "version": 2, "parent_version": 1, "job_id": "job-two", "sha256": "2" * 64,
          "original_name": "facts.jsonl", "trained_jobs": ["job-one", "job-two"], "global_step": 8, "dataset": dataset}
    publish_adapter(folder, lm.model, m2)
    m3 = {**m2, "version": 3, "parent_version": 2, "held": True, "original_name": "held.jsonl"}
    publish_adapter(folder, lm.model, m3, make_current=False)
    shutil.rmtree(folder / adapters.version_dir_name(1))  # as retention prunes it


def build_tiny_llama(dest: Path, like: Path) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer: the q/k permutation without SmolLM2's minutes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(like)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Config]:
    from daemon.train.tinymodel import ensure_embedded

    root = tmp_path_factory.mktemp("export")
    qwen = load_config(write_instance(root / "qwen", models_dir))
    llama_base = build_tiny_llama(root / "tiny-llama", ensure_embedded(models_dir))
    llama = load_config(write_instance(root / "llama", models_dir, base_model=str(llama_base)))
    for cfg in (qwen, llama):
        publish_store(cfg)
    return {"qwen3": qwen, "llama": llama}


def base_folder(cfg: Config) -> Path:
    from daemon.train.model import resolve_base

    return resolve_base(cfg)


def reference(cfg: Config, version: int = 2) -> tuple[Any, Any, Any]:
    """(probe ids, base + adapter logits by PEFT in fp32, merged state dict) as the test computes them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_folder(cfg)
    tok = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                      str(cfg.path("adapters") / adapters.version_dir_name(version)))
    model.eval()
    ids = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert float((expected - plain).abs().max()) > 0.1  # the adapter changes the outputs: a lost one shows
    merged = model.merge_and_unload().state_dict()
    return ids, expected, {k: v.clone() for k, v in merged.items()}


def max_rel(a: Any, b: Any) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def test_export_peft_copies_the_adapter_with_its_lineage(stores, capsys, tmp_path):
    from safetensors.torch import load_file

    cfg = stores["qwen3"]
    rc, said = ctl(capsys, cfg, "export", "v2", "--format", "peft", "--out", str(tmp_path / "peft"))
    assert rc == 0, said
    out, src = tmp_path / "peft", cfg.path("adapters") / "v0002"
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(src / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == cfg.lora.r
    assert json.loads((out / "manifest.json").read_text())["version"] == 2
    lineage = json.loads((out / "traind_lineage.json").read_text())
    assert [f["original_name"] for f in lineage["files_learnt"]] == ["one.jsonl", "facts.jsonl"]
    assert lineage["parents"] == [{"version": 1, "kept": False}] and lineage["base"] == "embedded:tiny-qwen3"
    assert not list(tmp_path.glob(".*export-tmp"))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_export_merged_hf_matches_base_plus_adapter(stores, capsys, tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = stores[arch]
    out = tmp_path / "hf"
    rc, said = ctl(capsys, cfg, "export", "2", "--format", "merged-hf", "--out", str(out), "--dtype", "float32")
    assert rc == 0, said
    assert "check merge" in said and "check merged-hf" in said
    ids, expected, _ = reference(cfg)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(**ids).logits
    assert max_rel(got, expected) <= 1e-4
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base_folder(cfg)).chat_template
    assert json.loads((out / "traind_export.json").read_text())["checks"]["merged-hf"]["dtype"] == "float32"


@pytest.mark.parametrize("arch,kind", [("qwen3", "f16"), ("qwen3", "q8_0"), ("llama", "f16"), ("llama", "q8_0")])
def test_export_merged_gguf_reads_back_as_the_merged_model(stores, capsys, tmp_path, arch, kind):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.train.export import GGUF_TOLERANCE
    from daemon.train.gguf_export import read_keys

    cfg = stores[arch]
    out = tmp_path / "gguf"
    rc, said = ctl(capsys, cfg, "export", "v2", "--format", "merged-gguf", "--type", kind, "--out", str(out))
    assert rc == 0, said
    keys = read_keys(out / "model.gguf")
    assert keys["general.architecture"] == arch and keys["general.type"] == "model"
    assert keys["general.file_type"] == (7 if kind == "q8_0" else 1)  # llama.cpp's MOSTLY_Q8_0, MOSTLY_F16
    assert "<|im_start|>" in keys["tokenizer.chat_template"]
    # llama.cpp's name for GPT-2's split (llama-vocab.cpp refuses to load an unknown one, e.g. "gpt2")
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "gpt-2"
    ids, expected, merged = reference(cfg)
    # transformers reads no head size for qwen3 GGUFs (it takes Qwen3's default 128): the file's own key_length
    extra = {"head_dim": keys["qwen3.attention.key_length"]} if arch == "qwen3" else {}
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32, **extra)
    with torch.no_grad():
        got = model(**ids).logits
    diff = max_rel(got, expected)
    report = json.loads((out / "traind_export.json").read_text())["checks"][f"merged-gguf-{kind}"]
    with capsys.disabled():
        print(f"\n{arch} {kind}: max |logit diff| {diff:.2e} of the scale (export measured {report['relative_diff']:.2e})")
    assert diff <= GGUF_TOLERANCE[kind] and diff > 0  # a GGUF of f16 or q8_0 is not fp32
    if kind == "f16":  # the file holds the merged weights rounded to float16, nothing else
        rounded = {k: (v.half().float() if v.ndim > 1 else v) for k, v in merged.items()}
        model.load_state_dict(rounded)
        with torch.no_grad():
            assert float((model(**ids).logits - got).abs().max()) <= 1e-4 * max(1.0, float(expected.abs().max()))
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    base_tok = AutoTokenizer.from_pretrained(base_folder(cfg))
    assert [tok(t).input_ids for t in PROBES] == [base_tok(t).input_ids for t in PROBES]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_export_gguf_lora_applied_to_the_base_gives_the_merged_weights(stores, capsys, tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from daemon.train.gguf_export import permute_rows, read_keys, read_tensors

    cfg = stores[arch]
    out = tmp_path / "lora"
    rc, said = ctl(capsys, cfg, "export", "2", "--format", "gguf-lora", "--out", str(out))
    assert rc == 0, said
    keys = read_keys(out / "adapter.gguf")
    assert keys["general.type"] == "adapter" and keys["adapter.type"] == "lora"
    assert keys["adapter.lora.alpha"] == pytest.approx(cfg.lora.alpha) and keys["general.architecture"] == arch
    lora = read_tensors(out / "adapter.gguf")
    _, _, merged = reference(cfg)
    base = AutoModelForCausalLM.from_pretrained(base_folder(cfg), dtype=torch.float32).state_dict()
    config = json.loads((base_folder(cfg) / "config.json").read_text())
    checked = 0
    for layer in range(config["num_hidden_layers"]):
        for hf, gg, heads in (("q_proj", "attn_q", config["num_attention_heads"]),
                              ("k_proj", "attn_k", config["num_key_value_heads"]), ("v_proj", "attn_v", None)):
            key = f"model.layers.{layer}.self_attn.{hf}.weight"
            a, b = lora[f"blk.{layer}.{gg}.weight.lora_a"], lora[f"blk.{layer}.{gg}.weight.lora_b"]
            assert a.shape[0] == cfg.lora.r and b.shape[1] == cfg.lora.r
            w, want = base[key], merged[key]
            if arch == "llama" and heads:  # llama.cpp's row order for q and k (convert_hf_to_gguf's permute)
                w, want = permute_rows(w, heads), permute_rows(want, heads)
            applied = w + (b @ a) * (cfg.lora.alpha / cfg.lora.r)
            assert float((applied - want).abs().max()) <= 1e-5
            assert float((w - want).abs().max()) > 1e-3  # the merged weight differs from the base's
            checked += 1
    assert checked == 3 * config["num_hidden_layers"]


def test_export_ollama_writes_a_modelfile_with_template_and_lineage(stores, capsys, tmp_path):
    cfg = stores["qwen3"]
    out = tmp_path / "ollama"
    rc, said = ctl(capsys, cfg, "export", "2", "--format", "ollama", "--out", str(out))
    assert rc == 0, said
    text = (out / "Modelfile").read_text()
    assert "\nFROM ./model.gguf\n" in text and (out / "model.gguf").stat().st_size > 0
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "# traind adapter v2 (generation 0" in text and "#   facts.jsonl (v2, generation 0" in text
    assert "# base: embedded:tiny-qwen3" in text


def test_export_refusals_name_what_and_why(stores, capsys, tmp_path):
    cfg = stores["qwen3"]
    cases = [(("9",), "there is no adapter v9 (kept: v2, v3)"),
             (("1",), "adapter v1 is no longer kept"),
             (("3",), "adapter v3 is held by the forgetting gate"),
             (("2", "--out", str(cfg.path("adapters") / "x")), "inside or above the daemon's adapters folder")]
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    cases.append((("2", "--out", str(full)), "exists and is not empty"))
    for args, message in cases:
        argv = ["export", args[0], "--format", "peft", *(args[1:] or ("--out", str(tmp_path / "fresh")))]
        rc, said = ctl(capsys, cfg, *argv)
        assert rc == 1 and message in said, (args, said)
    assert not (tmp_path / "fresh").exists() and (full / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in cfg.path("adapters").iterdir()) == ["current.json", "v0002", "v0003"]
    rc, said = ctl(capsys, cfg, "export", "2", "--format", "peft", "--out", str(full), "--force")
    assert rc == 0, said
    assert not (full / "mine.txt").exists() and (full / "adapter_model.safetensors").is_file()


def test_an_architecture_gguf_cannot_express_is_refused():
    from transformers import GPT2Config

    from daemon.train.gguf_export import GgufExportError, architecture

    with pytest.raises(GgufExportError, match="architecture 'gpt2' cannot be written as GGUF by traind"):
        architecture(GPT2Config(), "merged-gguf")


# ------------------------------------------------------------ slow: SmolLM2-135M from its GGUF (Llama)


@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The smollm2 instance with a published v2. $TRAIND_EXPORT_MODELS names a models cache that already holds the
    converted GGUF (found by content), else it is converted here (about 85 s)."""
    import os

    from tests.test_real_model import INSTANCE, one_thread

    root = tmp_path_factory.mktemp("export-smollm2")
    raw = json.loads(INSTANCE.read_text())
    models = os.environ.get("TRAIND_EXPORT_MODELS") or str(root / "models")
    raw["paths"] = {**raw["paths"], "models": models}
    raw["training"] = {**raw["training"], "cpu_threads": 1}
    raw["model"] = {**raw["model"], "quantization": "none"}
    (root / "config.json").write_text(json.dumps(raw))
    cfg = load_config(root / "config.json")
    with one_thread():
        publish_store(cfg, lora_std=0.02)
    return cfg


@pytest.mark.slow
def test_smollm2_exports_check_against_its_own_gguf(smollm2_store, capsys, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from daemon.train.export import GGUF_TOLERANCE
    from daemon.train.gguf_export import permute_rows, read_keys, read_tensors
    from tests.test_real_model import one_thread, smollm2_gguf

    cfg, source = smollm2_store, smollm2_gguf()
    with one_thread():
        ids, expected, merged = reference(cfg)
        for kind in ("f16", "q8_0"):
            out = tmp_path / f"gguf-{kind}"
            rc, said = ctl(capsys, cfg, "export", "2", "--format", "merged-gguf", "--type", kind, "--out", str(out))
            assert rc == 0, said
            with capsys.disabled():
                print(said)
            keys, theirs = read_keys(out / "model.gguf"), read_keys(source)
            assert keys["general.architecture"] == "llama"
            assert keys["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
            assert keys["tokenizer.ggml.tokens"] == theirs["tokenizer.ggml.tokens"] == "[49152 items]"
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
            with torch.no_grad():
                diff = max_rel(model(**ids).logits, expected)
            with capsys.disabled():
                print(f"SmolLM2 merged-gguf {kind}: max |logit diff| {diff:.2e} of the scale "
                      f"{float(expected.abs().max()):.1f}; {(out / 'model.gguf').stat().st_size / 2**20:.1f} MiB")
            assert 0 < diff <= GGUF_TOLERANCE[kind]
            del model

        out = tmp_path / "lora"
        rc, said = ctl(capsys, cfg, "export", "2", "--format", "gguf-lora", "--out", str(out))
        assert rc == 0, said
        with capsys.disabled():
            print(said)
        lora = read_tensors(out / "adapter.gguf")
        assert len(lora) == 2 * 7 * 30  # 7 target modules in 30 blocks, A and B each
        base = read_tensors(source, [f"blk.{i}.attn_{w}.weight" for i in (0, 29) for w in "qkv"])
        worst = 0.0
        for i in (0, 29):
            for w, hf, heads in (("q", "q_proj", 9), ("k", "k_proj", 3), ("v", "v_proj", None)):
                name = f"blk.{i}.attn_{w}.weight"
                want = merged[f"model.layers.{i}.self_attn.{hf}.weight"]
                want = permute_rows(want, heads) if heads else want
                applied = base[name] + (lora[name + ".lora_b"] @ lora[name + ".lora_a"]) * (cfg.lora.alpha / cfg.lora.r)
                worst = max(worst, float((applied - want).abs().max()) / float(want.abs().max()))
                # the permutation matters: unpermuted B gives another weight
                assert heads is None or float((base[name] + (permute_rows(lora[name + ".lora_b"], heads) @
                                                             lora[name + ".lora_a"]) * 2 - want).abs().max()) > 10 * worst
        with capsys.disabled():
            print(f"SmolLM2 gguf-lora applied to the Q4_1 base's own tensors: max |diff| {worst:.2e} of the largest weight")
        assert worst <= 2e-3

        out = tmp_path / "ollama"
        rc, said = ctl(capsys, cfg, "export", "2", "--format", "ollama", "--out", str(out))
        assert rc == 0, said
        text = (out / "Modelfile").read_text()
        with capsys.disabled():
            print(said + text)
        assert f"\nFROM {source}\nADAPTER ./adapter.gguf\n" in text and 'SYSTEM """' in text and "TEMPLATE" in text


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path):
    """A folder base's tokenizer is written as llama.cpp's `gpt2` BPE only where it is one: a SentencePiece-style
    BPE (byte_fallback, Llama 2) or an unknown pre-tokenizer would load, and split text differently."""
    from transformers import LlamaConfig

    from daemon.train.gguf_export import GgufExportError, write_model

    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    cases = {"SentencePiece-style BPE": {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}},
             "pre-tokenizer 'Metaspace'": {"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Metaspace"}},
             "the tokenizer is 'Unigram'": {"model": {"type": "Unigram"}}}
    for message, tokenizer in cases.items():
        (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
        with pytest.raises(GgufExportError, match=message):
            write_model(tmp_path / "m.gguf", {}, config, tmp_path, None, "f16")
