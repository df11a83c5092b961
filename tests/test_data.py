"""daemon.train.data: loss masks per format, truncation, eval split, deterministic order, plan counts, collation."""

from __future__ import annotations

import copy
import gc
import itertools
import json
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from daemon.config import DataConfig
from daemon.errors import DataError
from daemon.train.batching import batches, collate
from daemon.train.data import (
    IGNORE, Example, FilePlan, eval_examples, is_eval_line, plan_file, tokenize_record, train_examples,
)
from daemon.train.tinymodel import build_tokenizer
from daemon.validate import DataFormat, Record, iter_records, parse_line

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(tok: Any) -> Any:
    """The same tokenizer without a chat template."""
    t = copy.deepcopy(tok)
    t.chat_template = None
    t.name_or_path = "my-local-model"
    return t


def rec(obj: dict, line: int = 1) -> Record:
    r = parse_line(json.dumps(obj).encode(), line, None, 1 << 20)
    assert isinstance(r, Record), r
    return r


def trained_text(tok: Any, ex: Example) -> str:
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def spans(ex: Example) -> list[tuple[int, int]]:
    """[start, end) runs of positions with a label."""
    out, start = [], None
    for k, lab in enumerate(ex.labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            out.append((start, k))
            start = None
    return out


def write_lines(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# ---------------------------------------------------------------- masks per format


def test_chat_loss_only_on_assistant_with_end_token(tok: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 is 4."}]
    ex = tokenize_record(rec({"messages": msgs}), tok, 256)
    assert ex is not None
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert trained_text(tok, ex) == "2 plus 2 is 4." + END
    assert len(spans(ex)) == 1
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels))


def test_chat_weight_zero_turn_is_masked(tok: Any) -> None:
    msgs = [{"role": "user", "content": "Spell dog backwards."},
            {"role": "assistant", "content": "god", "weight": 0},
            {"role": "user", "content": "Are you sure?"},
            {"role": "assistant", "content": "dog backwards is god."},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "You are welcome."}]
    ex = tokenize_record(rec({"messages": msgs}), tok, 256)
    assert ex is not None
    assert len(spans(ex)) == 2
    assert trained_text(tok, ex) == "dog backwards is god." + END + "You are welcome." + END
    assert "god" + END in tok.decode(ex.input_ids)  # the weight-0 answer is still context


def test_prompt_completion_mask(tok: Any) -> None:
    ex = tokenize_record(rec({"prompt": "Q: capital of Chile?\nA:", "completion": " Santiago."}), tok, 256)
    assert ex is not None
    assert tok.decode(ex.input_ids) == "Q: capital of Chile?\nA: Santiago." + END
    assert trained_text(tok, ex) == " Santiago." + END
    assert ex.input_ids[-1] == tok.eos_token_id and spans(ex) == [(spans(ex)[0][0], len(ex.input_ids))]


def test_text_trains_every_token(tok: Any) -> None:
    ex = tokenize_record(rec({"text": "The quick brown fox."}), tok, 256)
    assert ex is not None and ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == "The quick brown fox." + END


def test_alpaca_with_chat_template(tok: Any) -> None:
    ex = tokenize_record(rec({"instruction": "Translate.", "input": "chat", "output": "cat"}), tok, 256)
    assert ex is not None
    assert tok.decode(ex.input_ids) == "<|im_start|>user\nTranslate.\n\nchat<|im_end|>\n<|im_start|>assistant\ncat<|im_end|>\n"
    assert trained_text(tok, ex) == "cat" + END


def test_alpaca_without_chat_template(plain_tok: Any) -> None:
    ex = tokenize_record(rec({"instruction": "Say hi.", "output": "hi"}), plain_tok, 256)
    assert ex is not None
    text = plain_tok.decode(ex.input_ids)
    assert text.startswith("Below is an instruction that describes a task. Write a response")
    assert text.endswith("### Instruction:\nSay hi.\n\n### Response:\nhi" + END)
    assert trained_text(plain_tok, ex) == "hi" + END
    ex = tokenize_record(rec({"instruction": "Add.", "input": "1 2", "output": "3"}), plain_tok, 256)
    assert ex is not None and "### Input:\n1 2\n\n### Response:\n3" in plain_tok.decode(ex.input_ids)


def test_chat_needs_a_chat_template(plain_tok: Any) -> None:
    with pytest.raises(DataError, match="tokenizer 'my-local-model' has no chat_template"):
        tokenize_record(rec({"messages": [{"role": "assistant", "content": "x"}]}), plain_tok, 256)


