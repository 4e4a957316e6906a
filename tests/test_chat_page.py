"""The chat page in headless Chromium (Debian's, driven by Playwright) against a real server:
a question streams an answer token by token, Stop ends it, the conversation and settings
survive a reload, code blocks render as code, and the page loads nothing from elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying hosts this machine cannot reach.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def install_chromium() -> str | None:
    """Debian's chromium, installed if missing; None when ready, else why it is not."""
    if os.path.exists(CHROMIUM):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        log.append(r.stdout[-2000:] + r.stderr[-2000:])
        if r.returncode != 0:
            break
    if not os.path.exists(CHROMIUM):
        return f"could not install chromium with apt-get: {log[-1].strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = ServerProcess(smollm2_path, "-t", "1", "-c", "1024", "--parallel", "2", "--temp", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser_context():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    reason = install_chromium()
    if reason:
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="qpack-chromium-")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            bypass_csp=True,  # lets the test evaluate its own probes; the page itself is inline
        )  # fmt: skip
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context, server):
    page = browser_context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url)
    page.evaluate("localStorage.clear()")
    page.reload()
    page.wait_for_function(
        "document.getElementById('model').textContent.includes('SmolLM2')", timeout=60_000
    )
    yield page
    page.close()
    # Works offline: everything the page asked for came from the server it was served by.
    assert requested and all(u.startswith(server.url) for u in requested), requested


def assistant_text(page) -> str:
    return page.evaluate(
        "(document.querySelector('.msg.assistant:last-child .body') || {}).textContent || ''"
    )


def test_streams_an_answer_and_stop_ends_it(page, server):
    page.click("#toggle-settings")
    page.fill("#max-tokens", "400")
    page.fill("#input", "Tell me a long story about a dragon who learns to bake bread.")
    page.press("#input", "Enter")
    # Token by token: the answer is seen at several growing lengths while still streaming.
    seen: list[str] = []
    for _ in range(3):
        last = seen[-1] if seen else ""
        page.wait_for_function(
            "([n]) => document.body.dataset.busy === '1' && "
            "(document.querySelector('.msg.assistant:last-child .body')?.textContent || '').length > n",
            arg=[len(last)], timeout=120_000,
        )  # fmt: skip
        seen.append(assistant_text(page))
    assert (
        seen[0]
        and seen[1].startswith(seen[0])
        and seen[2].startswith(seen[1])
        and len(seen[2]) > len(seen[0])
    )
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    page.wait_for_selector('.msg.assistant[data-done="stopped"]', timeout=30_000)
    stopped_text = assistant_text(page)
    assert stopped_text.startswith(seen[2])
    assert "[stopped]" in page.inner_text(".msg.assistant:last-child .note")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert "tokens/s" in page.inner_text("#status")
    # The stop reached the server: its slot is free again, well before 400 tokens.
    for _ in range(200):
        if server.metric("qpack_requests_processing") == 0:
            break
        page.wait_for_timeout(50)
    assert server.metric("qpack_requests_processing") == 0


def test_conversation_and_settings_are_kept(page):
    posted: list[dict] = []
    page.on(
        "request", lambda r: posted.append(json.loads(r.post_data)) if r.method == "POST" else None
    )
    page.click("#toggle-settings")
    page.fill("#system", "You are a terse assistant.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    for k, question in enumerate(("What is the capital of France?", "And of Italy?"), start=1):
        page.fill("#input", question)
        page.click("#send")
        page.wait_for_selector(f".msg.assistant:nth-of-type({2 * k})[data-done]", timeout=120_000)
    assert len(posted) == 2
    second = posted[1]
    assert second["stream"] is True and second["temperature"] == 0 and second["max_tokens"] == 12
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert second["messages"][0]["content"] == "You are a terse assistant."
    assert second["messages"][2]["content"] == page.evaluate(
        "document.querySelector('.msg.assistant .body').textContent"
    )
    assert "tokens/s" in page.inner_text("#status")
    # A reload keeps the conversation and the settings; New chat clears the conversation.
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    assert page.input_value("#system") == "You are a terse assistant."
    assert page.input_value("#temperature") == "0"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.reload()
    assert page.locator(".msg").count() == 0


def test_code_blocks_render_as_code_and_text_stays_text(page):
    html = page.evaluate("""() => {
        const el = document.createElement('div');
        renderInto(el, 'Here:\\n```python\\ndef f(x):\\n    return x < 2\\n```\\nUse `f(1)` <img src=x onerror=alert(1)>');
        return {pre: el.querySelector('pre code').textContent, lang: el.querySelector('pre .lang').textContent,
                inline: el.querySelector(':not(pre) > code').textContent, imgs: el.querySelectorAll('img').length,
                text: el.textContent};
    }""")  # fmt: skip
    assert html["pre"] == "def f(x):\n    return x < 2"
    assert html["lang"] == "python" and html["inline"] == "f(1)"
    assert html["imgs"] == 0 and "<img src=x onerror=alert(1)>" in html["text"]
