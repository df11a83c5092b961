"""traind serve in-process: the request bodies, the text stream, and the engine on the embedded model (versions
published as the trainer publishes them; each answer compared with what PEFT + generate gives for its version)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from bench.harness import write_instance
from daemon import adapters
from daemon.config import load_config
from daemon.serve.engine import Engine, Event
from daemon.serve.models import ModelHost
from daemon.serve.requests import ApiError, Limits, parse_chat, parse_completion
from daemon.serve.textstream import TextStream
from tests.serve_helpers import expected_answer, publish_version

LIMITS = Limits(max_tokens=64, default_max_tokens=16)
HELLO = [{"role": "user", "content": "Hello there"}]


# -- request bodies ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, words", [
    ({"messages": HELLO}, "model", "model is required"),
    ({"model": "traind"}, "messages", "non-empty list"),
    ({"model": "traind", "messages": []}, "messages", "non-empty list"),
    ({"model": "traind", "messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"model": "traind", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "one of system"),
    ({"model": "traind", "messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"model": "traind", "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string or a list"),
    ({"model": "traind", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "text only"),
    ({"model": "traind", "messages": HELLO, "max_tokens": 10**9}, "max_tokens", "too large"),
    ({"model": "traind", "messages": HELLO, "max_tokens": 0}, "max_tokens", "positive integer"),
    ({"model": "traind", "messages": HELLO, "max_completion_tokens": "5"}, "max_completion_tokens", "positive integer"),
    ({"model": "traind", "messages": HELLO, "temperature": 3}, "temperature", "between 0 and 2"),
    ({"model": "traind", "messages": HELLO, "temperature": float("nan")}, "temperature", "a number"),
    ({"model": "traind", "messages": HELLO, "top_p": -1}, "top_p", "between 0 and 1"),
    ({"model": "traind", "messages": HELLO, "n": 2}, "n", "n must be 1"),
    ({"model": "traind", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "traind", "messages": HELLO, "stop": [1]}, "stop", "list of strings"),
    ({"model": "traind", "messages": HELLO, "seed": "x"}, "seed", "integer"),
    ({"model": "traind", "messages": HELLO, "logprobs": True}, "logprobs", "not supported"),
    ({"model": "traind", "messages": HELLO, "tools": [{"type": "function"}]}, "tools", "not supported"),
])
def test_a_bad_chat_body_is_a_400_naming_its_field(body, param, words):
    with pytest.raises(ApiError) as e:
        parse_chat(body, LIMITS)
    assert (e.value.status, e.value.param) == (400, param)
    assert words in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_a_good_chat_body_reads_every_setting():
    req = parse_chat({"model": "traind:v3", "messages": [{"role": "developer", "content": "Be brief."},
                                                          {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}],
                      "max_completion_tokens": 7, "temperature": 0, "stop": "\n", "seed": 5, "stream": True,
                      "stream_options": {"include_usage": True}, "frequency_penalty": 0.5}, LIMITS)
    assert req.messages == (("system", "Be brief."), ("user", "Hi!"))
    assert (req.model, req.max_tokens, req.temperature, req.stop, req.seed) == ("traind:v3", 7, 0.0, ("\n",), 5)
    assert req.stream and req.include_usage and req.frequency_penalty == 0.5
    assert parse_chat({"model": "traind", "messages": HELLO}, LIMITS).max_tokens == LIMITS.default_max_tokens


def test_a_completion_body_takes_a_string_or_a_list_of_one():
    assert parse_completion({"model": "traind", "prompt": ["abc"]}, LIMITS).prompt == "abc"
    with pytest.raises(ApiError, match="token ids are not taken") as e:
        parse_completion({"model": "traind", "prompt": [1, 2, 3]}, LIMITS)
    assert e.value.param == "prompt"


# -- text as it grows -------------------------------------------------------------------------------------------

class Pieces:
    """A tokenizer whose tokens are fixed pieces of UTF-8 bytes (as byte-level BPE's are)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_is_sent_whole():
    euro = "€".encode()  # three bytes, over two tokens
    ts = TextStream(Pieces([b"a", euro[:2], euro[2:] + b"b"]))
    assert [ts.push(0), ts.push(1), ts.push(2), ts.finish()] == ["a", "", "€b", ""]


def test_a_stop_string_split_across_tokens_is_never_sent_and_ends_the_text():
    ts = TextStream(Pieces([b"Hello", b" wor", b"ld\n", b"\nmore"]), stops=("\n\n",))
    out = [ts.push(i) for i in range(4)]
    assert "".join(out) + ts.finish() == "Hello world"
    assert ts.stopped


# -- the engine on the embedded model ---------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path, models_dir):
    cfg = load_config(write_instance(tmp_path / "inst", models_dir, serve={"max_concurrent": 2, "max_queue": 1,
                                                                           "follow_seconds": 0.1}))
    publish_version(cfg, 1)
    engine = Engine(cfg, ModelHost(cfg, "cpu"))
    engine.warm_up()
    return cfg, engine


def run(engine: Engine, body: dict, sink: list | None = None):
    events = [] if sink is None else sink
    job = engine.submit(parse_chat(body, Limits(64, 16)), events.append)
    return job, events


def drain(engine: Engine) -> None:
    while engine.run_once():
        pass


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


def test_each_name_answers_as_its_version_does_with_peft_and_generate(served):
    cfg, engine = served
    publish_version(cfg, 2)
    got = {}
    for name in ("traind", "traind:v1", "traind:base"):
        _, events = run(engine, {"model": name, "messages": HELLO, "max_tokens": 12, "temperature": 0})
        drain(engine)
        assert events[0].kind == "start" and events[-1].kind == "done", events
        got[name] = (events[0].model, text_of(events))
    assert got["traind"] == ("traind:v2", expected_answer(cfg, 2, HELLO, 12))
    assert got["traind:v1"] == ("traind:v1", expected_answer(cfg, 1, HELLO, 12))
    assert got["traind:base"] == ("traind:base", expected_answer(cfg, None, HELLO, 12))
    assert len({t for _, t in got.values()}) == 3  # three different answers: the versions really differ


def test_a_request_keeps_the_version_it_started_on_while_a_new_one_is_published(served):
    cfg, engine = served
    body = {"model": "traind", "messages": HELLO, "max_tokens": 12, "temperature": 0, "stop": []}
    _, first = run(engine, body)
    for _ in range(4):  # prompt, then a few tokens on v1
        engine.run_once()
    assert first[0].model == "traind:v1" and not any(e.kind == "done" for e in first)
    publish_version(cfg, 2)
    engine.follow(force=True)  # the follower loads v2 now, mid-request
    assert engine.following == 2
    _, second = run(engine, body)
    drain(engine)
    assert (first[0].model, text_of(first)) == ("traind:v1", expected_answer(cfg, 1, HELLO, 12))
    assert (second[0].model, text_of(second)) == ("traind:v2", expected_answer(cfg, 2, HELLO, 12))
    assert engine.snapshot()["swaps"][-1]["version"] == 2


def test_a_rollback_is_followed_too(served):
    cfg, engine = served
    publish_version(cfg, 2)
    engine.follow(force=True)
    atomic_current = cfg.path("adapters") / adapters.CURRENT
    atomic_current.write_text(json.dumps({"version": 1, "path": "v0001"}))
    _, events = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 4, "temperature": 0})
    drain(engine)
    assert events[0].model == "traind:v1"


