"""Trainer side of the data: tokenise records, split train/eval, stream shuffled examples.

    from daemon.train.data import plan_file, eval_examples, train_examples
    plan = plan_file(path, fmt, tokenizer, cfg.data, seed)             # counts for total_steps
    evals = eval_examples(path, fmt, tokenizer, cfg.data, seed)
    for epoch in range(epochs):
        for ex in train_examples(path, fmt, tokenizer, cfg.data, seed, epoch):   # same order every time
            ...                                                         # daemon.train.batching makes micro-batches

Everything is a deterministic function of (file, tokenizer, data config, seed,
epoch): a resumed run re-creates the iterator and skips the micro-batches it
already trained, and sees exactly what an uninterrupted run would have seen.

How each format is trained (labels are -100 where there is no loss):
- chat: rendered with the tokenizer's chat template; loss on assistant turns
  with weight 1, up to and including their end-of-turn token.
- prompt_completion: [bos] prompt completion eos; loss on completion and eos.
- text: [bos] text eos; loss on every token.
- alpaca: as a chat (user: instruction [+ "\\n\\n" + input], assistant: output) when the
  tokenizer has a chat template, else the classic Alpaca prompt with loss on the response.
- preference, preference_chat: a Pair, the prompt followed by each answer (as prompt_completion, or as
  a chat ending with the answer's assistant turn), scored on the answer; the file's iterators give
  Pairs (daemon/train/preference.py trains them). Where one answer is wanted (a keep-set, replay,
  `tokenize_record`) the chosen side stands for the pair. A prompt that alone fills max_length is
  a bad line (nothing of either answer would be left to compare).
Sequences are cut to `max_length` from the right; an example left with no trainable
token is dropped (None).

A record the tokenizer or its chat template refuses (what validation cannot foresee: a
template that raises on non-alternating roles, text a tokenizer cannot encode) is a bad
line like those validation finds: named by its line, skipped under bad_line_policy=skip
within the limits (validation's bad lines count too), failing the file otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from daemon.config import DataConfig
from daemon.errors import DataError
from daemon.validate import DataFormat, LineError, Record, bad_line_refusal, iter_records

log = logging.getLogger(__name__)

IGNORE = -100  # the label value torch's cross_entropy ignores (its default ignore_index)
MAX_NAMED_LINES = 50  # bad lines carried in an error (as validation's MAX_REPORTED_ERRORS)

# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3). Loss on an
# assistant turn stops after the last of these (or eos), so the template's newline after
# the marker stays context: the model learns to stop at the marker, as it does at inference.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

# The Alpaca prompt (Taori et al. 2023, github.com/tatsu-lab/stanford_alpaca, train.py).
_ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One tokenised record; `labels[i]` is -100 where position i carries no loss."""

    line: int
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Pair:
    """One tokenised preference record: the same prompt with the chosen and with the rejected answer."""

    line: int
    chosen: Example
    rejected: Example

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' tokens: what the pair costs to compute (batching groups and counts by it)."""
        return self.chosen.input_ids + self.rejected.input_ids


def supervised(ex: Example | Pair) -> Example:
    """The one answer a record stands for where a single one is scored: a pair's chosen side."""
    return ex.chosen if isinstance(ex, Pair) else ex


@dataclass(frozen=True)
class FilePlan:
    """What one epoch over a file holds. `n_train_tokens` is the sum of len(input_ids) of the train examples."""

    n_train: int
    n_eval: int
    n_dropped: int  # valid records with no trainable token left after truncation
    n_train_tokens: int
    held_out: tuple[Example, ...] = field(default=(), compare=False)  # the eval examples, met on the same pass
    skipped: tuple[LineError, ...] = ()  # records the tokenizer refused, skipped under bad_line_policy=skip


class TokenizerUnfit(DataError):
    """The tokenizer cannot render this format at all (no chat template, no eos token): every record alike."""


class RecordError(DataError):
    """Records the tokenizer or its chat template refused; `errors` names their lines (as validation's do)."""

    def __init__(self, message: str, errors: list[LineError]) -> None:
        super().__init__(message)
        self.errors = errors


# ---------------------------------------------------------------- tokenising one record


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Special tokens come from the template or are added explicitly, never implicitly.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise TokenizerUnfit(f"tokenizer {_name(tokenizer)!r} has no eos_token; set one in its tokenizer_config.json")
    return int(tokenizer.eos_token_id)


def _bos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]


