"""The chat page in Debian's Chromium against a real gateway: the embedded SmolLM2 (send,
stream, stop, regenerate, edit) beside scripted models whose answers the test controls
(markdown, code, math, hostile HTML, reasoning, a tool call, a slow answer to reload in the
middle of, a 2,000-token answer, an embedding-only model, one loaded on demand), behind two
API keys, conversations in a fresh SQLite store.
Screenshots of the main states go to ``$GATEWAY_TEST_ARTIFACTS`` (or a temporary folder)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gateway.config import parse_config
from gateway.defaults import DEFAULT_MODEL_NAME, default_config_dict
from gateway.testing import ServerThread
from tests.plugins.helpers import need_program, sha256
from tests.plugins.test_chat_page import CHROMIUM_FLAGS

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ALICE, BOB = "sk-alice-chat-0123456789", "sk-bob-chat-0123456789"
#: Long enough (about 10 s) that a reload on a loaded CI machine still finds it running.
SLOW = " ".join(f"w{i}" for i in range(200))
AGENT = ["streaming", "completions", "tools", "json_schema"]
#: 2,000 words (the scripted model's tokens) of markdown: paragraphs, lists, code, math.
LONG = "\n\n".join(
    f"## Part {i}\n\nSome **bold** words and `code` {' '.join(['word'] * 25)}\n\n"
    f"- item one\n- item two $x_{i}$\n\n```python\nprint({i})\n```"
    for i in range(50)
)
HOSTILE = (
    "Look: <img src=x onerror=\"window.pwned='img'\"> and <script>window.pwned='script'</script> "
    "and <svg onload=\"window.pwned='svg'\"></svg> "
    "[click](javascript:window.pwned='link') ![pic](javascript:window.pwned='pic')"
)
RICH = (
    "# A heading\n\nA table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
    "```python\ndef f(x):\n    return x * 2\n```\n\n"
    "Inline $e^{i\\pi} + 1 = 0$ and a display:\n\n$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$"
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("GATEWAY_TEST_ARTIFACTS")
    folder = Path(where) / "chat_page" if where else tmp_path_factory.mktemp("chat_page")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    raw = default_config_dict()
    smol = raw["models"][DEFAULT_MODEL_NAME]
    smol["batching"] = {"n_threads": 1, "max_concurrent": 2}
    smol["kv_cache"] = {"n_ctx_per_slot": 1024}
    scripted: dict[str, dict[str, Any]] = {
        "echo": {"echo": True, "token_delay_s": 0.002},
        "slow": {"reply": SLOW, "token_delay_s": 0.05},
        "reader": {"reply": "Read it all.", "prefill_delay_s": 1.5},
        "long": {"reply": LONG, "context_length": 8192, "token_delay_s": 0.001},
        "think": {
            "reply": "<think>First, ponder.</think>It is **42**.",
            "tool_format": "hermes",
            "capabilities": AGENT,
        },
        "tool": {"tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
        "emb": {"capabilities": ["embeddings"]},
        "lazy": {
            "reply": "Loaded and ready.",
            "load": "on_demand",
            "load_delay_s": 2.0,
            "tool_format": "hermes",
            "capabilities": AGENT,
            "context_length": 8192,
        },
    }
    for name, table in scripted.items():
        raw["models"][name] = {"backend": "scripted", **table}
    keys = [{"name": "alice", "sha256": sha256(ALICE)}, {"name": "bob", "sha256": sha256(BOB)}]
    raw["plugins"] = {"api_keys": {"keys": keys}, "chat_page": {}}
    raw["responses"] = {"path": str(tmp_path_factory.mktemp("store") / "responses.sqlite3")}
    with ServerThread(parse_config(raw, "<chat page browser test>")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = need_program("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Tabs:
    """Browser contexts (each its own storage, as another browser), closed at the end; any
    page error or console error fails the test."""

    def __init__(self, browser: Browser, server: ServerThread, artifacts: Path) -> None:
        self.browser, self.server, self.artifacts = browser, server, artifacts
        self.contexts: list[BrowserContext] = []
        self.problems: list[str] = []

    def open(self, key: str, **context: Any) -> Page:
        ctx = self.browser.new_context(**context)
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda err: self.problems.append(str(err)))
        page.on(
            "console",
            lambda m: (
                self.problems.append(m.text) if m.type == "error" and "401" not in m.text else None
            ),
        )
        page.goto(self.server.base_url + "/")
        login(page, key)
        return page

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.artifacts / f"{name}.png"), full_page=True)


def login(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    page.locator("#model option").first.wait_for(state="attached")


@pytest.fixture
def tabs(browser: Browser, server: ServerThread, artifacts: Path) -> Iterator[Tabs]:
    t = Tabs(browser, server, artifacts)
    yield t
    for ctx in t.contexts:
        ctx.close()
    assert t.problems == []


def send(page: Page, model: str, text: str, max_tokens: int | None = None) -> None:
    page.select_option("#model", model)
    if max_tokens is not None:
        page.evaluate("n => { document.getElementById('max-tokens').value = n; }", max_tokens)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def done(page: Page, timeout: float = 60_000) -> None:
    page.locator("#send:enabled").wait_for(timeout=timeout)


def turns(page: Page) -> int:
    return page.locator("#messages .turn").count()


def test_smollm2_send_stream_stop_regenerate_and_edit(tabs: Tabs) -> None:
    page = tabs.open(ALICE)
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => {
          const a = document.querySelectorAll('.message.assistant');
          if (a.length) window.lengths.push(a[a.length - 1].textContent.length);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true}); }"""
    )
    send(page, DEFAULT_MODEL_NAME, "Write two sentences about the sea.", 24)
    done(page)
    answer = page.inner_text(".message.assistant")
    assert answer.strip()
    lengths = page.evaluate("window.lengths")
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 3  # streamed, not at once
    stats = page.inner_text(".meta.answer .stats")
    assert "TTFT" in stats and "prompt tokens" in stats and "cached" in stats
    assert "generated" in stats and "tokens/s" in stats
    tabs.shot(page, "01-smollm2-answer")

    # stop: a long answer cut short, kept as cancelled
    send(page, DEFAULT_MODEL_NAME, "Tell me a very long story about a lighthouse.", 400)
    page.locator("#stop:enabled").wait_for()
    page.wait_for_function(
        "() => document.querySelectorAll('.message.assistant')[1]?.textContent.length > 10"
    )
    page.click("#stop")
    done(page)
    page.locator(".turn >> nth=1 >> .meta.answer .stats", has_text="cancelled").wait_for()
    assert turns(page) == 2

    # regenerate the second answer: a branch beside it
    page.locator(".turn >> nth=1 >> button.regenerate").click()
    done(page)
    page.locator(".turn >> nth=1 >> .branch", has_text="2/2").wait_for()
    # edit the first question: a third branch of the first turn, the rest dropped
    page.locator(".turn >> nth=0 >> button.edit").click()
    page.fill(".edit-box textarea", "Name one fish.")
    page.click(".edit-box button.save")
    done(page)
    assert turns(page) == 1
    page.locator(".turn >> nth=0 >> .branch", has_text="2/2").wait_for()
    assert page.inner_text(".message.user") == "Name one fish."
    page.click(".turn >> nth=0 >> button.branch-prev")  # back to the first branch
    page.locator(".message.user", has_text="about the sea").wait_for()
    assert turns(page) == 2  # its newest tip: the regenerated answer
    tabs.shot(page, "02-branches")