def test_template_that_is_not_prefix_consistent(tok: Any) -> None:
    t = copy.deepcopy(tok)
    # Rewrites history: the header counts all messages, so a shorter rendering is not a prefix.
    t.chat_template = ("{{ 'turns=' ~ (messages|length) ~ '\n' }}{% for m in messages %}"
                       "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="is not prefix-consistent at message 1"):
        tokenize_record(rec({"messages": msgs}), t, 256)


def test_truncation_from_the_right(tok: Any) -> None:
    full = tokenize_record(rec({"text": "one two three four five six seven eight nine ten " * 5}), tok, 1024)
    cut = tokenize_record(rec({"text": "one two three four five six seven eight nine ten " * 5}), tok, 16)
    assert full is not None and cut is not None and len(full.input_ids) > 16
    assert cut.input_ids == full.input_ids[:16] and cut.labels == full.labels[:16]
    assert cut.input_ids[-1] != tok.eos_token_id


def test_none_when_truncation_leaves_nothing_to_train(tok: Any) -> None:
    long_user = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    assert tokenize_record(rec(long_user), tok, 32) is None
    assert tokenize_record(rec(long_user), tok, 1024) is not None
    pc = {"prompt": "word " * 50, "completion": " yes"}
    assert tokenize_record(rec(pc), tok, 16) is None


# ---------------------------------------------------------------- split, order, plan


def test_is_eval_line_deterministic_and_fraction() -> None:
    picks = [is_eval_line(i, 7, 0.1) for i in range(1, 20_001)]
    assert picks == [is_eval_line(i, 7, 0.1) for i in range(1, 20_001)]
    assert 1800 < sum(picks) < 2200
    assert picks != [is_eval_line(i, 8, 0.1) for i in range(1, 20_001)]
    assert not any(is_eval_line(i, 7, 0.0) for i in range(1, 1000))
    # Known values pin the hash: changing it would silently move every file's eval set.
    assert [i for i in range(1, 60) if is_eval_line(i, 1234, 0.1)] == EXPECTED_EVAL_LINES


EXPECTED_EVAL_LINES = [1, 5, 6, 22, 23, 30, 45, 52, 59]  # blake2b of "1234:<line>", fraction 0.1


def _cfg(**kw: Any) -> DataConfig:
    return replace(DataConfig(max_length=64, eval_fraction=0.2, eval_max_examples=1000, shuffle_buffer=16), **kw)


@pytest.fixture(scope="module")
def chat_file() -> Path:
    return EXAMPLES / "chat.jsonl"


def test_eval_split_cap_and_disjoint(tok: Any, chat_file: Path) -> None:
    cfg = _cfg(eval_max_examples=5)
    ev = eval_examples(chat_file, DataFormat.CHAT, tok, cfg, seed=3)
    selected = [r.line for r in iter_records(chat_file, DataFormat.CHAT, 1 << 20)
                if r.line > 1 and is_eval_line(r.line, 3, cfg.eval_fraction)]
    assert [e.line for e in ev] == selected[:5]
    train = [e.line for e in train_examples(chat_file, DataFormat.CHAT, tok, cfg, 3, 0)]
    assert set(train).isdisjoint(e.line for e in ev)
    assert sorted(train + [e.line for e in ev]) == list(range(1, 241))
    assert set(selected[5:]) <= set(train)  # selected beyond the cap are trained on
    assert [e.input_ids for e in ev] == [e.input_ids for e in eval_examples(chat_file, DataFormat.CHAT, tok, cfg, 3)]


def test_small_file_keeps_a_train_example(tok: Any, tmp_path: Path) -> None:
    # Line 1 is eval-selected for this seed; it must not leave the file with nothing to train on.
    seed = next(s for s in range(1000) if is_eval_line(1, s, 0.5))
    path = write_lines(tmp_path / "one.jsonl", [{"text": "only line"}])
    cfg = _cfg(eval_fraction=0.5)
    assert plan_file(path, DataFormat.TEXT, tok, cfg, seed) == FilePlan(1, 0, 0, len(
        tokenize_record(rec({"text": "only line"}), tok, 64).input_ids))  # type: ignore[union-attr]
    assert [e.line for e in train_examples(path, DataFormat.TEXT, tok, cfg, seed, 0)] == [1]


def test_train_order_deterministic_per_seed_and_epoch(tok: Any, chat_file: Path) -> None:
    cfg = _cfg()

    def order(seed: int, epoch: int) -> list[int]:
        return [e.line for e in train_examples(chat_file, DataFormat.CHAT, tok, cfg, seed, epoch)]

    a = order(1, 0)
    assert a == order(1, 0)
    assert a != order(1, 1) and sorted(a) == sorted(order(1, 1))
    assert a != sorted(a)  # shuffled
    assert order(1, 0) != order(2, 0)
    in_file_order = [e.line for e in train_examples(chat_file, DataFormat.CHAT, tok, _cfg(shuffle_buffer=1), 1, 0)]
    assert in_file_order == sorted(a)
    # A window of 16 is streaming: the k-th example out was among the first k + 16 read.
    assert all(line in in_file_order[: k + 17] for k, line in enumerate(a))


def test_resume_by_skipping_micro_batches_matches(tok: Any, chat_file: Path) -> None:
    cfg = _cfg()
    full = list(batches(train_examples(chat_file, DataFormat.CHAT, tok, cfg, 5, 2), 4))
    resumed = list(batches(train_examples(chat_file, DataFormat.CHAT, tok, cfg, 5, 2), 4))[7:]
    assert [[e.input_ids for e in b] for b in resumed] == [[e.input_ids for e in b] for b in full[7:]]


def test_plan_counts_what_iterators_yield(tok: Any, tmp_path: Path) -> None:
    # "word " * k is 3k+1 tokens, so k >= 5 leaves no completion token within 16: 111 of 300 dropped.
    objs = [{"prompt": "word " * (i % 8), "completion": f" answer {i}"} for i in range(300)]
    path = write_lines(tmp_path / "pc.jsonl", objs)
    cfg = _cfg(max_length=16, eval_max_examples=10)
    plan = plan_file(path, DataFormat.PROMPT_COMPLETION, tok, cfg, 9)
    train = list(train_examples(path, DataFormat.PROMPT_COMPLETION, tok, cfg, 9, 0))
    ev = eval_examples(path, DataFormat.PROMPT_COMPLETION, tok, cfg, 9)
    assert list(plan.held_out) == ev  # the plan's pass keeps them, so training needs no second pass
    assert (plan.n_dropped, plan.n_eval) == (111, 10)
    assert (plan.n_train, plan.n_eval, plan.n_train_tokens) == (len(train), len(ev), sum(len(e.input_ids) for e in train))
    assert plan.n_train + plan.n_eval + plan.n_dropped == 300
    assert all(len(e.input_ids) <= 16 for e in train + ev)


@pytest.mark.parametrize("name,fmt", [("text", DataFormat.TEXT), ("alpaca", DataFormat.ALPACA),
                                      ("prompt_completion", DataFormat.PROMPT_COMPLETION)])
def test_plan_on_examples(tok: Any, name: str, fmt: DataFormat) -> None:
    path = EXAMPLES / f"{name}.jsonl"
    cfg = _cfg(eval_max_examples=8)
    plan = plan_file(path, fmt, tok, cfg, 0)
    assert plan.n_train + plan.n_eval + plan.n_dropped == 160 and plan.n_eval == 8
    assert plan.n_train == sum(1 for _ in train_examples(path, fmt, tok, cfg, 0, 1))


# ---------------------------------------------------------------- batches and collate


def test_batches_sizes() -> None:
    exs = [Example(i, [1], [1]) for i in range(10)]
    assert [len(b) for b in batches(exs, 4)] == [4, 4, 2]
    assert [len(b) for b in batches(exs, 5)] == [5, 5]
    assert list(batches([], 3)) == []
    with pytest.raises(DataError):
        list(batches(exs, 0))


def test_collate_pads_right() -> None:
    import torch

    batch = [Example(1, [5, 6, 7], [IGNORE, 6, 7]), Example(2, [8], [8])]
    out = collate(batch, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_collate_real_examples(tok: Any) -> None:
    exs = list(train_examples(EXAMPLES / "text.jsonl", DataFormat.TEXT, tok, _cfg(), 0, 0))[:4]
    out = collate(exs, tok.pad_token_id)
    width = max(len(e.input_ids) for e in exs)
    assert out["input_ids"].shape == (4, width)
    assert out["attention_mask"].sum().item() == sum(len(e.input_ids) for e in exs)
    assert (out["labels"][out["attention_mask"] == 0] == IGNORE).all()


# ---------------------------------------------------------------- streaming: memory does not grow with the file


class WordTokenizer:
    """A stand-in tokenizer with a ChatML-like, prefix-consistent template: one id per word.

    The real tokenizer spends ~1 ms per chat line (three template renders), ~4 ms under
    tracemalloc; this one is ~10x cheaper. What the test measures is data.py's streaming
    (reading, classifying, the shuffle window), which does not depend on the tokenizer;
    tracemalloc sees Python's allocations only, not those of the Rust tokenizer anyway.
    Ids are a function of the word, so nothing in here grows with the file.
    """

    chat_template = "word-chatml"
    name_or_path = "word-tokenizer"
    eos_token_id, bos_token_id, unk_token_id, pad_token_id = 2, 1, 0, 3

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.eos_token_id if token == END else self.unk_token_id

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<|im_start|> {m['role']} {m['content']} {END} " for m in messages)
        return text + ("<|im_start|> assistant " if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.eos_token_id if w == END else 10 + len(w) % 500 for w in text.split()]}


def write_chat_lines(path: Path, n: int) -> Path:
    """n chat lines of ~290 bytes, each different (numbers in every turn)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You answer in one short sentence, politely and precisely."},
                {"role": "user", "content": f"What is {i} plus {i % 97}? Please show the sum of the two numbers."},
                {"role": "assistant", "content": f"{i} plus {i % 97} is {i + i % 97}, which is the answer you asked for."},
            ]}) + "\n")
    return path


def streaming_peak(path: Path, tokenizer: Any, n_train: int) -> int:
    """tracemalloc's peak over `n_train` shuffled train examples and a full `plan_file` pass."""
    cfg = DataConfig(max_length=64, shuffle_buffer=1024, eval_max_examples=64)
    gc.collect()
    tracemalloc.start()
    try:
        taken = sum(1 for _ in itertools.islice(train_examples(path, DataFormat.CHAT, tokenizer, cfg, 7, 0), n_train))
        plan = plan_file(path, DataFormat.CHAT, tokenizer, cfg, 7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_lines = sum(1 for _ in open(path, "rb"))
    assert taken == n_train and plan.n_train + plan.n_eval + plan.n_dropped == n_lines
    assert plan.n_eval == 64 and plan.n_train > n_lines * 0.9
    return peak


def assert_flat(tmp_path: Path, tokenizer: Any, n_small: int, n_train: int, limit: int) -> None:
    """The peak over a file ten times larger stays (almost) the same and under `limit` bytes."""
    small = write_chat_lines(tmp_path / "small.jsonl", n_small)
    big = write_chat_lines(tmp_path / "big.jsonl", 10 * n_small)
    small_peak, big_peak = streaming_peak(small, tokenizer, n_train), streaming_peak(big, tokenizer, n_train)
    # Holding the big file's examples would take ~1.3 kB per line; the shuffle window of 1024 is ~1.5 MB.
    assert big_peak < limit, (small_peak, big_peak)
    assert big_peak < small_peak * 1.2 + 256_000, (small_peak, big_peak)


def test_file_ten_times_larger_streams_in_flat_memory(tmp_path: Path) -> None:
    # 2k vs 20k lines (~6 MB), ~12 s: tracemalloc slows every allocation ~5x.
    assert_flat(tmp_path, WordTokenizer(), 2_000, 1_000, 4_000_000)


@pytest.mark.slow
def test_100k_line_file_streams_in_flat_memory(tmp_path: Path) -> None:
    # 10k vs 100k lines (~30 MB), ~50 s.
    assert_flat(tmp_path, WordTokenizer(), 10_000, 3_000, 4_000_000)


@pytest.mark.slow
def test_real_tokenizer_streams_in_flat_memory(tok: Any, tmp_path: Path) -> None:
    # 2k vs 20k lines, ~120 s: the real tokenizer under tracemalloc costs ~4 ms per chat line.
    assert_flat(tmp_path, tok, 2_000, 1_000, 5_000_000)


# ---------------------------------------------------------------- what the tokenizer cannot take (#26 item 3)

SURROGATE_LINE = r'{"text": "bad \ud800 one"}'  # a lone UTF-16 surrogate: valid JSON, not encodable text


def _text_file(path: Path, n: int, bad_at: dict[int, str]) -> Path:
    """n good text lines, with the raw line bad_at[k] in place of line k (1-based)."""
    lines = [bad_at.get(k, json.dumps({"text": f"good line number {k}"})) for k in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("policy", ["skip", "reject"])
def test_a_surrogate_line_trains_the_rest_under_skip_and_is_named_under_reject(tok: Any, tmp_path: Path, policy: str) -> None:
    """Validation finds the line (so the service refuses or skips it); the trainer, reading the
    same file with the real embedded tokenizer, trains the good lines and never meets it."""
    from daemon.validate import validate_file

    path = _text_file(tmp_path / "s.jsonl", 20, {6: SURROGATE_LINE})
    cfg = _cfg(bad_line_policy=policy, eval_fraction=0.0)
    report = validate_file(path, cfg)
    assert [(e.line, e.field) for e in report.errors] == [(6, "text")] and "U+D800" in report.errors[0].reason
    if policy == "reject":
        assert not report.accepted
        return
    assert report.accepted
    plan = plan_file(path, DataFormat.TEXT, tok, cfg, 0)
    assert (plan.n_train, plan.skipped) == (19, ())
    assert sorted(e.line for e in train_examples(path, DataFormat.TEXT, tok, cfg, 0, 0)) == [*range(1, 6), *range(7, 21)]


def test_a_record_the_tokenizer_cannot_encode_is_a_data_error_naming_its_line(tok: Any) -> None:
    """Whatever validation missed: the real tokenizer's failure on one record names the line."""
    bad = Record(7, DataFormat.TEXT, {"text": "bad \ud800 one"})  # as if validation had let it through
    with pytest.raises(DataError, match=r"^line 7, field text: the tokenizer .* cannot encode this record \(TypeError") as info:
        tokenize_record(bad, tok, 256)
    assert [(e.line, e.field) for e in info.value.errors] == [(7, "text")]


# A template in the style of Llama 2 / Mistral, which refuses a conversation whose roles do not alternate.
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _chat_file(path: Path, n: int, not_alternating: set[int]) -> Path:
    def rec_at(k: int) -> dict:
        if k in not_alternating:
            return {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": f"reply {k}"}]}
        return {"messages": [{"role": "user", "content": f"question {k}"}, {"role": "assistant", "content": f"answer {k}"}]}
    return write_lines(path, [rec_at(k) for k in range(1, n + 1)])


@pytest.fixture(scope="module")
def alternating_tok(tok: Any) -> Any:
    t = copy.deepcopy(tok)
    t.chat_template = ALTERNATING
    t.name_or_path = "alternating-model"
    return t


def test_a_template_refusing_one_record_under_skip_trains_the_rest(alternating_tok: Any, tmp_path: Path) -> None:
    path = _chat_file(tmp_path / "c.jsonl", 30, {4})
    cfg = _cfg(bad_line_policy="skip", eval_fraction=0.0)
    plan = plan_file(path, DataFormat.CHAT, alternating_tok, cfg, 0)
    assert plan.n_train == 29 and [(e.line, e.field) for e in plan.skipped] == [(4, "messages")]
    assert "Conversation roles must alternate" in plan.skipped[0].reason
    trained = sorted(e.line for e in train_examples(path, DataFormat.CHAT, alternating_tok, cfg, 0, 0))
    assert trained == [k for k in range(1, 31) if k != 4]


def test_a_template_refusing_one_record_under_reject_fails_the_file_naming_it(alternating_tok: Any, tmp_path: Path) -> None:
    path = _chat_file(tmp_path / "c.jsonl", 30, {4})
    with pytest.raises(DataError, match=r"c\.jsonl: 1 bad lines \(bad_line_policy 'reject' allows none\), found by the "
                                        r"tokenizer: line 4, field messages: the chat template of tokenizer "
                                        r"'alternating-model' failed: Conversation roles must alternate") as info:
        plan_file(path, DataFormat.CHAT, alternating_tok, _cfg(bad_line_policy="reject"), 0)
    assert [e.line for e in info.value.errors] == [4]


def test_records_the_tokenizer_refuses_count_against_the_skip_limits(alternating_tok: Any, tmp_path: Path) -> None:
    path = _chat_file(tmp_path / "c.jsonl", 30, {3, 8, 9})  # 3 of 30: over a 5% limit
    with pytest.raises(DataError, match=r"3 of 30 lines bad .* line 3, field messages: .* alternate.*; and 2 more") as info:
        plan_file(path, DataFormat.CHAT, alternating_tok, _cfg(bad_line_policy="skip", max_bad_fraction=0.05), 0)
    assert [e.line for e in info.value.errors] == [3, 8, 9]


def test_the_pass_stops_at_the_first_refused_line_past_max_bad_lines(alternating_tok: Any, tmp_path: Path) -> None:
    path = _chat_file(tmp_path / "c.jsonl", 40, {5, 10, 15, 20, 25})
    with pytest.raises(DataError, match=r"3 bad lines \(limit 2\), found by the tokenizer: line 5, .*; and 2 more") as info:
        plan_file(path, DataFormat.CHAT, alternating_tok, _cfg(bad_line_policy="skip", max_bad_lines=2), 0)
    assert [e.line for e in info.value.errors] == [5, 10, 15]  # it stopped there: a long file is not read on