def _end_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    unk = tokenizer.unk_token_id
    for tok in _END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != unk:
            ids.add(int(tid))
    return ids


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises what the template author wrote; say whose template failed
        raise DataError(f"the chat template of tokenizer {_name(tokenizer)!r} failed: {e}") from e


def _chat_segments(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trainable) pieces.

    For assistant turn i the trainable text is render(messages[:i+1]) beyond
    render(messages[:i], add_generation_prompt=True). That needs a prefix-consistent
    template, which is checked, not assumed.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerUnfit(f"tokenizer {_name(tokenizer)!r} has no chat_template; chat data needs one")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, plain, False)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already in segments
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, plain[:i], True)
        turn = _render(tokenizer, plain[: i + 1], False)
        if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= done):
            raise DataError(
                f"the chat template of tokenizer {_name(tokenizer)!r} is not prefix-consistent at message {i}: "
                "rendering the conversation up to an assistant turn does not extend the rendering before it, "
                "so the assistant tokens cannot be located; use a template without history rewriting"
            )
        segments.append((full[done : len(prompt)], False))
        segments.append((full[len(prompt) : len(turn)], msg["weight"] == 1))
        done = len(turn)
    segments.append((full[done:], False))
    return [(text, trainable) for text, trainable in segments if text]


