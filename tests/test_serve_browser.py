"""The web chat page in a real headless browser: Debian's chromium driven by playwright.

The server runs in a background thread over the deterministic :class:`FakeEngine` (its answer is
the user's message reversed, after a short ``<think>`` block), so the test can check exactly what
the page shows: the streamed answer, the "Thinking…" block that folds into "Thought for N s",
multi-turn history, ``n`` answers, errors from the API, and that the Stop button frees the
engine's slot. Playwright never downloads a browser here: it launches ``/usr/bin/chromium``,
which a session fixture installs with apt-get when missing (or skips, saying why).
A screenshot is written to ``/tmp/nanoseek_chat.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from nanoseek.serve.api import ServeLimits, create_app
from serve_helpers import FakeEngine, background_server, make_test_tokenizer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/nanoseek_chat.png"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's chromium, installed with apt-get if missing (skips with the reason if it cannot be)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"no browser: {CHROMIUM} is missing and there is no apt-get to install chromium")
    if os.geteuid() != 0:
        pytest.skip(f"no browser: {CHROMIUM} is missing and installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"no browser: `{' '.join(cmd)}` failed: {e}")
        if r.returncode != 0:
            pytest.skip(f"no browser: `{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-500:]}")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser: apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


@pytest.fixture(scope="module")
def served():
    tokenizer = make_test_tokenizer()
    engine = FakeEngine(tokenizer, max_batch_size=8, step_delay=0.02).start()
    app = create_app(engine, tokenizer, "nanoseek-test", ServeLimits(max_tokens=4096))
    with background_server(app) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def page(chromium, served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    url, _ = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        foreign = []
        page.on("request", lambda r: None if r.url.startswith((url, "data:")) else foreign.append(r.url))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        yield page
        assert not foreign, f"the page requested external resources: {foreign}"
        browser.close()


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_idle(page, timeout: float = 15_000) -> None:
    page.wait_for_function("document.body.dataset.busy === ''", timeout=timeout)


def set_setting(page, id_: str, value: str) -> None:
    page.fill(f"#{id_}", value)
    page.dispatch_event(f"#{id_}", "change")


def test_chat_streams_answer_and_folds_thinking(page, served):
    assert page.inner_text("#model-name") == "nanoseek-test"
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, textarea')]
        .filter(e => !document.querySelector(`label[for='${e.id}']`)).map(e => e.id)""")
    assert unlabelled == []  # every control has a label
    set_setting(page, "temperature", "0")
    set_setting(page, "n", "1")
    ask(page, "hello nanoseek")
    # While the model reasons the block is open and says so.
    page.wait_for_selector(".msg.assistant details.thinking[open] summary:text('Thinking…')", timeout=10_000)
    wait_idle(page)
    last = page.locator(".msg.assistant").last
    assert last.locator(".answer").inner_text() == "keesonan olleh"
    details = last.locator("details.thinking")
    assert details.count() == 1
    assert details.evaluate("d => d.open") is False
    assert re.fullmatch(r"Thought for \d+(\.\d)? s", details.locator("summary").inner_text())
    details.locator("summary").click()
    assert details.evaluate("d => d.open") is True
    assert "write the message backwards" in details.locator(".reasoning").inner_text()

    # A second turn: the history goes back to the server, the new message is answered.
    ask(page, "how are you")
    wait_idle(page)
    assert page.locator(".msg.assistant").last.locator(".answer").inner_text() == "uoy era woh"
    assert page.locator(".msg.user").count() == 2
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert os.path.getsize(SCREENSHOT) > 10_000


def test_n_answers_and_seeded_sampling(page):
    set_setting(page, "temperature", "1")
    set_setting(page, "n", "2")
    set_setting(page, "seed", "5")
    ask(page, "abc")
    wait_idle(page)
    answers = page.locator(".msg.assistant").last.locator(".answer")
    assert answers.count() == 2
    texts = [answers.nth(i).inner_text() for i in range(2)]
    assert all(t.startswith("cba ") for t in texts), texts
    assert page.locator(".msg.assistant").last.locator(".choice-label").first.inner_text() == "Answer 1 of 2"
    set_setting(page, "n", "1")
    set_setting(page, "seed", "")
    set_setting(page, "temperature", "0")


