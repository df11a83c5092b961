"""What `traind serve` holds in memory: bases, and the adapter versions on them, by the names clients ask for.

    host = ModelHost(cfg, device="cpu")
    target = host.resolve("traind")        # Target: the current version (current.json read now), traind:base, traind:v7
    loaded = host.acquire(target)          # loads the base and the adapter when needed; the target is pinned ...
    with loaded.active(target): logits = loaded.model(...)   # ... so it stays loaded while a request runs on it
    host.release(target)

Names: `traind` is whatever `adapters/current.json` names when the request starts (the base itself before the
first version), `traind:vN` a kept version (a version the forgetting gate holds too), `traind:base` the base
the current version trained on. A version is loaded from its folder with PEFT, as `trainctl sample` does, on
the base it trained on, loaded as the trainer loaded it (daemon.train.inspect.load_base_as_trained). Every
adapter of one base lives in one PeftModel under its own name, so switching between versions between two
forward passes flips which LoRA weights are used and copies nothing. Only the engine thread calls these
methods: nothing here is locked. Reads the adapter store; never writes it (DESIGN.md, Serving).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from daemon import adapters
from daemon.config import Config
from daemon.serve.requests import ApiError

log = logging.getLogger(__name__)

PREFIX = "traind"


@dataclass(frozen=True)
class Target:
    """What a model name means at one moment: a version (or none: the base) on one base."""

    name: str  # the name a response carries: "traind:v7" or "traind:base"
    version: int | None
    generation: int
    base: Path
    adapter_path: Path | None = None
    quantization: str | None = None  # as the adapter's manifest recorded it

    @property
    def adapter_name(self) -> str | None:
        return None if self.version is None else f"v{self.version}"


@dataclass
class LoadedBase:
    path: Path
    generation: int
    model: Any  # the plain model until a first adapter wraps it, then the PeftModel
    tokenizer: Any
    label: str
    context: int  # the model's context length in tokens
    eos_ids: frozenset[int]
    cache_arg: str = "past_key_values"  # the KV cache's keyword (transformers 5.25 renamed it `cache`)
    adapters: dict[int, float] = field(default_factory=dict)  # version -> last used (monotonic)
    pins: dict[int | None, int] = field(default_factory=dict)  # requests running per version (None: the base)
    last_used: float = 0.0
    _active: str | None = None

    @property
    def wrapped(self) -> bool:
        return bool(self.adapters)

    @contextlib.contextmanager
    def active(self, target: Target) -> Iterator[Any]:
        """The model with `target`'s adapter switched on (every adapter off for the base)."""
        if target.version is None:
            if self.wrapped:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        name = target.adapter_name
        if self._active != name:
            self.model.set_adapter(name)
            self._active = name
        yield self.model