def test_markdown_code_math_render_and_model_html_never_runs(tabs: Tabs) -> None:
    page = tabs.open(ALICE)
    send(page, "echo", RICH)
    done(page)
    body = page.locator(".message.assistant .body")
    body.locator("h1", has_text="A heading").wait_for()
    assert body.locator("table td").count() == 2
    assert body.locator("pre code.hljs .hljs-keyword").count() >= 1  # highlighted
    assert body.locator(".math .katex").count() == 2  # inline and display, typeset
    assert body.locator(".math.display .katex-display").count() == 1
    tabs.shot(page, "03-markdown-code-math")

    send(page, "echo", HOSTILE)
    done(page)
    hostile = page.locator(".turn >> nth=1 >> .message.assistant .body")
    hostile.locator("text=window.pwned='img'").first.wait_for()  # shown as text
    for link in hostile.locator("a").all():
        assert not (link.get_attribute("href") or "").startswith("javascript:")
        link.click()  # nothing runs, whatever a link says
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    found = (
        "#messages img, #messages script, #messages svg, #messages [onerror], #messages [onload]"
    )
    assert page.locator(found).count() == 0

    # reasoning (collapsed, opens) and a tool call
    send(page, "think", "why?")
    done(page)
    reasoning = page.locator(".turn >> nth=2 >> details.reasoning")
    assert reasoning.inner_text().startswith("Reasoning")
    reasoning.locator("summary").click()
    reasoning.locator(".text", has_text="First, ponder.").wait_for()
    assert "42" in page.inner_text(".turn >> nth=2 >> .message.assistant .body")
    send(page, "tool", "weather?")
    done(page)
    page.locator(".turn >> nth=3 >> .tool", has_text="get_weather").wait_for()

    # dark mode
    page.click("#theme")  # auto -> light
    page.click("#theme")  # light -> dark
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(21, 23, 27)"
    tabs.shot(page, "04-dark")