def test_requests_beyond_the_slots_wait_and_beyond_the_queue_are_refused_with_429(served):
    cfg, engine = served
    body = {"model": "traind", "messages": HELLO, "max_tokens": 8, "temperature": 0}
    jobs = [run(engine, body) for _ in range(3)]  # 2 slots + 1 waiting
    with pytest.raises(ApiError) as e:
        run(engine, body)
    assert e.value.status == 429 and e.value.headers.get("Retry-After")
    engine.run_once()
    assert [bool(ev) and ev[0].kind == "start" for _, ev in jobs] == [True, True, False]
    assert len(engine.active) == 2 and len(engine.waiting) == 1
    drain(engine)
    assert all(ev[-1].kind == "done" for _, ev in jobs)
    # the two first ran interleaved: each got its tokens before the other finished
    assert text_of(jobs[0][1]) == text_of(jobs[1][1]) == text_of(jobs[2][1])


def test_a_cancelled_request_frees_its_slot_at_the_next_turn(served):
    cfg, engine = served
    job, events = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 64, "temperature": 0.8})
    engine.run_once()
    engine.cancel(job)
    engine.run_once()
    assert not engine.active and engine.snapshot()["cancelled"] == 1
    assert not any(e.kind == "done" for e in events)


def test_an_unknown_or_pruned_version_is_404_and_a_long_prompt_400(served):
    cfg, engine = served
    _, events = run(engine, {"model": "traind:v9", "messages": HELLO})
    drain(engine)
    assert events[0].kind == "error" and events[0].error.status == 404 and events[0].error.param == "model"
    publish_version(cfg, 2)
    shutil.rmtree(cfg.path("adapters") / "v0001")  # pruned by retention while the server runs
    _, events = run(engine, {"model": "traind:v1", "messages": HELLO})
    drain(engine)
    assert events[0].error.status == 404
    long = [{"role": "user", "content": "word " * 5000}]
    _, events = run(engine, {"model": "traind", "messages": long})
    drain(engine)
    assert events[0].kind == "error" and events[0].error.code == "context_length_exceeded"


