"""The dashboard's playground through the monitor: a real `traind serve` process with two published versions,
the monitor app on loopback, the proxy (streamed and not, errors, auth, serve down), the preference pairs and
their copy into the inbox; then the page itself in headless chromium.

    pytest tests/test_playground.py -q
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from bench.harness import write_instance
from daemon.config import Config, load_config
from monitor.app import create_app
from monitor.preferences import PreferenceStore, preference_record
from tests.monitor_helpers import make_instance, token_of, uvicorn_on_loopback
from tests.serve_helpers import ServeProcess, publish_version

pytestmark = pytest.mark.e2e
PROMPT = "Say something about rivers."
TIMEOUT = 120.0


def _instance(root: Path, models_dir: Path) -> Config:
    path = write_instance(root, models_dir, serve={"device": "cpu", "cpu_threads": 1, "nice": 0})
    cfg = load_config(path)
    for name in ("inbox", "status"):
        cfg.path(name).mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[dict[str, Any]]:
    """An instance with v1 and v2 (current) published, `traind serve` on it, and its monitor on loopback."""
    cfg = _instance(tmp_path_factory.mktemp("playground"), models_dir)
    publish_version(cfg, 1)
    publish_version(cfg, 2)
    with ServeProcess(cfg.root / "config.json") as serve, uvicorn_on_loopback(create_app(cfg)) as url:
        yield {"cfg": cfg, "serve": serve, "url": url, "token": token_of(cfg)}


def _auth(token: str) -> dict[str, str]:
    return {"X-Traind-Token": token}


def _chat(model: str, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def _sse_events(raw: str) -> list[Any]:
    out = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _streamed_text(events: list[Any]) -> str:
    return "".join((e["choices"][0]["delta"].get("content") or "") for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_serve_info_says_ready_with_its_url(served: dict[str, Any]) -> None:
    r = httpx.get(served["url"] + "/api/serve", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["running"] is True and info["state"] == "ready", info
    assert info["serve_url"] == served["serve"].url + "/v1"
    assert info["following"] == 2


def test_models_through_the_proxy(served: dict[str, Any]) -> None:
    r = httpx.get(served["url"] + "/api/serve/models", headers=_auth(served["token"]), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in r.json()["data"]]
    assert ids[:2] == ["traind", "traind:base"] and {"traind:v1", "traind:v2"} <= set(ids)


def test_chat_streams_through_the_proxy_as_serve_sends_it(served: dict[str, Any]) -> None:
    """Same greedy answer as serve gives directly, in several reads (not buffered whole), named by its version."""
    reads: list[tuple[float, bytes]] = []
    with httpx.stream("POST", served["url"] + "/api/serve/chat/completions", json=_chat("traind", True, 12),
                      headers=_auth(served["token"]), timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-traind-model"] == "traind:v2"
        for chunk in r.iter_raw():
            reads.append((time.monotonic(), chunk))
    events = _sse_events(b"".join(c for _, c in reads).decode())
    assert events[-1] == "[DONE]"
    assert {e["model"] for e in events if isinstance(e, dict)} == {"traind:v2"}
    assert len(reads) > 2, f"the stream came in {len(reads)} read(s): buffered, not streamed"
    direct = served["serve"].client().chat.completions.create(**_chat("traind:v2", False, 12))
    assert _streamed_text(events) == direct.choices[0].message.content


def test_a_page_that_goes_away_cancels_the_generation(served: dict[str, Any]) -> None:
    """The browser stops reading (Stop, a closed tab): the proxy closes its stream to serve, which cancels the
    request and frees its slot instead of generating 1000 tokens for nobody."""
    from tests.test_monitor_browser import wait_until

    def stats() -> dict[str, Any]:
        return json.loads((served["cfg"].path("status") / "serve.json").read_text())

    before = stats()["cancelled"]
    with httpx.stream("POST", served["url"] + "/api/serve/chat/completions", json=_chat("traind:v2", True, 1000),
                      headers=_auth(served["token"]), timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert b'"role": "assistant"' in next(r.iter_raw())
    wait_until(lambda: stats()["cancelled"] == before + 1, 20, "serve counted the request cancelled")


def test_versions_answer_differently_through_the_proxy(served: dict[str, Any]) -> None:
    answers = {}
    for model in ("traind:base", "traind:v1"):
        r = httpx.post(served["url"] + "/api/serve/chat/completions", json=_chat(model, False),
                       headers=_auth(served["token"]), timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        answers[model] = r.json()["choices"][0]["message"]["content"]
    assert answers["traind:base"] != answers["traind:v1"]


def test_the_proxy_needs_the_token(served: dict[str, Any]) -> None:
    for headers in ({}, _auth("not-the-token-at-all-0123456789")):
        r = httpx.post(served["url"] + "/api/serve/chat/completions", json=_chat("traind", True), headers=headers,
                       timeout=TIMEOUT)
        assert r.status_code == 401, r.text
        r = httpx.get(served["url"] + "/api/serve/models", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401, r.text


def test_serve_errors_pass_through_with_status_and_shape(served: dict[str, Any]) -> None:
    r = httpx.post(served["url"] + "/api/serve/chat/completions", json=_chat("traind:v99", True),
                   headers=_auth(served["token"]), timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = httpx.post(served["url"] + "/api/serve/chat/completions", json=_chat("traind", False, 10**6),
                   headers=_auth(served["token"]), timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_serve_down_is_503_with_a_clear_message(tmp_path: Path) -> None:
    cfg = make_instance(tmp_path)
    app = create_app(cfg)
    token = token_of(cfg)
    with uvicorn_on_loopback(app) as url:
        info = httpx.get(url + "/api/serve").json()
        assert info["running"] is False and info["state"] == "not_started"
        assert "bin/start_all.sh" in info["message"]
        r = httpx.post(url + "/api/serve/chat/completions", json=_chat("traind", True), headers=_auth(token))
        assert r.status_code == 503 and r.json()["error"]["code"] == "serve_not_running", r.text
        assert "bin/start_all.sh" in r.json()["error"]["message"]
        # serve.json left by a serve that was killed: its pid is gone
        (cfg.path("status") / "serve.json").write_text(json.dumps(
            {"pid": 2**22 + 12345, "host": "127.0.0.1", "port": 9, "state": "ready", "started_at": time.time()}))
        info = httpx.get(url + "/api/serve").json()
        assert info["state"] == "gone" and "pid 4206649" in info["message"], info
        r = httpx.get(url + "/api/serve/models", headers=_auth(token))
        assert r.status_code == 503 and "gone" in r.json()["error"]["message"], r.text
        # alive (this test's pid) but nothing listens on the port
        (cfg.path("status") / "serve.json").write_text(json.dumps(
            {"pid": os.getpid(), "host": "0.0.0.0", "port": 9, "state": "ready",
             "started_at": psutil.Process().create_time() + 1}))
        info = httpx.get(url + "/api/serve").json()
        assert info["state"] == "unreachable" and "127.0.0.1:9" in info["message"], info
        r = httpx.post(url + "/api/serve/chat/completions", json=_chat("traind", True), headers=_auth(token))
        assert r.status_code == 503 and r.json()["error"]["code"] == "serve_unreachable", r.text


# -- preference pairs -------------------------------------------------------------------------------------------

def _pair(**over: Any) -> dict[str, Any]:
    body = {"prompt": PROMPT, "chosen": {"model": "traind:v2", "content": "Rivers run to the sea."},
            "rejected": {"model": "traind:base", "content": "rivers rivers rivers"}}
    body.update(over)
    return body


@pytest.fixture()
def monitor(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cfg = make_instance(tmp_path)
    app = create_app(cfg)
    with uvicorn_on_loopback(app) as url:
        yield {"cfg": cfg, "url": url, "token": token_of(cfg)}


def test_a_preference_is_saved_in_trl_form(monitor: dict[str, Any]) -> None:
    url, token, cfg = monitor["url"], monitor["token"], monitor["cfg"]
    r = httpx.post(url + "/api/playground/preference", json=_pair(), headers=_auth(token))
    assert r.status_code == 201, r.text
    saved = r.json()
    assert saved["records"] == 1 and saved["file"] == f"playground-{time.strftime('%Y-%m-%d', time.gmtime())}.jsonl"
    lines = (cfg.path("preferences") / saved["file"]).read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{
        "messages": [{"role": "user", "content": PROMPT}],
        "chosen": {"role": "assistant", "content": "Rivers run to the sea."},
        "rejected": {"role": "assistant", "content": "rivers rivers rivers"},
        "meta": {"chosen_model": "traind:v2", "rejected_model": "traind:base", "saved_at": saved["saved_at"]}}]
    r = httpx.post(url + "/api/playground/preference", headers=_auth(token), json=_pair(
        prompt=None, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
    assert r.status_code == 201 and r.json()["records"] == 2, r.text
    listed = httpx.get(url + "/api/playground/preferences").json()
    assert listed["total"] == 2 and [(f["name"], f["records"]) for f in listed["files"]] == [(saved["file"], 2)]
    got = httpx.get(url + "/api/playground/preferences/" + saved["file"])
    assert got.status_code == 200 and got.text == (cfg.path("preferences") / saved["file"]).read_text()


@pytest.mark.parametrize("over, field", [
    ({"prompt": "   "}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"chosen": {"model": "traind", "content": ""}}, "chosen.content"),
    ({"rejected": {"model": "traind:base", "content": "Rivers run to the sea.  "}}, "rejected.content"),
    ({"rejected": {"content": "other"}}, "rejected.model"),
    ({"prompt": None, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "messages[1].role"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "prompt"),
    # what the inbox's validator refuses is refused here too (a lone surrogate cannot be written as UTF-8)
    ({"chosen": {"model": "traind", "content": "Rivers \ud800 run."}}, "chosen.content"),
])
def test_a_bad_preference_is_refused_naming_the_field(monitor: dict[str, Any], over: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in _pair(**over).items() if v is not None}
    r = httpx.post(monitor["url"] + "/api/playground/preference", content=json.dumps(body),  # escaped: any str
                   headers={**_auth(monitor["token"]), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(field + ":"), r.json()
    assert not list(monitor["cfg"].path("preferences").glob("*.jsonl")), "nothing written"


def test_saving_and_queueing_need_the_token(monitor: dict[str, Any]) -> None:
    r = httpx.post(monitor["url"] + "/api/playground/preference", json=_pair())
    assert r.status_code == 401
    r = httpx.post(monitor["url"] + "/api/playground/preferences/queue", json={"file": "playground-2026-12-07.jsonl"})
    assert r.status_code == 401


def test_queue_puts_a_copy_into_the_inbox(monitor: dict[str, Any]) -> None:
    url, token, cfg = monitor["url"], monitor["token"], monitor["cfg"]
    name = httpx.post(url + "/api/playground/preference", json=_pair(), headers=_auth(token)).json()["file"]
    source = cfg.path("preferences") / name
    r = httpx.post(url + "/api/playground/preferences/queue", json={"file": name}, headers=_auth(token))
    assert r.status_code == 201, r.text
    assert r.json() == {"name": name, "priority": "normal", "size": source.stat().st_size}
    assert (cfg.path("inbox") / name).read_bytes() == source.read_bytes()
    assert source.exists(), "the playground's own file stays where it is"
    r = httpx.post(url + "/api/playground/preferences/queue", json={"file": name, "priority": "high"}, headers=_auth(token))
    assert r.status_code == 201 and (cfg.path("inbox") / "high" / name).read_bytes() == source.read_bytes()
    r = httpx.post(url + "/api/playground/preferences/queue", json={"file": name}, headers=_auth(token))
    assert r.json()["name"] == name.replace(".jsonl", "-1.jsonl"), "a second copy never replaces the first"
    assert not [p for p in cfg.path("inbox").rglob(".*")], "no temp file left in the inbox"
    for bad in ("../config.json", "playground-2026-01-01.jsonl", "config.json"):
        r = httpx.post(url + "/api/playground/preferences/queue", json={"file": bad}, headers=_auth(token))
        assert r.status_code == 404, (bad, r.text)


def test_the_day_file_is_named_by_the_utc_date_and_never_left_torn(tmp_path: Path) -> None:
    store = PreferenceStore(tmp_path / "prefs")
    day1, day2 = 1796083200.0, 1796083200.0 + 86400  # 2026-12-01 and 2026-12-02, 00:00 UTC
    assert store.append(preference_record(_pair(), day1), day1) == ("playground-2026-12-01.jsonl", 1)
    path = tmp_path / "prefs" / "playground-2026-12-01.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # a file edited by hand, without its last newline
    assert store.append(preference_record(_pair(), day1 + 60), day1 + 60) == ("playground-2026-12-01.jsonl", 2)
    assert [json.loads(x)["meta"]["saved_at"] for x in path.read_text().splitlines()] == [
        "2026-12-01T00:00:00Z", "2026-12-01T00:01:00Z"]
    (tmp_path / "prefs" / ".playground-2026-12-02.jsonl.x1y2.tmp").write_text('{"half a rec')  # killed mid-append
    assert store.append(preference_record(_pair(), day2), day2) == ("playground-2026-12-02.jsonl", 1)
    assert sorted(p.name for p in (tmp_path / "prefs").iterdir()) == [
        ".lock", "playground-2026-12-01.jsonl", "playground-2026-12-02.jsonl"]
    assert [(f.name, f.records) for f in store.files()] == [("playground-2026-12-02.jsonl", 1), ("playground-2026-12-01.jsonl", 2)]


# -- the page ---------------------------------------------------------------------------------------------------

def test_the_playground_page_asks_both_and_saves_the_better_answer(served: dict[str, Any], tmp_path: Path) -> None:
    """Headless chromium: both answers stream side by side, each labelled with the version that answered; "this
    one is better" under the right one writes the pair, the left answer rejected, into the day's file."""
    from tests.conftest import skip_or_fail
    from tests.test_monitor_browser import CHROMIUM, CHROMIUM_ARGS, Page, wait_until

    if not CHROMIUM.exists():
        skip_or_fail("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; bin/test.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        p = Page(browser, served["url"])
        page = p.page
        p.open(served["token"])
        wait_until(lambda: page.locator("#pg-ask").is_enabled(), 30, "the Ask button enabled (serve ready, models listed)")
        assert page.get_attribute("#pg-serve", "data-state") == "ready"
        assert (page.input_value("#pg-model-left"), page.input_value("#pg-model-right")) == ("traind:base", "traind")
        page.fill("#pg-prompt", PROMPT)
        page.fill("#pg-max-tokens", "16")
        page.fill("#pg-temperature", "0")
        page.click("#pg-ask")
        done = lambda: [page.get_attribute(f"#pg-answer-{s}", "data-state") for s in ("left", "right")] == ["done", "done"]
        wait_until(done, 90, "both answers streamed to the end")
        answers = {s: page.text_content(f"#pg-answer-{s}") for s in ("left", "right")}
        assert {s: page.get_attribute(f"#pg-answer-{s}", "data-model") for s in answers} == {"left": "traind:base", "right": "traind:v2"}
        assert page.text_content("#pg-label-right").startswith("answered by traind:v2 (asked: traind)")
        assert page.text_content("#pg-label-left").startswith("answered by traind:base")
        assert answers["left"].strip() and answers["right"].strip() and answers["left"] != answers["right"], answers
        chunks = {s: int(page.get_attribute(f"#pg-answer-{s}", "data-chunks")) for s in answers}
        # piece by piece as serve sent them (the tiny base may stop after one token; v2 runs to max_tokens)
        assert chunks["right"] > 1 and sum(chunks.values()) > 2, (chunks, answers)
        direct = served["serve"].client().chat.completions.create(**_chat("traind:v2", False, 16))
        assert answers["right"] == direct.choices[0].message.content
        page.click("#pg-better-right")
        wait_until(lambda: page.get_attribute("#pg-saved", "data-count") == "1", 15, "the saved count at 1")
        assert page.locator("#pg-better-left").is_disabled(), "one pair is saved once"
        files = list(served["cfg"].path("preferences").glob("playground-*.jsonl"))
        assert len(files) == 1
        record = json.loads(files[0].read_text())
        assert record["messages"] == [{"role": "user", "content": PROMPT}]
        assert record["chosen"] == {"role": "assistant", "content": answers["right"]}
        assert record["rejected"] == {"role": "assistant", "content": answers["left"]}
        assert (record["meta"]["chosen_model"], record["meta"]["rejected_model"]) == ("traind:v2", "traind:base")
        page.locator(f".pg-file[data-file='{files[0].name}'] .pg-queue").click()
        wait_until(lambda: (served["cfg"].path("inbox") / files[0].name).exists(), 15, "the file copied into the inbox")
        p.shot_of("#playground-panel", "playground.png")
        p.assert_clean()

        # an instance whose serve does not run: the panel says why and how to start it, and asks nothing
        cfg = make_instance(tmp_path)
        app = create_app(cfg)
        with uvicorn_on_loopback(app) as url:
            q = Page(browser, url)
            q.open(token_of(cfg))
            wait_until(lambda: q.page.get_attribute("#pg-serve", "data-state") == "not_started", 15, "serve reported absent")
            assert "bin/start_all.sh" in q.page.text_content("#pg-serve")
            assert q.page.locator("#pg-ask").is_disabled()
            assert q.page.text_content("#pg-hint") == "traind serve is not running."
            q.shot_of("#playground-panel", "playground_no_serve.png")
            q.assert_clean()
        browser.close()
