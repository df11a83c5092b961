"""`trainctl export`: a kept adapter version in a form used outside traind, checked before it is handed over.

    from daemon.train.export import export
    report = export(cfg, version=3, fmt="merged-gguf", out=Path("out"), gguf_type="q8_0")

Formats:
  peft         the PEFT adapter folder (adapter_config.json, adapter_model.safetensors), the version's
               manifest.json and traind_lineage.json (base, generation, files learnt, parent versions).
  merged-hf    the base with the adapter merged in fp32 (consolidate.py's merge and its logit check), saved in the
               base's dtype or --dtype with the tokenizer and chat template; reloaded and compared again.
  merged-gguf  that merged model as one GGUF (f16 or q8_0; daemon/train/gguf_export.py), read back by
               transformers (`gguf_file=`) and compared with the merged model's logits.
  gguf-lora    a llama.cpp LoRA adapter; its A and B, applied to the base's tensors (the base GGUF's own where the
               base came from one), compared with the merged weights.
  ollama       a Modelfile beside the GGUF(s) it names: FROM the base GGUF + ADAPTER the gguf-lora where the base
               is a GGUF file, else FROM the merged GGUF; the chat template as an Ollama TEMPLATE where it is
               ChatML; the lineage in comments.

Everything is written into a temp folder beside --out and renamed into place when complete and checked: a
failed check leaves nothing. Nothing under the daemon's folders is written; the adapter is read only.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from daemon import adapters, atomic
from daemon.config import Config
from daemon.errors import TraindError

log = logging.getLogger(__name__)

FORMATS = ("peft", "gguf-lora", "merged-hf", "merged-gguf", "ollama")
DTYPES = ("float32", "float16", "bfloat16")
REPORT = "traind_export.json"
LINEAGE = "traind_lineage.json"
# The merged GGUF read back by transformers against the merged fp32 model: max |logit diff| relative to the
# logits' scale (the largest |logit| of the probe, at least 1), per tensor type: the cost of the precision chosen.
# Measured (README, "Using a version outside traind"): f16 8.7e-4 of the scale on SmolLM2-135M (logits up to 35),
# 4e-4 to 1e-3 on the embedded Qwen3 and a tiny Llama; q8_0 4.1e-2 on SmolLM2, 1.2e-2 to 2e-2 on the tiny ones.
GGUF_TOLERANCE = {"f16": 2e-2, "q8_0": 1e-1}
# ... and against the merged model with its weights rounded as the file holds them: measured 0 (the same fp32
# arithmetic); a wrong name, permutation or hyperparameter moves logits by a good part of the scale.
FILE_TOLERANCE = 1e-4
# The GGUF LoRA applied to the base's tensors against the merged weights, max |diff| relative to the largest
# |weight|: fp32 arithmetic where the base is the folder itself; the base GGUF's own (quantized) tensors differ
# from the folder's float16 copy by float16 rounding.
LORA_TOLERANCE = {"folder": 1e-5, "gguf": 2e-3}
# Ollama puts the Modelfile's SYSTEM into .Messages itself (as the first message when the request has none).
CHATML_GO = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
             '<|im_start|>assistant\n')

Say = Callable[[str], None]


class ExportError(TraindError):
    """The export is refused or failed; nothing was written to --out. The message names what and why."""


@dataclass
class Report:
    version: int
    fmt: str
    out: Path
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "format": self.fmt, "out": str(self.out), "files": self.files,
                "checks": self.checks, "notes": self.notes, "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class Base:
    folder: Path  # the Hugging Face folder the version trained on
    source_gguf: Path | None  # the GGUF file that folder was converted from (generation 0 on a GGUF base)
    metadata_gguf: Path | None  # the GGUF whose tokenizer and metadata the lineage started from (any generation)
    label: str


def find_version(cfg: Config, version: int) -> adapters.AdapterVersion:
    """The kept, not held, version `version`, or refuse naming what is kept."""
    folder = cfg.path("adapters")
    kept = adapters.versions(folder)
    names = ", ".join(f"v{v.version}" for v in kept) or "none"
    found = next((v for v in kept if v.version == version), None)
    if found is None:
        if kept and version < kept[-1].version:
            raise ExportError(f"adapter v{version} is no longer kept (pruned by adapters.keep_last, or rejected); "
                              f"kept: {names}. `trainctl adapters pin` keeps a version you mean to export")
        raise ExportError(f"there is no adapter v{version} (kept: {names})")
    if found.manifest.held:
        raise ExportError(f"adapter v{version} is held by the forgetting gate: `trainctl adapters accept {version}` "
                          "first (or export a version that is not held)")
    if not (found.path / "adapter_model.safetensors").is_file():
        raise ExportError(f"{found.path} has no adapter_model.safetensors: the version's folder is incomplete")
    return found


def base_of(cfg: Config, v: adapters.AdapterVersion, say: Say) -> Base:
    """The base the version trained on: its consolidated base, or the config's (converted from GGUF if so)."""
    from daemon.bases import is_gguf
    from daemon.train.convert import source_of
    from daemon.train.model import resolve_base

    m = v.manifest
    if m.base_path:
        folder = Path(m.base_path)
        label = f"generation {m.generation} base {folder}"
    else:
        configured = adapters.config_base(cfg)
        if m.base_model and m.base_model != configured:
            raise ExportError(f"adapter v{v.version} was trained on {m.base_model}, but the config's base_model is "
                              f"now {configured}: export it with the config it was trained under")
        folder = resolve_base(cfg, say)
        label = configured
    if not folder.is_dir():
        raise ExportError(f"adapter v{v.version}'s base {folder} is not there any more")
    source = None
    if not m.base_path:  # generation 0: the config's own file (the converted folder's marker names the first path
        # it was converted from, which may be another copy of the same bytes)
        configured_path = cfg.base_model_path
        source = configured_path if configured_path is not None and is_gguf(configured_path) else None
        source = source or _existing((source_of(folder) or {}).get("path"))
    root = source or _lineage_gguf(folder)
    return Base(folder, source, root, label)


