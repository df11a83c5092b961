"""Do llama.cpp's own greedy outputs agree with transformers' on what `trainctl export` writes?

    .venv/bin/python bench/export_llamacpp.py --llama-python /path/to/venv/bin/python [--models DIR] [--json out.json]

`--llama-python` is a Python with llama-cpp-python installed (built from its sdist: pip install llama-cpp-python;
the export itself never needs it). One adapter version is published on each base (a LoRA with random B, so
that it changes the outputs), exported, and greedy continuations of a few prompts (24 tokens, raw text, no chat
template) compared token by token:

  smollm2   transformers: base + adapter merged in fp32 (PEFT)  |  llama.cpp: merged-gguf f16, merged-gguf q8_0,
            the base's own Q4_1 GGUF with gguf-lora as --lora (llama.cpp's LoRA path, Llama's q/k permutation)
  tiny      the embedded Qwen3: transformers merged  |  llama.cpp: merged-gguf f16 (metadata and tokenizer
            written from the folder, no source GGUF)

Printed: per prompt and per file, how many leading tokens agree with transformers (out of 24), and whether
llama.cpp's tokenizer (from the GGUF's metadata) splits the prompts as the base's tokenizer does. Figures for
reading, never asserted: f16 and the merged model should agree to the end; q8_0 and Q4_1 + LoRA are other
weights, and may part after a few tokens where two candidates are close.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]
NEW_TOKENS = 24
LLAMA_SIDE = r"""
import json, sys
import llama_cpp.llama_cpp as raw
defaults = raw.llama_model_default_params
def no_repack():  # the AMX / repacked weight buffers crash (SIGSEGV) on quantized weights on this CPU, any GGUF's
    p = defaults()
    p.use_extra_bufts = False
    return p
raw.llama_model_default_params = no_repack
from llama_cpp import Llama
job = json.loads(sys.argv[1])
llm = Llama(model_path=job["model"], lora_path=job.get("lora"), n_ctx=256, n_threads=2, verbose=False, seed=0)
out = []
for ids in job["prompts"]:
    llm.reset()
    got = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(int(tok))
        if len(got) >= job["n"]:
            break
    out.append(got)
toks = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in job["texts"]]
print(json.dumps({"gen": out, "tok": toks}))
"""


def transformers_greedy(folder: Path, adapter: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), str(adapter))
    merged = model.merge_and_unload().eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = merged.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        out.append(gen[0, len(ids):].tolist())
    return out


def llama_greedy(python: str, model: Path, prompts: list[list[int]], lora: Path | None = None) -> dict:
    job = {"model": str(model), "lora": str(lora) if lora else None, "prompts": prompts, "n": NEW_TOKENS,
           "texts": PROMPTS}
    r = subprocess.run([python, "-c", LLAMA_SIDE, json.dumps(job)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp failed on {model.name}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_base(name: str, cfg, python: str, out: Path, results: dict) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from daemon.cli import main
    from daemon.train.model import resolve_base

    folder = resolve_base(cfg)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(p).input_ids for p in PROMPTS]
    want = transformers_greedy(folder, cfg.path("adapters") / "v0002", prompts)
    files: dict[str, tuple[Path, Path | None]] = {}
    kinds = ("f16", "q8_0") if name == "smollm2" else ("f16",)
    for kind in kinds:
        dest = out / f"{name}-{kind}"
        assert main(["--config", str(cfg.root / "config.json"), "export", "2", "--format", "merged-gguf", "--type", kind,
                     "--out", str(dest)]) == 0
        files[f"merged-gguf {kind}"] = (dest / "model.gguf", None)
    if cfg.base_model_path is not None and cfg.base_model_path.suffix == ".gguf":
        dest = out / f"{name}-lora"
        assert main(["--config", str(cfg.root / "config.json"), "export", "2", "--format", "gguf-lora", "--out", str(dest)]) == 0
        files["base gguf + gguf-lora"] = (cfg.base_model_path, dest / "adapter.gguf")
    for label, (model, lora) in files.items():
        said = llama_greedy(python, model, prompts, lora)
        got, same_tokens = said["gen"], said["tok"] == prompts
        row = [agree(w, g) for w, g in zip(want, got)]
        results[f"{name}: {label}"] = {"agree": row, "of": NEW_TOKENS, "tokenizer_equal": same_tokens,
                                       "llama_cpp_text": [tok.decode(g) for g in got],
                                       "transformers_text": [tok.decode(w) for w in want]}
        print(f"{name}: {label}: leading tokens equal to transformers' merged model: {row} of {NEW_TOKENS}; "
              f"llama.cpp tokenizes the prompts {'the same' if same_tokens else 'differently'}", flush=True)


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", required=True)
    p.add_argument("--models", help="a models cache that already holds SmolLM2 converted (else it converts, ~85 s)")
    p.add_argument("--json")
    args = p.parse_args()
    import torch

    from bench.harness import write_instance
    from daemon.config import load_config
    from tests.test_export import publish_store
    from tests.test_real_model import INSTANCE

    torch.set_num_threads(2)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = Path(args.models) if args.models else root / "models"
        raw = json.loads(INSTANCE.read_text())
        raw["paths"] = {**raw["paths"], "models": str(models)}
        raw["model"] = {**raw["model"], "quantization": "none"}
        (root / "smollm2").mkdir()
        (root / "smollm2" / "config.json").write_text(json.dumps(raw))
        smollm2 = load_config(root / "smollm2" / "config.json")
        publish_store(smollm2, lora_std=0.02)
        tiny = load_config(write_instance(root / "tiny", models))
        publish_store(tiny)
        run_base("tiny", tiny, args.llama_python, root, results)
        run_base("smollm2", smollm2, args.llama_python, root, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main_()
