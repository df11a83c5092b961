"""The generation engine of `traind serve`: one thread owns the models; requests wait, run, interleave and end here.

    engine = Engine(cfg, ModelHost(cfg, "cpu"))
    engine.start()                                  # the engine thread
    job = engine.submit(request, sink)              # sink(Event) is called from the engine thread; ApiError at once
    engine.cancel(job)                              # the client went away: its slot is freed at the next token
    engine.stop()

Up to `serve.max_concurrent` requests generate at once, one token each in turn (a long prompt is fed in chunks),
so a stream is never stuck behind another; up to `serve.max_queue` more wait, and beyond that a request is
refused at once (429). A request is bound to the version its model name means when it starts (the store's
`current.json` is read then) and keeps that version, pinned in memory, to its last token, whatever is published
meanwhile; every `serve.follow_seconds` the engine also looks at `current.json` by itself and loads a newly
published version before anyone asks for it. Everything that touches a model runs on the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from daemon import adapters
from daemon.config import Config
from daemon.serve.models import LoadedBase, ModelHost, Target
from daemon.serve.requests import ApiError, GenRequest
from daemon.serve.textstream import TextStream

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens fed per turn: a long prompt does not hold the other streams up for long


@dataclass(frozen=True)
class Event:
    kind: str  # "start" (the version is known), "delta" (text), "done", "error"
    model: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: ApiError | None = None


Sink = Callable[[Event], None]


@dataclass(eq=False)
class Job:
    req: GenRequest
    sink: Sink
    submitted: float
    id: int = 0
    cancelled: bool = False
    target: Target | None = None
    loaded: LoadedBase | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not fed yet
    cache: Any = None
    last: int | None = None
    stream: TextStream | None = None
    prompt_tokens: int = 0
    budget: int = 0  # tokens it may still generate
    counts: dict[int, int] = field(default_factory=dict)
    generator: Any = None
    started: float = 0.0


class Engine:
    def __init__(self, cfg: Config, host: ModelHost, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.sc = cfg.serve
        self.host = host
        self.clock = clock
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_follow = float("-inf")
        self.following: int | None = None  # the version current.json named when last looked at
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.stats: dict[str, Any] = {"requests": 0, "completed": 0, "failed": 0, "refused": 0, "cancelled": 0,
                                      "tokens": 0, "swaps": []}

    # -- called from the HTTP side ----------------------------------------------------------------------------

    def submit(self, req: GenRequest, sink: Sink) -> Job:
        if not self.ready.is_set():
            raise ApiError(503, self.load_error or "the model is still loading; try again in a few seconds",
                           code="model_loading", kind="server_error", headers={"Retry-After": "5"})
        job = Job(req, sink, self.clock())
        with self._wake:
            if len(self.waiting) + len(self.active) >= self.sc.max_concurrent + self.sc.max_queue:
                self.stats["refused"] += 1
                raise ApiError(429, f"{len(self.active)} requests are generating and {len(self.waiting)} waiting "
                                    f"(serve.max_concurrent = {self.sc.max_concurrent}, serve.max_queue = "
                                    f"{self.sc.max_queue}); try again shortly", code="too_many_requests",
                               kind="rate_limit_error", headers={"Retry-After": "1"})
            job.id = next(self._ids)
            self.stats["requests"] += 1
            self.waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"ready": self.ready.is_set(), "error": self.load_error, "active": len(self.active),
                    "waiting": len(self.waiting), "following": self.following,
                    **{k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()},
                    "loaded": self.host.loaded_summary()}

    # -- the engine thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def warm_up(self) -> None:
        """Load what `traind` means now, so the first request does not wait for the base."""
        target = self.host.resolve("traind")
        self.host.acquire(target)
        self.host.release(target)
        self.following = target.version
        self.ready.set()

    def _run(self) -> None:
        try:
            self.warm_up()
        except Exception as e:  # a base that cannot load: every request says so (503), the process stays up
            log.exception("the model could not be loaded")
            self.load_error = f"the model could not be loaded: {e}"
            return
        while True:
            with self._wake:
                if self._stopping:
                    break
                if not self.waiting and not self.active:
                    self._wake.wait(self.sc.follow_seconds)
            try:
                self.run_once()
            except Exception:  # never leave the requests waiting on a dead thread: log it and go on
                log.exception("the engine's turn failed; going on")
                time.sleep(0.5)

    def run_once(self) -> bool:
        """One turn: follow current.json, start what can start, one token (or prompt chunk) for each running
        request. False when there was nothing to do."""
        self.follow()
        admitted = self._admit()
        running = list(self.active)
        for job in running:
            if job.cancelled:
                self._end(job, None, cancelled=True)
                continue
            try:
                self._step(job)
            except ApiError as e:
                self._end(job, e)
            except Exception as e:  # a failure inside the model: this request fails, the others go on
                log.exception("request %d failed", job.id)
                self._end(job, ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error",
                                        code="generation_failed"))
        return bool(admitted or running)

    def follow(self, force: bool = False) -> None:
        """Every follow_seconds: a version newly made current is loaded now, so requests find it ready."""
        now = self.clock()
        if not force and now - self._last_follow < self.sc.follow_seconds:
            return
        self._last_follow = now
        current = adapters.peek_current(self.host.store)
        version = current.version if current is not None else None
        if version == self.following:
            return
        try:
            target = self.host.resolve("traind")
            self.host.acquire(target)
            self.host.release(target)
        except ApiError as e:  # pruned or unreadable for a moment: looked at again next time
            log.warning("could not load the new current version: %s", e.message)
            return
        except Exception:  # a base that does not load (memory, a broken folder): requests still get the old one
            log.exception("could not load the new current version %s; trying again in %g s", version, self.sc.follow_seconds)
            return
        self._note_swap(target, current)

    def _note_swap(self, target: Target, current: adapters.AdapterVersion | None) -> None:
        published = None
        if current is not None:
            try:
                published = (self.host.store / adapters.CURRENT).stat().st_mtime
            except OSError:
                published = None
        lag = time.time() - published if published else None
        log.info("now serving %s as traind%s", target.name, f" ({lag:.1f} s after it was made current)" if lag is not None else "")
        with self._lock:
            self.following = target.version
            swaps = self.stats["swaps"]
            swaps.append({"version": target.version, "at": time.time(), "lag_seconds": None if lag is None else round(lag, 3)})
            del swaps[:-20]

    def _admit(self) -> int:
        admitted = 0
        now = self.clock()
        while True:
            with self._lock:
                while self.waiting and (self.waiting[0].cancelled or now - self.waiting[0].submitted > self.sc.queue_timeout_seconds):
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        self.stats["failed"] += 1
                        job.sink(Event("error", error=ApiError(
                            503, f"waited {self.sc.queue_timeout_seconds:g} s for a free slot (serve.queue_timeout_seconds)",
                            code="queue_timeout", kind="server_error", headers={"Retry-After": "5"})))
                    else:
                        self.stats["cancelled"] += 1
                if not self.waiting or len(self.active) >= self.sc.max_concurrent:
                    return admitted
                job = self.waiting.popleft()
            try:
                self._begin(job)
            except ApiError as e:
                self._end(job, e)
                continue
            except Exception as e:  # loading what it asked for failed: this request fails, the others go on
                log.exception("request %d could not start", job.id)
                self._end(job, ApiError(500, f"could not start: {type(e).__name__}: {e}", kind="server_error",
                                        code="generation_failed"))
                continue
            with self._lock:
                self.active.append(job)
            admitted += 1

    def _begin(self, job: Job) -> None:
        import torch

        job.target = self.host.resolve(job.req.model)  # the version this request keeps to its end
        job.loaded = self.host.acquire(job.target)
        job.started = self.clock()
        ids = self._prompt_ids(job.req, job.loaded)
        limit = min(self.sc.max_prompt_tokens, job.loaded.context - 1)
        param = "messages" if job.req.kind == "chat" else "prompt"
        if len(ids) > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens after the chat template; at most {limit} are taken "
                                f"(serve.max_prompt_tokens, and the model's context of {job.loaded.context})",
                           param=param, code="context_length_exceeded")
        job.pending = ids
        job.prompt_tokens = len(ids)
        job.budget = min(job.req.max_tokens, job.loaded.context - len(ids))
        job.stream = TextStream(job.loaded.tokenizer, job.req.stop)
        if job.req.temperature > 0:
            seed = (job.req.seed & (2**63 - 1)) if job.req.seed is not None else secrets.randbits(63)
            job.generator = torch.Generator().manual_seed(seed)
        job.sink(Event("start", model=job.target.name))

    def _prompt_ids(self, req: GenRequest, loaded: LoadedBase) -> list[int]:
        tok = loaded.tokenizer
        if req.kind == "completion":
            ids = tok(req.prompt)["input_ids"]
            if not ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            return list(ids)
        turns = [{"role": r, "content": c} for r, c in req.messages]
        if not getattr(tok, "chat_template", None):
            text = "".join(f"{r}: {c}\n" for r, c in req.messages) + "assistant: "
        else:
            try:
                text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the template's own refusal (roles it does not take, alternation)
                raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from e
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _step(self, job: Job) -> None:
        import torch

        if job.pending:
            feed, job.pending = job.pending[:PREFILL_CHUNK], job.pending[PREFILL_CHUNK:]
        else:
            feed = [job.last]
        with torch.inference_mode(), job.loaded.active(job.target) as model:
            ids = torch.tensor([feed], device=self.host.device)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{job.loaded.cache_arg: job.cache})
        job.cache = getattr(out, job.loaded.cache_arg)
        if job.pending:
            return  # more of the prompt to feed before the first token
        token = self._pick(job, out.logits[0, -1].float())
        job.last = token
        job.budget -= 1
        job.counts[token] = job.counts.get(token, 0) + 1
        self.stats["tokens"] += 1
        if token in job.loaded.eos_ids and not job.req.ignore_eos:
            self._finish(job, "stop")
            return
        delta = job.stream.push(token)
        if delta:
            job.sink(Event("delta", text=delta))
        if job.stream.stopped:
            self._finish(job, "stop")
        elif job.budget <= 0:
            self._finish(job, "length")

    def _pick(self, job: Job, logits: Any) -> int:
        import torch

        req = job.req
        if job.counts and (req.frequency_penalty or req.presence_penalty):
            ids = torch.tensor(list(job.counts), device=logits.device)
            counts = torch.tensor(list(job.counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[ids] -= req.frequency_penalty * counts + req.presence_penalty
        if req.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / req.temperature, dim=-1).cpu()
        if req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < req.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=job.generator))

    def _finish(self, job: Job, reason: str) -> None:
        tail = job.stream.finish()
        if tail:
            job.sink(Event("delta", text=tail))
        completion = sum(job.counts.values())  # every token generated, the end-of-turn one included
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": job.prompt_tokens + completion}
        with self._lock:
            self.stats["completed"] += 1
        job.sink(Event("done", model=job.target.name, finish_reason=reason, usage=usage))
        self._release(job)

    def _end(self, job: Job, error: ApiError | None, cancelled: bool = False) -> None:
        with self._lock:
            self.stats["cancelled" if cancelled else "failed"] += 1
        if error is not None:
            job.sink(Event("error", error=error))
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            if job in self.active:
                self.active.remove(job)
        if job.target is not None and job.loaded is not None:
            self.host.release(job.target)
        job.cache = None