def test_conversations_are_kept_per_key_and_managed(tabs: Tabs) -> None:
    page = tabs.open(ALICE)
    send(page, "echo", "Remember the word zebra-7 please.")
    done(page)
    item = page.locator("#conversations li", has_text="zebra-7")
    item.wait_for()
    page.reload()
    page.locator("#model option").first.wait_for(state="attached")  # key kept in the tab
    item.click()
    page.locator(".message.assistant", has_text="zebra-7").wait_for()

    other = tabs.open(ALICE)  # another browser, same key: found
    other.locator("#conversations li", has_text="zebra-7").click()
    other.locator(".message.user", has_text="zebra-7").wait_for()
    stranger = tabs.open(BOB)  # another key: not found, nor searchable
    stranger.wait_for_timeout(300)
    assert stranger.locator("#conversations li", has_text="zebra-7").count() == 0
    assert "zebra-7" not in stranger.content()

    # search (by content), rename, export, import, delete
    page.fill("#search", "zebra")
    assert page.locator("#conversations li").count() == 1
    page.fill("#search", "")
    page.once("dialog", lambda d: d.accept("Zoo notes"))
    page.locator("#conversations li", has_text="zebra-7").locator("button.rename").click()
    page.locator("#conversations li", has_text="Zoo notes").wait_for()
    other.reload()
    login(other, ALICE)
    other.locator("#conversations li", has_text="Zoo notes").wait_for()  # on the server
    with page.expect_download() as download:
        page.locator("#conversations li", has_text="Zoo notes").locator("button.export").click()
    exported = download.value.path()
    page.once("dialog", lambda d: d.accept())
    page.locator("#conversations li", has_text="Zoo notes").locator("button.delete").click()
    page.locator("#conversations li", has_text="Zoo notes").wait_for(state="detached")
    other.reload()
    login(other, ALICE)
    other.wait_for_timeout(300)
    assert other.locator("#conversations li", has_text="Zoo notes").count() == 0
    page.set_input_files("#import-file", str(exported))
    page.locator(".message.user", has_text="zebra-7").wait_for()
    send(page, "echo", "and again")
    done(page)
    page.locator("#conversations li", has_text="Zoo notes").wait_for()  # stored once continued
    tabs.shot(page, "05-conversations")


def test_a_reload_mid_answer_resumes_it(tabs: Tabs) -> None:
    page = tabs.open(ALICE)
    send(page, "slow", "go slowly")
    page.locator(".message.assistant", has_text="w5").wait_for()
    page.reload()
    page.locator("#model option").first.wait_for(state="attached")
    page.locator(".message.assistant.streaming").wait_for()  # reconnected, still going
    done(page)
    assert page.inner_text(".message.assistant").strip() == SLOW
    tabs.shot(page, "06-resumed")


def test_a_long_prompt_shows_how_far_it_is_read(tabs: Tabs) -> None:
    page = tabs.open(ALICE)
    send(page, "reader", "a long document " * 50)
    bar = page.locator(".message.assistant progress.prompt-progress")
    bar.wait_for()
    text = page.inner_text(".message.assistant .progress-text")
    assert re.fullmatch(r"Reading the prompt: \d+% \(\d+ of \d+ tokens\)", text), text
    value, top = bar.evaluate("b => [b.value, b.max]")
    assert 0 < value < top
    tabs.shot(page, "05b-prompt-progress")
    done(page)
    assert page.inner_text(".message.assistant").strip() == "Read it all."
    assert "prompt read in" in page.inner_text(".meta.answer .stats")


