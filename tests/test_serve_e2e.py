"""traind serve as a real process, driven by the real OpenAI Python client: streamed and not, several clients at once
while a new version is published, and hostile input. Each answer is compared with what its version gives with
PEFT + generate, so a response naming a version is known to have run on it."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from bench.harness import time_scale, write_instance
from daemon.config import load_config
from tests.serve_helpers import ServeProcess, expected_answer, publish_version

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def inst(tmp_path, models_dir):
    path = write_instance(tmp_path / "inst", models_dir, serve={"max_concurrent": 2, "max_queue": 8})
    cfg = load_config(path)
    publish_version(cfg, 1)
    return cfg, path


def test_the_openai_client_streams_and_not_and_every_name_answers_as_its_version(inst):
    cfg, path = inst
    with ServeProcess(path) as s:
        client = s.client(max_retries=0)
        names = [m.id for m in client.models.list().data]
        assert names == ["traind", "traind:base", "traind:v1"]
        r = client.chat.completions.create(model="traind", messages=HELLO, max_tokens=12, temperature=0)
        assert r.model == "traind:v1" and r.object == "chat.completion"
        assert r.choices[0].message.content == expected_answer(cfg, 1, HELLO, 12)
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(client.chat.completions.create(model="traind:base", messages=HELLO, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert {c.model for c in chunks} == {"traind:base"}
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == expected_answer(cfg, None, HELLO, 12)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        done = client.completions.create(model="traind:v1", prompt="The dragon", max_tokens=6, temperature=0)
        assert done.model == "traind:v1" and done.object == "text_completion" and done.usage.completion_tokens <= 6
        assert done.choices[0].text == expected_answer(cfg, 1, "The dragon", 6)


def test_several_clients_while_a_version_is_published_fail_nothing_and_each_names_a_version_current_meanwhile(inst):
    cfg, path = inst
    answers = {1: expected_answer(cfg, 1, HELLO, 24)}
    with ServeProcess(path) as s:
        results, errors = [], []
        stop = threading.Event()

        def client_loop(k: int) -> None:
            client = s.client(max_retries=0, timeout=300)
            i = 0
            while not stop.is_set():
                sent = time.time()
                try:
                    if (k + i) % 2:
                        chunks = list(client.chat.completions.create(model="traind", messages=HELLO, max_tokens=24,
                                                                     temperature=0, stream=True))
                        model = chunks[0].model
                        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    else:
                        r = client.chat.completions.create(model="traind", messages=HELLO, max_tokens=24, temperature=0)
                        model, text = r.model, r.choices[0].message.content
                except openai.OpenAIError as e:
                    errors.append(repr(e))
                    return
                results.append((sent, time.time(), model, text))
                i += 1

        def wait_until(pred, what: str) -> None:
            deadline = time.monotonic() + 300 * time_scale()
            while not pred():
                assert time.monotonic() < deadline and not errors, f"{what}: {errors or 'timed out'}"
                time.sleep(0.1)

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(results) >= 4, "answers before the publication")
            published_from = time.time()
            publish_version(cfg, 2)  # while the four clients keep asking
            published_by = time.time()
            wait_until(lambda: sum(sent > published_by for sent, *_ in results) >= 4, "answers after the publication")
        finally:
            stop.set()
            for t in threads:
                t.join(300)
        assert errors == []
        answers[2] = expected_answer(cfg, 2, HELLO, 24)
        for sent, received, model, text in results:
            version = int(model.removeprefix("traind:v"))
            # v1 was current until the publication ended, v2 from when it began
            assert (version == 1 and sent <= published_by) or (version == 2 and received >= published_from), (sent, model)
            assert text == answers[version]
        assert {m for _, _, m, _ in results} == {"traind:v1", "traind:v2"}
        # with no request at all, the follower has v2 loaded: the status file says so
        status = cfg.path("status") / "serve.json"
        wait_until(lambda: json.loads(status.read_text())["following"] == 2, "serve.json to say v2")  # every 2 s
        assert 2 in json.loads(status.read_text())["loaded"][0]["versions"]


def test_hostile_requests_get_openai_errors_and_the_server_goes_on(inst):
    cfg, path = inst
    with ServeProcess(path) as s:
        client = s.client(max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            s.client(max_retries=0, api_key="not-the-token").models.list()
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="traind", messages=HELLO, max_tokens=10**9)
        assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "max_tokens_too_large"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="traind", messages=[{"role": "user", "contents": "typo"}])
        assert e.value.body["param"] == "messages[0].content"
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="traind", messages=[{"role": "user", "content": "x " * 6000}])
        assert e.value.body["code"] == "context_length_exceeded"
        for raw, want in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object")):
            req = urllib.request.Request(f"{s.url}/v1/chat/completions", data=raw, method="POST",
                                         headers={"Authorization": f"Bearer {s.token}", "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 400 and want in json.loads(e.value.read())["error"]["message"]
        no_token = urllib.request.Request(f"{s.url}/v1/chat/completions", method="POST",
                                          data=json.dumps({"model": "traind", "messages": HELLO}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(no_token, timeout=30)
        assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
        # a client that walks away mid-stream frees its slot; the server answers the next one in full
        stream = client.chat.completions.create(model="traind", messages=HELLO, max_tokens=1000, temperature=1.0,
                                                stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
        status = cfg.path("status") / "serve.json"
        deadline = time.monotonic() + 60
        while not (json.loads(status.read_text()).get("cancelled") == 1 and json.loads(status.read_text())["active"] == 0):
            assert time.monotonic() < deadline, status.read_text()
            time.sleep(0.2)
        assert json.loads(status.read_text())["tokens"] < 1000  # it stopped generating for the client that left
        r = client.chat.completions.create(model="traind", messages=HELLO, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == expected_answer(cfg, 1, HELLO, 12)


def test_overload_is_refused_with_429_at_once(tmp_path, models_dir):
    path = write_instance(tmp_path / "inst", models_dir, serve={"max_concurrent": 1, "max_queue": 0})
    publish_version(load_config(path), 1)
    with ServeProcess(path) as s:
        client = s.client(max_retries=0)
        long = client.chat.completions.create(model="traind", messages=HELLO, max_tokens=1000, temperature=1.0,
                                              stream=True, seed=3, extra_body={"ignore_eos": True})
        first = next(iter(long))
        assert first.model == "traind:v1"
        # six more at once into one slot and no queue: whether or not the long one is still running (a slow
        # machine may let it finish), they cannot all be taken, and those refused are refused at once
        outcomes: list = []
        barrier = threading.Barrier(6)

        def ask() -> None:
            barrier.wait()
            try:
                r = client.chat.completions.create(model="traind", messages=HELLO, max_tokens=50, temperature=1.0,
                                                   extra_body={"ignore_eos": True})
                outcomes.append(r.model)
            except openai.RateLimitError as e:
                outcomes.append(("429", e.response.headers.get("retry-after"), e.body["code"]))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        long.close()
        assert len(outcomes) == 6
        refused = [o for o in outcomes if isinstance(o, tuple)]
        assert refused and set(refused) == {("429", "1", "too_many_requests")}, outcomes
        assert all(o == "traind:v1" for o in outcomes if not isinstance(o, tuple))


def test_trainctl_sample_asks_a_running_serve(inst):
    import subprocess
    import sys

    from bench.harness import REPO

    cfg, path = inst

    def sample(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(path), "sample", "Hello there",
                               "--max-new-tokens", "12", *args], capture_output=True, text=True, timeout=300, cwd=REPO)

    with ServeProcess(path):
        deadline = time.monotonic() + 30
        while json.loads((cfg.path("status") / "serve.json").read_text())["state"] != "ready":  # written every 2 s
            assert time.monotonic() < deadline
            time.sleep(0.2)
        served = sample()
        assert served.returncode == 0 and not served.stderr, served.stderr
        assert served.stdout == f"[adapter v1, answered by traind serve]\n{expected_answer(cfg, 1, HELLO, 12)}\n"
        missing = sample("--adapter", "9")
        assert missing.returncode == 1 and "version 9 is not kept" in missing.stderr
