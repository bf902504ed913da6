"""The chat page: served as configured over HTTP, and used in a real headless Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.defaults import DEFAULT_MODEL_NAME, default_config_dict
from gateway.errors import ConfigError
from gateway.testing import ServerThread
from tests.plugins.helpers import SLOW_REPLY, config, need_program, scripted, sha256, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

KEY = "sk-chat-page-0123456789"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# --- over HTTP -------------------------------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_csp() -> None:
    cfg = config(plugins={"chat_page": {"title": "Ask <b>us</b>"}})
    with ServerThread(cfg) as server:
        page = httpx.get(server.base_url + "/")
        js = httpx.get(server.base_url + "/chat.js")
        css = httpx.get(server.base_url + "/chat.css")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<title>Ask &lt;b&gt;us&lt;/b&gt;</title>" in page.text
    assert 'data-api-base="/v1"' in page.text
    assert js.headers["content-type"].startswith("text/javascript")
    assert "/responses" in js.text
    assert css.headers["content-type"].startswith("text/css")


def test_the_page_can_be_turned_off() -> None:
    with ServerThread(config(plugins={"chat_page": {"enabled": False}})) as server:
        r = httpx.get(server.base_url + "/")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_the_page_can_live_elsewhere_and_talk_to_another_api() -> None:
    table = {"path": "/ui/", "api_base": "https://gateway.example/v1/"}
    with ServerThread(config(plugins={"chat_page": table})) as server:
        assert httpx.get(server.base_url + "/").status_code == 404
        page = httpx.get(server.base_url + "/ui/")
        assert httpx.get(server.base_url + "/ui/chat.js").status_code == 200
    assert 'data-api-base="https://gateway.example/v1"' in page.text
    assert 'src="chat.js"' in page.text  # relative: found beside the page


@pytest.mark.parametrize("table", [{"path": "/ui"}, {"api_base": "javascript:alert(1)"}])
def test_bad_page_settings_are_config_errors(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.chat_page\."):
        config(plugins={"chat_page": table})


def test_the_embedded_default_enables_the_chat_page_and_metrics() -> None:
    assert list(default_config_dict()["plugins"]) == ["metrics", "chat_page"]


# --- in a real headless Chromium -------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = need_program("chromium", "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "the Python package 'playwright' is missing: pip install playwright"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab; the test fails if the page logs an error (a CSP violation, a JS error)."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on(
        "console",
        lambda msg: (
            problems.append(msg.text) if msg.type == "error" and "401" not in msg.text else None
        ),
    )
    yield page
    context.close()
    assert problems == []


def record_text_growth(page: Page) -> None:
    """Keeps every length the assistant's answer had, to show it arrived in pieces."""
    page.evaluate(
        """() => {
        window.lengths = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('.message.assistant');
          if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
      }"""
    )


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


@pytest.mark.slow
def test_chat_streams_the_default_model_in_a_real_browser(page: Page) -> None:
    """The real embedded default (SmolLM2 on llama.cpp), with its default plugins."""
    raw = default_config_dict()
    model = raw["models"][DEFAULT_MODEL_NAME]
    model["batching"] = {"n_threads": 1, "max_concurrent": 2}
    model["kv_cache"] = {"n_ctx_per_slot": 512}
    with ServerThread(parse_config(raw, "<embedded default, 1 thread>")) as server:
        page.goto(server.base_url + "/")
        page.locator("#model option").nth(1).wait_for(state="attached")
        options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
        assert set(options) == {DEFAULT_MODEL_NAME, "default"}
        page.click("#params summary")  # the parameters are folded away
        page.fill("#max-tokens", "48")
        record_text_growth(page)
        send(page, "Write two sentences about the sea.")
        page.wait_for_selector(".message.user")
        page.locator(".message.assistant").wait_for()
        page.locator("#send:enabled").wait_for(timeout=60_000)
        answer = page.inner_text(".message.assistant")
        status = page.inner_text("#status")
        lengths = page.evaluate("window.lengths")
    assert page.locator(".message.error").count() == 0
    assert answer.strip()
    assert "tokens/s" in status
    assert "first token" in status
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 3  # streamed, not all at once


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerThread]:
    """The scripted double (not a real model) behind an API key: the page's error paths."""
    cfg = config(
        {"m": {"reply": SLOW_REPLY, "token_delay_s": 0.03}},
        plugins={
            "api_keys": {"keys": [{"name": "web", "sha256": sha256(KEY)}]},
            "chat_page": {},
        },
    )
    with ServerThread(cfg) as server:
        yield server


@pytest.mark.slow
def test_the_page_asks_for_a_key_then_streams_with_it(
    page: Page, keyed_server: ServerThread
) -> None:
    """Uses the scripted double: the point is the page's handling of a 401."""
    page.goto(keyed_server.base_url + "/")
    page.locator("#status", has_text="enter an API key").wait_for()
    assert page.locator("#model option").count() == 0  # the model list needs a key too
    send(page, "hello")
    page.locator("#status", has_text="Pick a model first").wait_for()
    assert page.locator(".message").count() == 0  # nothing was sent
    page.fill("#api-key", "sk-wrong")
    page.dispatch_event("#api-key", "change")
    page.locator("#status", has_text="Incorrect API key").wait_for()
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.locator("#model option").first.wait_for(state="attached")
    page.click("#params summary")
    page.fill("#max-tokens", "12")
    send(page, "hello again")
    page.locator(".message.assistant", has_text="w0 w1").wait_for()
    page.locator("#send:enabled").wait_for()
    assert page.inner_text(".message.assistant") == " ".join(f"w{i}" for i in range(12))
    assert page.inner_text("#status").startswith("12 tokens")
    # the key stays in this tab's session storage, not in the page or the URL
    assert KEY not in page.content()
    assert KEY not in page.url


@pytest.mark.slow
def test_stop_cancels_the_stream_in_the_engine(page: Page, keyed_server: ServerThread) -> None:
    """Uses the scripted double, whose record shows the cancellation."""
    backend = scripted(keyed_server)
    cancelled = len(backend.record.cancelled)
    page.goto(keyed_server.base_url + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.locator("#model option").first.wait_for(state="attached")
    send(page, "a long answer please")
    page.locator(".message.assistant", has_text="w3").wait_for()
    page.click("#stop")
    page.locator("#send:enabled").wait_for()
    wait_for(lambda: len(backend.record.cancelled) == cancelled + 1)
    partial = page.inner_text(".message.assistant")
    assert partial.startswith("w0 w1 w2 w3")
    assert not partial.endswith("w59")
    assert page.locator(".message.error").count() == 0