def test_api_error_is_shown(page):
    set_setting(page, "max_tokens", "100000")
    ask(page, "too many tokens please")
    wait_idle(page)
    error = page.locator(".msg.assistant").last.locator(".error").inner_text()
    assert "max_tokens=100000 exceeds this server's limit of 4096" in error
    set_setting(page, "max_tokens", "256")


def test_stop_button_frees_the_engine_slot(page, served):
    _, engine = served
    set_setting(page, "max_tokens", "600")
    ask(page, "a long message to reverse slowly " * 8)
    page.wait_for_selector(".msg.assistant >> nth=-1 >> .answer:not(:empty)", timeout=10_000)
    assert engine.num_active_requests == 1
    page.click("#stop")
    wait_idle(page)
    assert "stopped by you" in page.locator(".msg.assistant").last.inner_text()
    deadline = time.monotonic() + 3
    while engine.num_active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_active_requests == 0
    set_setting(page, "max_tokens", "256")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.click("#toggle-settings")
    assert page.is_hidden("#settings") and page.get_attribute("#toggle-settings", "aria-expanded") == "false"
    page.click("#toggle-settings")
    assert page.is_visible("#settings")


def test_server_side_tool_calls_show_in_collapsible_blocks(page):
    """``nanoseek serve --tools``: each call the server runs appears where it was made, folded, with
    its arguments and output; the answer goes on below it (a second tab of the same browser)."""
    from nanoseek.tools.format import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                                       TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP)
    from nanoseek.tools.toolbox import Toolbox
    from serve_helpers import ScriptedEngine, make_tool_tokenizer

    def script(prompt, params, i):
        outputs = prompt.count(TOOL_OUTPUT_END)
        if outputs == 2:
            return " So the answer is " + prompt.rsplit(TOOL_OUTPUT_BEGIN, 1)[1].split(TOOL_OUTPUT_END)[0] + "."
        expr = '{"expression": "347*829"}' if outputs == 0 else '{"expr": "oops"}'
        return (f"Step {outputs + 1}." + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "calculator" + TOOL_SEP + expr
                + TOOL_CALL_END + TOOL_CALLS_END)

    tk = make_tool_tokenizer()
    engine = ScriptedEngine(tk, script, step_delay=0.005)
    app = create_app(engine, tk, "nanoseek-test", ServeLimits(max_tokens=1024), toolbox=Toolbox.builtin("calculator"))
    with background_server(app) as url:
        page = page.context.browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        ask(page, "What is 347*829?")
        wait_idle(page)
        last = page.locator(".msg.assistant").last
        blocks = last.locator("details.tool")
        assert blocks.count() == 2
        assert blocks.nth(0).evaluate("d => d.open") is False
        assert blocks.nth(0).locator("summary").inner_text() == "Called calculator"
        assert blocks.nth(0).locator(".tool-output").text_content() == "287663"
        assert '"347*829"' in blocks.nth(0).locator(".tool-arguments").text_content()
        blocks.nth(0).locator("summary").click()
        assert blocks.nth(0).evaluate("d => d.open") is True
        assert blocks.nth(0).locator(".tool-output").inner_text() == "287663"     # shown once opened
        assert blocks.nth(1).locator("summary").inner_text() == "Failed call: calculator"
        assert blocks.nth(1).locator(".tool-output").text_content().startswith("error:")
        # the text segments around the blocks, in order
        order = last.evaluate("""m => [...m.querySelectorAll('.answer, details.tool')]
            .map(e => e.matches('details') ? '[' + e.querySelector('summary').textContent + ']' : e.textContent)
            .filter(Boolean)""")
        assert order == ["Step 1.", "[Called calculator]", "Step 2.", "[Failed call: calculator]",
                         " So the answer is " + blocks.nth(1).locator(".tool-output").text_content() + "."]
        page.close()