def test_a_waiting_request_past_the_queue_timeout_is_refused_with_503(served, tmp_path):
    cfg, engine = served
    now = [0.0]
    engine.clock = lambda: now[0]
    engine.sc = dataclasses.replace(engine.sc, max_concurrent=1, queue_timeout_seconds=5.0)
    body = {"model": "traind", "messages": HELLO, "max_tokens": 64, "temperature": 0.8, "seed": 1}
    _, first = run(engine, body)
    engine.run_once()
    _, second = run(engine, body)
    now[0] = 6.0
    engine.run_once()
    assert second[0].kind == "error" and second[0].error.status == 503 and second[0].error.code == "queue_timeout"


def test_sampling_with_a_seed_repeats_and_stop_strings_cut_the_answer(served):
    cfg, engine = served
    body = {"model": "traind", "messages": HELLO, "max_tokens": 20, "temperature": 1.0, "seed": 7}
    answers = []
    for _ in range(2):
        _, ev = run(engine, body)
        drain(engine)
        answers.append(text_of(ev))
    assert answers[0] == answers[1] and answers[0]
    greedy = expected_answer(cfg, 1, HELLO, 12)
    word = greedy.split()[1]
    _, ev = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 12, "temperature": 0, "stop": [word]})
    drain(engine)
    assert text_of(ev) == greedy[:greedy.index(word)] and ev[-1].finish_reason == "stop"


