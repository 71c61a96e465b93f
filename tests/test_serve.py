"""`corsa serve` against a real running server, with the official `openai` client: versions as models, answers
equal to `corsa ask`'s, OpenAI-style errors, and no failed request while an update commits."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from corsa import store
from corsa.loading import load_version
from corsa.requests import EditRequest
from corsa.scoring import generate

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
FAST = {"progress": False, "epochs": 2, "method": "lora", "lr": 5e-2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(source):
    from corsa.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(source), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def kb(tmp_path, tiny_dir):
    root = tmp_path / "kb"
    store.update(root, [EditRequest("sky?", "red", subject="sky")], model=tiny_dir, **FAST)
    return root


def test_versions_are_models_and_answers_are_corsa_asks(kb):
    with running(kb) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["kb", "kb@v0", "kb@v1"]
        reply = client.chat.completions.create(model="kb", messages=[{"role": "user", "content": "sky?"}],
                                               max_tokens=5)
        assert reply.model == "kb" and reply.system_fingerprint == "corsa-v1"
        model, formatter = load_version(kb)
        assert reply.choices[0].message.content == generate(model, formatter, ["sky?"], max_new_tokens=5)[0]
        assert reply.usage.prompt_tokens == formatter.prompt_length("sky?")
        done = client.completions.create(model="kb@v0", prompt=["sky?", "cat?"], max_tokens=4)
        base, base_formatter = load_version(kb, 0)
        assert [c.text for c in done.choices] == generate(base, base_formatter, ["sky?", "cat?"], max_new_tokens=4)
        assert done.system_fingerprint == "corsa-v0"


def post(url: str, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_errors_are_openai_errors(kb):

    with running(kb) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        ask = {"messages": [{"role": "user", "content": "sky?"}], "max_tokens": 3}
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="kb@v9", **ask)
        assert missing.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="kb", stream=True, **ask)
        with pytest.raises(openai.BadRequestError) as system:
            client.chat.completions.create(model="kb", max_tokens=3, messages=[
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"}])
        assert "one user message" in system.value.body["message"]
        for body in (b"{not json", b'{"model": "kb"}', b'{"model": "kb", "messages": [], "max_tokens": 3}',
                     b'{"model": "kb", "prompt": "sky?", "max_tokens": -1}'):
            path = "/completions" if b"prompt" in body else "/chat/completions"
            status, answer = post(url + path, body)
            assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}, body


def test_no_request_fails_while_an_update_commits_and_the_name_follows_the_new_version(kb):
    with running(kb) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        finished = threading.Event()
        seen: list[str] = []

        def update() -> None:
            try:
                store.update(kb, [EditRequest(f"q{i}?", f"a{i}", subject=f"q{i}") for i in range(6)], **FAST)
            finally:
                finished.set()

        def client_loop(k: int) -> int:
            asked = 0
            while not finished.is_set() or asked < 2:
                reply = client.chat.completions.create(
                    model="kb", messages=[{"role": "user", "content": f"sky {k}?"}], max_tokens=2)
                seen.append(reply.system_fingerprint)
                asked += 1
            return asked

        updater = threading.Thread(target=update)
        with ThreadPoolExecutor(16) as pool:
            clients = [pool.submit(client_loop, k) for k in range(16)]
            time.sleep(0.5)
            updater.start()
            counts = [c.result() for c in clients]  # any failed request raises here
        updater.join()
        assert sum(counts) >= 32 and set(seen) <= {"corsa-v1", "corsa-v2"}
        assert "kb@v2" in [m.id for m in client.models.list()]
        after = client.chat.completions.create(model="kb", messages=[{"role": "user", "content": "q1?"}],
                                               max_tokens=2)
        assert after.system_fingerprint == "corsa-v2"


def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path, kb, capsys):
    from corsa.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(kb), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it with apt)")
def test_store_page_in_headless_chromium_shows_versions_asks_both_and_follows_a_revert(kb):
    from playwright.sync_api import sync_playwright

    from corsa.cli import main

    with running(kb) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url.removesuffix("v1"))
            assert page.text_content("#head") == "v1"
            assert page.locator("#timeline tr").count() == 3  # header, v1, v0
            assert "sky?" in page.text_content("#facts") and "red" in page.text_content("#timeline")
            page.fill("#prompt", "sky?")
            page.click("button")
            page.wait_for_function("['base', 'current'].every(id => "
                                   "!['', '...'].includes(document.getElementById(id).textContent))")
            model, formatter = load_version(kb)
            base, base_formatter = load_version(kb, 0)
            assert page.text_content("#current") == generate(model, formatter, ["sky?"], max_new_tokens=32)[0]
            assert page.text_content("#base") == generate(base, base_formatter, ["sky?"], max_new_tokens=32)[0]
            assert main(["revert", str(kb), "0"]) == 0  # from the command line, while the page is open
            page.reload()
            assert page.text_content("#head") == "v2" and "restores version 0" in page.text_content("#v2")
        finally:
            browser.close()