def _existing(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).is_file() else None


def _lineage_gguf(folder: Path) -> Path | None:
    """The GGUF at the root of a consolidated base's lineage (its tokenizer and metadata), if still there."""
    seen = 0
    while seen < 100:
        try:
            lineage = json.loads((folder / "lineage.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        parent = lineage.get("parent_base") or {}
        if parent.get("gguf"):
            return _existing(parent["gguf"].get("path"))
        if not parent.get("path"):
            return None
        folder, seen = Path(parent["path"]), seen + 1
    return None


def check_out(cfg: Config, out: Path, force: bool) -> None:
    """Refuse an --out that is not empty (unless --force) or lies in the daemon's folders."""
    out = out.resolve()
    for name in ("adapters", "consolidated", "models"):
        root = cfg.path(name).resolve()
        if out == root or root in out.parents or out in root.parents:
            raise ExportError(f"--out {out} is inside or above the daemon's {name} folder {root}: choose a folder of "
                              "your own (export never writes into the daemon's folders)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty: choose another folder, or --force to replace it")


def lineage_record(cfg: Config, v: adapters.AdapterVersion, base: Base) -> dict[str, Any]:
    folder = cfg.path("adapters")
    chain, parent = [], v.manifest.parent_version
    while parent:
        try:
            m = adapters.read_manifest(folder / adapters.version_dir_name(parent))
        except (OSError, ValueError):
            chain.append({"version": parent, "kept": False})
            break
        chain.append({"version": m.version, "file": m.original_name, "generation": m.generation})
        parent = m.parent_version
    return {"version": v.version, "generation": v.manifest.generation, "base": base.label,
            "base_folder": str(base.folder), "base_gguf": str(base.source_gguf) if base.source_gguf else None,
            "root_gguf": str(base.metadata_gguf) if base.metadata_gguf else None,
            "files_learnt": v.manifest.learnt(), "parents": chain, "created_at": v.manifest.created_at,
            "global_step": v.manifest.global_step, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def export(cfg: Config, version: int, fmt: str, out: Path, force: bool = False, dtype: str | None = None,
           gguf_type: str = "f16", ollama_from: str = "auto", say: Say | None = None) -> Report:
    """Export adapter `version` as `fmt` into `out` (written whole, or not at all)."""
    say = say or (lambda text: None)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    t0 = time.monotonic()
    out = Path(out)
    check_out(cfg, out, force)
    v = find_version(cfg, version)
    base = base_of(cfg, v, say)
    report = Report(version, fmt, out.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
    try:
        lineage = lineage_record(cfg, v, base)
        atomic.write_json(tmp / LINEAGE, lineage)
        shutil.copy2(v.path / adapters.MANIFEST, tmp / adapters.MANIFEST)
        if fmt == "peft":
            _peft(v, tmp)
        else:
            _Exporter(v, base, tmp, report, say).run(fmt, dtype, gguf_type, ollama_from, lineage)
        report.seconds = time.monotonic() - t0
        report.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic.write_json(tmp / REPORT, report.to_dict())
        report.files[REPORT] = (tmp / REPORT).stat().st_size
        tmp.chmod(0o755)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        atomic.publish_dir(tmp, out)
    except FileNotFoundError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"{e.filename} disappeared while exporting (did retention prune v{version}? "
                          "`trainctl adapters pin` keeps it): nothing written") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _peft(v: adapters.AdapterVersion, tmp: Path) -> None:
    from daemon.train.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(v.path / name, tmp / name)


class _Exporter:
    """The formats that need torch: the merge is done once and shared by what the format writes."""

    def __init__(self, v: adapters.AdapterVersion, base: Base, tmp: Path, report: Report, say: Say) -> None:
        self.v, self.base, self.tmp, self.report, self.say = v, base, tmp, report, say
        self._merged: Any = None

    def run(self, fmt: str, dtype: str | None, gguf_type: str, ollama_from: str, lineage: dict[str, Any]) -> None:
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(self.base.folder)
        if fmt == "merged-hf":
            self.merged_hf(dtype)
        elif fmt == "merged-gguf":
            self.merged_gguf(gguf_type, "model.gguf")
        elif fmt == "gguf-lora":
            self.gguf_lora("adapter.gguf")
        elif fmt == "ollama":
            self.ollama(ollama_from, gguf_type, lineage)

    # the merge, as consolidation does it (fp32, checked against base + adapter)
    def merge(self) -> tuple[Any, Any, Any]:
        if self._merged is not None:
            return self._merged
        from daemon.train.consolidate import MERGE_TOLERANCE, merge_in_fp32

        self.say(f"merging v{self.v.version} into {self.base.folder.name} (fp32)")
        merged, tokenizer, ids, got, check = merge_in_fp32(self.base.folder, self.v.path)
        if not check["max_abs_logit_diff"] <= check["tolerance"]:
            raise ExportError(f"the merged model's logits differ from base + adapter by {check['max_abs_logit_diff']:.3g}"
                              f" (tolerance {check['tolerance']:.3g}: {MERGE_TOLERANCE:g} of the scale): nothing written")
        self.report.checks["merge"] = {k: check[k] for k in ("max_abs_logit_diff", "logit_scale", "tolerance")}
        self._merged = (merged, tokenizer, ids, got)
        return self._merged

    def merged_hf(self, dtype: str | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from daemon.train.consolidate import SAVE_TOLERANCE

        merged, tokenizer, ids, got = self.merge()
        saved = dtype or _folder_dtype(self.config)
        self.say(f"saving the merged model ({saved})")
        merged.to(getattr(torch, saved)).save_pretrained(self.tmp, safe_serialization=True)
        merged.to(torch.float32)
        tokenizer.save_pretrained(self.tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(self.tmp, dtype=torch.float32, use_kernels=False)
        reloaded.eval()
        with torch.no_grad():
            again = reloaded(**ids).logits
        diff = float((again - got).abs().max())
        scale = max(1.0, float(got.abs().max()))
        tolerance = SAVE_TOLERANCE[saved] * scale
        self.report.checks["merged-hf"] = {"dtype": saved, "max_abs_logit_diff": diff, "logit_scale": scale,
                                           "tolerance": tolerance}
        if not diff <= tolerance:
            raise ExportError(f"the saved merged model, reloaded, differs from the merged one by {diff:.3g} "
                              f"(tolerance {tolerance:.3g} in {saved}): nothing written")

    def merged_gguf(self, kind: str, name: str) -> Path:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from daemon.train import gguf_export
        from daemon.train.consolidate import PROBE_TEXTS

        gguf_export.architecture(self.config, "merged-gguf")  # refuse before the merge's seconds
        merged, tokenizer, ids, got = self.merge()
        path = self.tmp / name
        self.say(f"writing {name} ({kind})")
        # metadata from the lineage's GGUF where there is one, else the config and tokenizer of the base folder
        n = gguf_export.write_model(path, merged.state_dict(), self.config, self.base.folder, self.base.metadata_gguf,
                                    kind)
        self.say(f"reading {name} back with transformers")
        back = AutoModelForCausalLM.from_pretrained(str(self.tmp), gguf_file=name, dtype=torch.float32,
                                                    **gguf_export.read_back_kwargs(path, self.config))
        back.eval()
        with torch.no_grad():
            again = back(**ids).logits
        del back
        # Against the merged model with its weights rounded as the file holds them: the file itself (names,
        # permutation, metadata) is checked tightly, whatever precision --type chose; then the precision's cost.
        with torch.no_grad(), _rounded_weights(merged, kind):
            as_written = merged(**ids).logits
        scale = max(1.0, float(got.abs().max()))
        file_diff = float((again - as_written).abs().max())
        diff = float((again - got).abs().max())
        tolerance = GGUF_TOLERANCE[kind] * scale
        gtok = AutoTokenizer.from_pretrained(str(self.tmp), gguf_file=name)
        same_ids = all(gtok(t).input_ids == tokenizer(t).input_ids for t in PROBE_TEXTS)
        self.report.checks[f"merged-gguf-{kind}"] = {
            "file": name, "type": kind, "tensors": n, "max_abs_logit_diff": diff, "logit_scale": scale,
            "relative_diff": diff / scale, "tolerance": tolerance, "diff_to_rounded_merged": file_diff,
            "tokenizer_ids_equal": same_ids}
        if not file_diff <= FILE_TOLERANCE * scale:
            raise ExportError(f"{name} read back by transformers differs from the merged model rounded to {kind} by "
                              f"{file_diff:.3g} (tolerance {FILE_TOLERANCE * scale:.3g}): the file is wrong; nothing written")
        if not diff <= tolerance:
            raise ExportError(f"{name} read back by transformers differs from the merged model by {diff:.3g} "
                              f"(tolerance {tolerance:.3g}: {GGUF_TOLERANCE[kind]:g} of the scale {scale:.3g} "
                              f"for {kind}): nothing written")
        if not same_ids:
            raise ExportError(f"{name}: the tokenizer written to the GGUF, read back by transformers, splits the probe "
                              "texts differently from the base's tokenizer: nothing written")
        return path

    def gguf_lora(self, name: str) -> Path:
        import torch
        from peft import PeftConfig
        from safetensors.torch import load_file

        from daemon.train import gguf_export
        from daemon.train.model import ADAPTER_WEIGHTS

        what = "gguf-lora"
        gguf_export.architecture(self.config, what)
        peft_cfg = PeftConfig.from_pretrained(str(self.v.path))
        if getattr(peft_cfg, "use_dora", False):
            raise ExportError(f"{what}: v{self.v.version} is a DoRA adapter; llama.cpp's LoRA format has no magnitude "
                              "vector: export merged-gguf instead")
        r = int(peft_cfg.r)
        scale = float(peft_cfg.lora_alpha) / (r ** 0.5 if getattr(peft_cfg, "use_rslora", False) else r)
        alpha = scale * r  # llama.cpp scales by alpha / r: this alpha gives PEFT's own scale (rsLoRA included)
        state = load_file(str(self.v.path / ADAPTER_WEIGHTS))
        pairs = gguf_export.lora_pairs(state, self.config, what)
        path = self.tmp / name
        self.say(f"writing {name} ({len(pairs)} adapted tensors, alpha {alpha:g}, r {r})")
        gguf_export.write_lora(path, pairs, alpha, self.config, f"traind v{self.v.version}")

        # the check: read the file back, apply B·A·alpha/r to the base's tensors, compare with the merged weights
        merged, *_ = self.merge()
        want = gguf_export.model_tensors(merged.state_dict(), self.config, what)
        back = gguf_export.read_tensors(path)
        if self.base.source_gguf is not None:
            base_tensors, against = gguf_export.read_tensors(self.base.source_gguf, list(pairs)), "gguf"
        else:
            from transformers import AutoModelForCausalLM

            plain = AutoModelForCausalLM.from_pretrained(self.base.folder, dtype=torch.float32, use_kernels=False)
            base_tensors, against = gguf_export.model_tensors(plain.state_dict(), self.config, what), "folder"
            del plain
        worst, worst_name, largest = 0.0, "", 0.0
        for tname in pairs:
            if tname not in base_tensors:
                raise ExportError(f"{what}: {tname} is not a tensor of the base{' GGUF' if against == 'gguf' else ''}")
            a, b = back[tname + ".lora_a"], back[tname + ".lora_b"]
            applied = base_tensors[tname] + (b @ a) * (alpha / r)
            d = float((applied - want[tname]).abs().max())
            largest = max(largest, float(want[tname].abs().max()))
            if d > worst:
                worst, worst_name = d, tname
        tolerance = LORA_TOLERANCE[against] * max(1.0, largest)
        self.report.checks["gguf-lora"] = {"file": name, "tensors": len(pairs), "alpha": alpha, "r": r,
                                           "base_tensors_from": str(self.base.source_gguf) if against == "gguf"
                                           else "base folder", "max_abs_weight_diff": worst, "worst_tensor": worst_name,
                                           "tolerance": tolerance}
        if not worst <= tolerance:
            raise ExportError(f"{what}: the adapter applied to the base's {worst_name} differs from the merged weight by "
                              f"{worst:.3g} (tolerance {tolerance:.3g}): nothing written")
        return path

    def ollama(self, ollama_from: str, kind: str, lineage: dict[str, Any]) -> None:
        if ollama_from not in ("auto", "merged", "adapter"):
            raise ExportError(f"--ollama-from {ollama_from!r} is not one of auto, merged, adapter")
        if ollama_from == "adapter" and self.base.source_gguf is None:
            raise ExportError("ollama --ollama-from adapter: the base is not a GGUF file (Ollama's ADAPTER applies to "
                              "the GGUF it was trained on): use --ollama-from merged")
        use_adapter = ollama_from == "adapter" or (ollama_from == "auto" and self.base.source_gguf is not None)
        if use_adapter:
            self.gguf_lora("adapter.gguf")
            frm = [f"FROM {self.base.source_gguf}", "ADAPTER ./adapter.gguf"]
        else:
            self.merged_gguf(kind, "model.gguf")
            frm = ["FROM ./model.gguf"]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.base.folder)
        template, system, why = ollama_template(tokenizer)
        lines = [f"# traind adapter v{lineage['version']} (generation {lineage['generation']}, "
                 f"global step {lineage['global_step']}), exported {lineage['exported_at']}",
                 f"# base: {lineage['base']}"]
        if lineage["base_gguf"]:
            lines.append(f"# base GGUF: {lineage['base_gguf']}")
        learnt = lineage["files_learnt"]
        lines.append(f"# files learnt ({len(learnt)}):")
        lines += [f"#   {e.get('original_name') or e.get('job_id')} (v{e.get('version')}, generation "
                  f"{e.get('generation', 0)}, sha256 {str(e.get('sha256'))[:16]})" for e in learnt]
        lines += [""] + frm
        if template is not None:
            lines.append(f'TEMPLATE """{template}"""')
            if system:
                lines.append(f'SYSTEM """{system}"""')
            lines.append('PARAMETER stop "<|im_end|>"')
        else:
            lines.append(f"# no TEMPLATE: {why}; Ollama uses the GGUF's tokenizer.chat_template")
        (self.tmp / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.report.checks["ollama"] = {"from": "base + adapter" if use_adapter else "merged", "template": template
                                        is not None, "why_no_template": why}


class _rounded_weights:
    """The model's weights rounded as a GGUF of `kind` holds them, for the `with` block (then restored)."""

    def __init__(self, model: Any, kind: str) -> None:
        self.model, self.kind = model, kind

    def __enter__(self) -> None:
        from daemon.train.gguf_export import rounded

        self.saved = {}
        for name, p in self.model.named_parameters():
            self.saved[name] = p.data
            p.data = rounded(p.data, self.kind)

    def __exit__(self, *exc: Any) -> None:
        for name, p in self.model.named_parameters():
            p.data = self.saved[name]


def _folder_dtype(config: Any) -> str:
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    name = name.removeprefix("torch.")
    return name if name in DTYPES else "float32"


def ollama_template(tokenizer: Any) -> tuple[str | None, str | None, str | None]:
    """(Ollama Go TEMPLATE, default system prompt, None) where the chat template renders ChatML exactly;
    (None, None, why) otherwise: Jinja in general has no Go-template equivalent."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None, None, "the base has no chat template"
    convo = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    try:
        rendered = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(convo[1:2], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that fails to render is reported, not fatal
        return None, None, f"the chat template does not render ({type(e).__name__})"

    def chatml(messages: list[dict[str, str]]) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"

    if rendered != chatml(convo):
        return None, None, "the chat template is not ChatML, and Jinja has no general Ollama (Go) equivalent"
    if bare == chatml(convo[1:2]):
        return CHATML_GO, None, None
    head = "<|im_start|>system\n"
    tail = "<|im_end|>\n" + chatml(convo[1:2])
    if bare.startswith(head) and bare.endswith(tail):  # a default system prompt when none is given
        return CHATML_GO, bare[len(head): -len(tail)], None
    return None, None, "the chat template adds text Ollama's ChatML template cannot reproduce"