def test_a_consolidation_new_base_is_loaded_beside_the_old_and_the_least_used_idle_one_let_go(served, tmp_path):
    cfg, engine = served
    from daemon.train.model import resolve_base

    generation1 = tmp_path / "consolidated" / "g1"  # the same weights in another folder: a new generation's base
    shutil.copytree(resolve_base(cfg), generation1)
    publish_version(cfg, 2, generation=1, base_path=str(generation1), parent_version=None)
    _, on_v1 = run(engine, {"model": "traind:v1", "messages": HELLO, "max_tokens": 8, "temperature": 0})
    engine.run_once()  # v1 (generation 0) is running when the follower loads generation 1's base
    engine.follow(force=True)
    assert engine.following == 2
    assert {b["generation"] for b in engine.host.loaded_summary()} == {0, 1}
    drain(engine)
    assert text_of(on_v1) == expected_answer(cfg, 1, HELLO, 8)
    _, on_v2 = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 8, "temperature": 0})
    drain(engine)
    assert on_v2[0].model == "traind:v2" and text_of(on_v2) == expected_answer(cfg, 2, HELLO, 8)
    _, base = run(engine, {"model": "traind:base", "messages": HELLO, "max_tokens": 8, "temperature": 0})
    drain(engine)
    assert text_of(base) == expected_answer(cfg, None, HELLO, 8)
    # a third base: the least recently used idle one (generation 0's) goes (serve.max_bases = 2)
    generation2 = tmp_path / "consolidated" / "g2"
    shutil.copytree(resolve_base(cfg), generation2)
    publish_version(cfg, 3, generation=2, base_path=str(generation2), parent_version=None)
    engine.follow(force=True)
    assert sorted(b["generation"] for b in engine.host.loaded_summary()) == [1, 2]


def test_the_status_line_says_what_serve_does_and_a_dead_one_is_not_taken_for_running(tmp_path):
    import os

    from daemon import serve_view

    assert "not started" in serve_view.one_line(serve_view.read_serve(tmp_path))
    record = {"pid": os.getpid(), "host": "127.0.0.1", "port": 8090, "state": "ready", "following": 7, "completed": 12,
              "active": 1, "waiting": 0}
    (tmp_path / "serve.json").write_text(json.dumps(record))
    assert serve_view.one_line(serve_view.read_serve(tmp_path)) == \
        "http://127.0.0.1:8090/v1 ready, traind is v7; 12 answered, 1 running, 0 waiting"
    (tmp_path / "serve.json").write_text(json.dumps({**record, "pid": 2**22 + 12345}))  # no such process
    assert serve_view.one_line(serve_view.read_serve(tmp_path)).startswith("not running (it was killed")


@pytest.mark.gpu
def test_on_cuda_each_name_answers_as_its_version(tmp_path, models_dir):
    """serve.device cuda (what auto picks on a GPU box): the base in 4 bits as the trainer loads it there, the
    versions as PEFT adapters on it; greedy answers equal PEFT + generate on the same CUDA model."""
    import torch
    from peft import PeftModel

    from daemon.train.inspect import load_base_as_trained

    cfg = load_config(write_instance(tmp_path / "inst", models_dir, model={"quantization": "nf4"}))
    publish_version(cfg, 1)
    engine = Engine(cfg, ModelHost(cfg, "cuda"))
    engine.warm_up()
    _, events = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 12, "temperature": 0})
    drain(engine)
    model, tok, _ = load_base_as_trained(cfg, adapters.read_current(cfg.path("adapters")), "cuda")
    model = PeftModel.from_pretrained(model, str(cfg.path("adapters") / "v0001")).eval()
    text = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).to("cuda")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert events[0].model == "traind:v1"
    assert text_of(events) == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_failure_loading_what_a_request_needs_fails_that_request_and_the_engine_goes_on(served, monkeypatch):
    cfg, engine = served
    publish_version(cfg, 2)
    real = engine.host._load_adapter

    def broken(loaded, target):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(engine.host, "_load_adapter", broken)
    engine.follow(force=True)  # the follower cannot load v2: logged, the old one still serves
    assert engine.following == 1
    _, failed = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 4, "temperature": 0})
    drain(engine)
    assert failed[0].kind == "error" and failed[0].error.status == 500 and "out of memory (injected)" in failed[0].error.message
    monkeypatch.setattr(engine.host, "_load_adapter", real)
    _, ok = run(engine, {"model": "traind", "messages": HELLO, "max_tokens": 4, "temperature": 0})
    drain(engine)
    assert ok[0].model == "traind:v2" and ok[-1].kind == "done"