def _tokenize_segments(tokenizer: Any, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels for chat segments; a trainable piece's loss ends at its last end-of-turn token."""
    end_ids = _end_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in segments:
        piece = _encode(tokenizer, text)
        if trainable:
            ends = [k for k, t in enumerate(piece) if t in end_ids]
            cut = ends[-1] + 1 if ends else len(piece)
            labels += piece[:cut] + [IGNORE] * (len(piece) - cut)
        else:
            labels += [IGNORE] * len(piece)
        ids += piece
    return ids, labels


def _prompt_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    head = _bos(tokenizer) + _encode(tokenizer, prompt)
    tail = _encode(tokenizer, completion) + [_eos(tokenizer)]
    return head + tail, [IGNORE] * len(head) + tail


def _alpaca_messages(data: dict) -> list[dict]:
    user = data["instruction"] + ("\n\n" + data["input"] if data["input"] else "")
    return [
        {"role": "user", "content": user, "weight": 0},
        {"role": "assistant", "content": data["output"], "weight": 1},
    ]


def _answer_ids(record: Record, tokenizer: Any, side: str) -> tuple[list[int], list[int]]:
    """Prompt plus one answer of a pair, loss on the answer (its end-of-turn or eos included)."""
    data = record.data
    if record.format == DataFormat.PREFERENCE:
        return _prompt_completion(tokenizer, data["prompt"], data[side])
    messages = data["messages"] + [{"role": "assistant", "content": data[side], "weight": 1}]
    return _tokenize_segments(tokenizer, _chat_segments(tokenizer, messages))


def _ids_and_labels(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    data = record.data
    if record.format.is_preference:
        return _answer_ids(record, tokenizer, "chosen")
    if record.format == DataFormat.CHAT:
        return _tokenize_segments(tokenizer, _chat_segments(tokenizer, data["messages"]))
    if record.format == DataFormat.PROMPT_COMPLETION:
        return _prompt_completion(tokenizer, data["prompt"], data["completion"])
    if record.format == DataFormat.TEXT:
        ids = _bos(tokenizer) + _encode(tokenizer, data["text"]) + [_eos(tokenizer)]
        return ids, list(ids)
    if record.format == DataFormat.ALPACA:
        if getattr(tokenizer, "chat_template", None):
            return _tokenize_segments(tokenizer, _chat_segments(tokenizer, _alpaca_messages(data)))
        template = _ALPACA_PROMPT_INPUT if data["input"] else _ALPACA_PROMPT
        return _prompt_completion(tokenizer, template.format(**data), data["output"])
    raise DataError(f"line {record.line}: unknown format {record.format!r}")


def tokenize_record(record: Record, tokenizer: Any, max_length: int) -> Example | None:
    """Tokenise one validated record; None when truncation to `max_length` leaves nothing to learn.

    Raises TokenizerUnfit when the tokenizer cannot render the format at all (no chat
    template, no eos token), RecordError naming the line when it refuses this record.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    try:
        ids, labels = _ids_and_labels(record, tokenizer)
    except (TokenizerUnfit, MemoryError):
        raise
    except DataError as e:  # the template refused this record (or is not prefix-consistent on it)
        raise _record_error(record, str(e)) from e
    except Exception as e:  # the tokenizer's own failure on this text: validation did not foresee it, so name it
        raise _record_error(record, f"the tokenizer {_name(tokenizer)!r} cannot encode this record "
                                    f"({type(e).__name__}: {e})") from e
    ids, labels = ids[:max_length], labels[:max_length]
    # Causal LMs predict position k from positions < k, so a label at position 0 teaches nothing.
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Example(record.line, ids, labels)


def tokenize_pair(record: Record, tokenizer: Any, max_length: int) -> Pair:
    """Tokenise one preference record; each side is cut to `max_length` from the right.

    Raises RecordError naming the line when the prompt alone leaves neither answer a token within
    `max_length` (a pair whose answers are cut away compares nothing), or when the tokenizer refuses it.
    """
    sides = []
    for side in ("chosen", "rejected"):
        try:
            ids, labels = _answer_ids(record, tokenizer, side)
        except (TokenizerUnfit, MemoryError):
            raise
        except DataError as e:
            raise _record_error(record, str(e)) from e
        except Exception as e:
            raise _record_error(record, f"the tokenizer {_name(tokenizer)!r} cannot encode this record "
                                        f"({type(e).__name__}: {e})") from e
        prompt = next((k for k, t in enumerate(labels) if t != IGNORE), len(labels))
        if prompt >= max_length:
            field = "messages" if record.format == DataFormat.PREFERENCE_CHAT else "prompt"
            error = LineError(record.line, field, f"the prompt alone is {prompt} tokens, data.max_length is "
                                                  f"{max_length}: nothing of the answers would be scored; "
                                                  "shorten the prompt or raise data.max_length")
            raise RecordError(str(error), [error])
        sides.append(Example(record.line, ids[:max_length], labels[:max_length]))
    return Pair(record.line, sides[0], sides[1])


def _record_error(record: Record, reason: str) -> RecordError:
    # The field, where the format has one string to blame; a chat template renders the whole conversation.
    where = {DataFormat.TEXT: "text", DataFormat.CHAT: "messages", DataFormat.PREFERENCE_CHAT: "messages"}.get(record.format, "")
    error = LineError(record.line, where, reason)
    return RecordError(str(error), [error])


# ---------------------------------------------------------------- split and order


@dataclass
class _BadLines:
    """What one pass over a file met besides examples: validation's bad lines (counted) and the ones the
    tokenizer refused (counted, the first named). With `data_cfg` the bad-line policy is applied as they
    come: under reject the first one fails the file, under skip the one past max_bad_lines does."""

    name: str = ""
    data_cfg: DataConfig | None = None
    n_validation: int = 0
    n_refused: int = 0
    first: list[LineError] = field(default_factory=list)

    def validation_bad(self, error: LineError) -> None:
        self.n_validation += 1

    def refused(self, errors: list[LineError]) -> None:
        self.n_refused += len(errors)
        self.first.extend(errors[: MAX_NAMED_LINES - len(self.first)])
        cfg = self.data_cfg
        if cfg is not None and (cfg.bad_line_policy == "reject" or self.n_bad > cfg.max_bad_lines):
            # Mid-pass only the limits that do not depend on the good lines apply (hence n_valid 1).
            self.fail(bad_line_refusal(1, self.n_bad, cfg) or "")

    @property
    def n_bad(self) -> int:
        return self.n_validation + self.n_refused

    def check(self, n_valid: int) -> None:
        """At the end of the pass: fail the file if the limits say so, else log what is skipped."""
        if not self.n_refused or self.data_cfg is None:
            return
        refusal = bad_line_refusal(n_valid, self.n_bad, self.data_cfg)
        if refusal is not None:
            self.fail(refusal)
        log.warning("%s: %d line(s) the tokenizer refused, skipped (bad_line_policy skip): %s", self.name,
                    self.n_refused, "; ".join(str(e) for e in self.first[:5]) + (" ..." if self.n_refused > 5 else ""))

    def fail(self, refusal: str) -> None:
        more = self.n_refused - 1
        raise RecordError(f"{self.name}: {refusal}, found by the tokenizer: {self.first[0]}"
                          + (f"; and {more} more" if more else ""), list(self.first))


def is_eval_line(line: int, seed: int, eval_fraction: float) -> bool:
    """Whether a line is selected for eval: a seeded hash of the line number (stable across runs and machines)."""
    if eval_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < eval_fraction


def _classified(path: str | os.PathLike, fmt: DataFormat, tokenizer: Any, data_cfg: DataConfig, seed: int,
                bad: _BadLines | None = None) -> Iterator[tuple[str, Example | None]]:
    """("train" | "eval" | "dropped", example) for every valid record the tokenizer takes, in file order;
    the others are counted in `bad` (plan_file applies the bad-line policy to them, before any step).

    Eval takes the first `eval_max_examples` eval-selected examples, but never one
    before the first train example: a small file must keep something to train on.
    """
    bad = bad if bad is not None else _BadLines()
    n_eval = n_train = 0
    tokenize = tokenize_pair if DataFormat(fmt).is_preference else tokenize_record
    for record in iter_records(path, fmt, data_cfg.max_line_bytes, on_bad=bad.validation_bad):
        try:
            ex = tokenize(record, tokenizer, data_cfg.max_length)
        except RecordError as e:
            bad.refused(e.errors)
            continue
        if ex is None:
            yield "dropped", None
        elif n_train and n_eval < data_cfg.eval_max_examples and is_eval_line(ex.line, seed, data_cfg.eval_fraction):
            n_eval += 1
            yield "eval", ex
        else:
            n_train += 1
            yield "train", ex


def plan_file(path: str | os.PathLike, fmt: DataFormat, tokenizer: Any, data_cfg: DataConfig, seed: int,
              tick: Callable[[], None] = lambda: None) -> FilePlan:
    """Count train/eval/dropped examples and train tokens in one streaming pass (what the iterators yield),
    keeping the held-out examples met on the way (as eval_examples gives them): one pass before the first step.

    `tick()` is called once per record: a large file takes a while to read, and the
    caller answers pause/stop/skip from there (it raises to stop the pass).
    """
    counts = {"train": 0, "eval": 0, "dropped": 0}
    tokens = 0
    held_out: list[Example] = []
    bad = _BadLines(Path(path).name, data_cfg)
    for kind, ex in _classified(path, fmt, tokenizer, data_cfg, seed, bad):
        tick()
        counts[kind] += 1
        if kind == "train" and ex is not None:
            tokens += len(ex.input_ids)
        elif kind == "eval" and ex is not None:
            held_out.append(ex)
    bad.check(sum(counts.values()))
    return FilePlan(counts["train"], counts["eval"], counts["dropped"], tokens, tuple(held_out), tuple(bad.first))


def train_lines(path: str | os.PathLike, fmt: DataFormat, tokenizer: Any, data_cfg: DataConfig, seed: int) -> list[int]:
    """The file lines that train (not held out, not dropped), in file order: what each epoch must consume
    once (the sample ledger, daemon.sample_ledger, is checked against it)."""
    return [ex.line for kind, ex in _classified(path, fmt, tokenizer, data_cfg, seed) if kind == "train" and ex]


def eval_examples(path: str | os.PathLike, fmt: DataFormat, tokenizer: Any, data_cfg: DataConfig, seed: int,
                  tick: Callable[[], None] = lambda: None) -> list[Example]:
    """The held-out examples of a file, in file order (at most `data_cfg.eval_max_examples`)."""
    out = []
    for kind, ex in _classified(path, fmt, tokenizer, data_cfg, seed):
        tick()
        if kind == "eval" and ex is not None:
            out.append(ex)
    return out


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # An int from blake2b, so the order never depends on PYTHONHASHSEED or the Python version's str seeding.
    h = hashlib.blake2b(f"traind-shuffle:{seed}:{epoch}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "big"))


def train_examples(path: str | os.PathLike, fmt: DataFormat, tokenizer: Any, data_cfg: DataConfig, seed: int, epoch: int) -> Iterator[Example]:
    """Stream the train examples of one epoch, shuffled within a window of `data_cfg.shuffle_buffer`.

    The same arguments give the same sequence every time (resume relies on it);
    another epoch gives another order.
    """
    rng = _epoch_rng(seed, epoch)
    buffer: list[Example] = []
    for kind, ex in _classified(path, fmt, tokenizer, data_cfg, seed):
        if kind != "train" or ex is None:
            continue
        if len(buffer) < data_cfg.shuffle_buffer:
            buffer.append(ex)
            continue
        j = rng.randrange(len(buffer))
        buffer[j], ex = ex, buffer[j]
        yield ex
    rng.shuffle(buffer)
    yield from buffer