class ModelHost:
    def __init__(self, cfg: Config, device: str, clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.device = device
        self.clock = clock
        self.store = cfg.path("adapters")
        self.bases: dict[Path, LoadedBase] = {}
        self._generation0: Path | None = None

    # -- names ----------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> Target:
        """The target `name` means now; ApiError 404 for a name that is not served."""
        if name == PREFIX:
            current = adapters.peek_current(self.store)
            return self._target(current) if current is not None else self._base_target(None)
        if name == f"{PREFIX}:base":
            return self._base_target(adapters.peek_current(self.store))
        if name.startswith(f"{PREFIX}:v") and name[len(PREFIX) + 2:].isdigit():
            number = int(name[len(PREFIX) + 2:])
            for v in adapters.versions(self.store):
                if v.version == number:
                    return self._target(v)
            raise ApiError(404, f"the model {name} does not exist: version {number} is not kept (GET /v1/models lists "
                                "what is)", param="model", code="model_not_found")
        raise ApiError(404, f"the model {name!r} does not exist; this server has traind (the current version), "
                            "traind:base and traind:vN (GET /v1/models)", param="model", code="model_not_found")

    def _target(self, v: adapters.AdapterVersion) -> Target:
        return Target(f"{PREFIX}:v{v.version}", v.version, v.manifest.generation or 0, self._base_path(v),
                      v.path, v.manifest.quantization)

    def _base_target(self, current: adapters.AdapterVersion | None) -> Target:
        generation = (current.manifest.generation or 0) if current is not None else 0
        return Target(f"{PREFIX}:base", None, generation, self._base_path(current),
                      None, current.manifest.quantization if current is not None else None)

    def _base_path(self, v: adapters.AdapterVersion | None) -> Path:
        """The base `v` trained on: its manifest's consolidated base, else generation 0's (resolved once: for a
        GGUF that is the converted folder, made by whichever process comes first)."""
        if v is not None and v.manifest.base_path:
            return Path(v.manifest.base_path).resolve()
        if self._generation0 is None:
            from daemon.train.model import resolve_base

            self._generation0 = resolve_base(self.cfg).resolve()
        return self._generation0

    def listing(self) -> list[dict[str, Any]]:
        """GET /v1/models: traind, traind:base and every kept version, with what each is."""
        current = adapters.peek_current(self.store)
        now = int(time.time())
        out = [_model("traind", now, {"current": True, "version": current.version if current else None,
                                      "generation": (current.manifest.generation or 0) if current else 0}),
               _model("traind:base", now, {"generation": (current.manifest.generation or 0) if current else 0})]
        for v in adapters.versions(self.store):
            created = _epoch(v.manifest.created_at) or now
            out.append(_model(f"traind:v{v.version}", created, {
                "version": v.version, "generation": v.manifest.generation or 0, "file": v.manifest.original_name,
                "current": current is not None and v.version == current.version, "held": bool(v.manifest.held)}))
        return out

    # -- memory ---------------------------------------------------------------------------------------------

    def acquire(self, target: Target) -> LoadedBase:
        """The loaded base with `target` ready on it, pinned until release(); loads what is missing."""
        loaded = self.bases.get(target.base) or self._load_base(target)
        if target.version is not None and target.version not in loaded.adapters:
            self._load_adapter(loaded, target)
        now = self.clock()
        loaded.last_used = now
        if target.version is not None:
            loaded.adapters[target.version] = now
        loaded.pins[target.version] = loaded.pins.get(target.version, 0) + 1
        return loaded

    def release(self, target: Target) -> None:
        loaded = self.bases.get(target.base)
        if loaded is None:
            return
        left = loaded.pins.get(target.version, 0) - 1
        if left > 0:
            loaded.pins[target.version] = left
        else:
            loaded.pins.pop(target.version, None)

    def _load_base(self, target: Target) -> LoadedBase:
        from daemon.train.inspect import load_base_as_trained

        self._make_room_for_base()
        t0 = self.clock()
        version = adapters.AdapterVersion(target.version, target.adapter_path, adapters.read_manifest(target.adapter_path)) \
            if target.adapter_path is not None else adapters.peek_current(self.store)
        model, tokenizer, label = load_base_as_trained(self.cfg, version, self.device)
        import peft  # noqa: F401 - now, not when the first version is published (seconds on a busy CPU)
        model.eval()
        model.config.use_cache = True  # load_base turns it off for training; generation lives on it
        loaded = LoadedBase(target.base, target.generation, model, tokenizer, label, _context(model),
                            _eos_ids(model, tokenizer), _cache_arg(model))
        self.bases[target.base] = loaded
        log.info("loaded base %s (%s) on %s in %.1f s", target.base, label, self.device, self.clock() - t0)
        return loaded

    def _make_room_for_base(self) -> None:
        while len(self.bases) >= self.cfg.serve.max_bases:
            idle = [b for b in self.bases.values() if not b.pins]
            if not idle:
                raise ApiError(503, f"{len(self.bases)} bases are in use by running requests (serve.max_bases); "
                                    "try again when they finish", code="server_busy", kind="server_error",
                               headers={"Retry-After": "5"})
            oldest = min(idle, key=lambda b: b.last_used)
            del self.bases[oldest.path]
            log.info("let go of base %s (least recently used; serve.max_bases = %d)", oldest.path, self.cfg.serve.max_bases)
            _free_memory(self.device)

    def _load_adapter(self, loaded: LoadedBase, target: Target) -> None:
        t0 = self.clock()
        from peft import PeftModel  # imported with the first base (_load_base): here it costs nothing

        self._make_room_for_adapter(loaded)
        try:
            if not loaded.wrapped:
                loaded.model = PeftModel.from_pretrained(loaded.model, str(target.adapter_path),
                                                         adapter_name=target.adapter_name, is_trainable=False)
            else:
                loaded.model.load_adapter(str(target.adapter_path), adapter_name=target.adapter_name, is_trainable=False)
        except (OSError, ValueError) as e:  # pruned or half-written between resolve and load
            raise ApiError(404, f"version {target.version} could not be read ({e}); GET /v1/models lists what is kept",
                           param="model", code="model_not_found") from e
        loaded.model.eval()
        loaded._active = None
        loaded.adapters[target.version] = self.clock()
        log.info("loaded adapter v%d in %.2f s", target.version, self.clock() - t0)

    def _make_room_for_adapter(self, loaded: LoadedBase) -> None:
        limit = self.cfg.serve.max_adapters
        current = adapters.peek_current(self.store)
        keep = {current.version} if current is not None else set()
        while len(loaded.adapters) >= limit:
            idle = [v for v in loaded.adapters if v not in loaded.pins and v not in keep]
            if not idle:
                return  # every one is in use: hold one more for a while rather than refuse
            version = min(idle, key=lambda v: loaded.adapters[v])
            self._drop_adapter(loaded, version)

    def _drop_adapter(self, loaded: LoadedBase, version: int) -> None:
        if len(loaded.adapters) == 1:
            return  # PEFT keeps at least one adapter; the last one costs little
        name = f"v{version}"
        if loaded._active == name:
            other = next(v for v in loaded.adapters if v != version)
            loaded.model.set_adapter(f"v{other}")
            loaded._active = f"v{other}"
        loaded.model.delete_adapter(name)
        del loaded.adapters[version]
        log.info("let go of adapter v%d (least recently used; serve.max_adapters = %d)", version, self.cfg.serve.max_adapters)

    def loaded_summary(self) -> list[dict[str, Any]]:
        # Read by the HTTP and status threads while the engine thread changes it: copies, never live iteration.
        return [{"base": str(b.path), "generation": b.generation, "label": b.label,
                 "versions": sorted(list(b.adapters)), "running": sum(list(b.pins.values()))} for b in list(self.bases.values())]


def _model(name: str, created: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "traind", "traind": meta}


def _epoch(stamp: str | None) -> int | None:
    if not stamp:
        return None
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return None


def _context(model: Any) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _cache_arg(model: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's (a chat model's
    end-of-turn token is often only there)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