def test_a_phone_wide_viewport(tabs: Tabs) -> None:
    page = tabs.open(ALICE, viewport={"width": 390, "height": 844})
    send(page, "echo", RICH)
    done(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#sidebar").bounding_box()
    assert box is not None and box["x"] < 0  # the conversations are tucked away
    tabs.shot(page, "07-phone")
    page.click("#toggle-side")
    page.wait_for_timeout(300)
    assert page.locator("#conversations li").first.is_visible()
    tabs.shot(page, "08-phone-conversations")


def test_first_load_is_small_and_a_long_answer_does_not_jank(tabs: Tabs) -> None:
    page = tabs.open(ALICE)
    sizes = page.evaluate(
        """() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource');
        return [nav.transferSize, ...res.map(r => r.transferSize)];
      }"""
    )
    total = sum(sizes)
    print(f"first load: {total} bytes transferred in {len(sizes)} responses")
    assert 0 < total < 500_000
    page.evaluate(
        """() => { window.longTasks = [];
        new PerformanceObserver(list => {
          for (const e of list.getEntries()) window.longTasks.push(e.duration);
        }).observe({type: 'longtask'}); }"""
    )
    send(page, "long", "a long answer", 2500)
    done(page)
    page.locator(".message.assistant h2", has_text="Part 49").wait_for()
    tasks = page.evaluate("window.longTasks")
    print(f"long tasks while streaming 2,000 tokens: {tasks}")
    generated = re.search(r"(\d+) generated", page.inner_text(".meta.answer .stats"))
    assert generated is not None and int(generated[1]) >= 2000
    assert max(tasks, default=0) < 250
    assert sum(tasks) < 600
    tabs.shot(page, "09-long-answer")


def test_the_model_picker_shows_state_and_capabilities(tabs: Tabs) -> None:
    page = tabs.open(ALICE)

    def option(model: str) -> Locator:
        return page.locator(f'#model option[value="{model}"]')

    smol = option(DEFAULT_MODEL_NAME).inner_text()
    assert "loaded" in smol and "tools, JSON" in smol and "1k" in smol  # 1,024 tokens a slot
    assert "reasoning" not in smol  # SmolLM2's template has none
    think = option("think").inner_text()
    assert "loaded" in think and "tools, JSON, reasoning" in think and "4k" in think
    # an embedding-only model is listed, apart, and cannot be picked for chat
    emb = page.locator('#model optgroup option[value="emb"]')
    assert "embeddings only" in emb.inner_text() and emb.is_disabled()
    assert option(DEFAULT_MODEL_NAME).is_enabled()
    lazy = option("lazy")
    assert "on demand" in lazy.inner_text()
    assert "known once the model is loaded" in (lazy.get_attribute("title") or "")

    info = page.locator("#model-info")
    page.select_option("#model", "think")
    assert info.locator(".badge.state").inner_text() == "loaded"
    badges = info.locator(".badge.cap").all_inner_texts()
    assert badges == ["tools", "JSON", "reasoning", "ctx 4k"]
    assert "hermes" in (info.locator(".badge", has_text="tools").get_attribute("title") or "")

    # a model on demand: its state followed while it loads, what its load tells filled in
    page.select_option("#model", "lazy")
    assert info.locator(".badge.state").inner_text() == "on demand"
    assert info.locator(".badge.cap.unknown").all_inner_texts() == ["reasoning?"]
    assert "ctx" not in info.inner_text()  # the context is known once loaded
    send(page, "lazy", "are you there?")
    page.locator("#status", has_text="Loading lazy").wait_for()
    info.locator(".badge.state.moving", has_text="loading").wait_for()
    tabs.shot(page, "10-model-loading")
    info.locator(".badge.state.loaded").wait_for(timeout=20_000)
    assert "loaded" in lazy.inner_text() and "reasoning" in lazy.inner_text()
    assert info.locator(".badge.cap").all_inner_texts() == ["tools", "JSON", "reasoning", "ctx 8k"]
    done(page)
    assert page.inner_text(".message.assistant").strip() == "Loaded and ready."
    tabs.shot(page, "11-model-loaded")
