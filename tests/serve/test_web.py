"""The web chat page, end to end in headless Chromium (Debian's `chromium` driven by Playwright):
type a message, watch the streamed answer arrive, keep the conversation, change a sampling
setting, drop the oldest turns visibly when the conversation outgrows the context, and save
screenshots (to $LMFORGE_TEST_ARTIFACTS if set, else the test's tmp dir).

Skipped only when Chromium or the playwright package is absent; installing them:
`apt-get install -y chromium` and `pip install playwright` (never `playwright install`)."""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if not CHROMIUM:
    pytest.skip("Chromium not installed (apt-get install -y chromium)", allow_module_level=True)

from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.server import ServerThread, create_app  # noqa: E402
from tests.factories import make_tiny_model  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def open_page(pw, profile):
    # a fresh profile (--user-data-dir) for every run
    return pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        args=ARGS,
        headless=True,
        timeout=60_000,
        viewport={"width": 1100, "height": 700},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("model") / "webmodel")
    engine = Engine.from_pretrained(folder, max_batch=2, max_queue=4).start()
    with ServerThread(create_app(engine)) as url:
        yield url, engine
    engine.close()


def test_chat_page_streams_and_keeps_conversation(server, tmp_path):
    url, engine = server
    profile = tmp_path / "profile"
    shots = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = open_page(pw, profile)
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            bodies = []
            page.on(
                "request",
                lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None,
            )
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('webmodel')", timeout=20_000
            )
            # a sampling setting is sent with the request
            page.fill("#max_tokens", "12")
            page.fill("#seed", "7")
            page.fill("#input", "Hello, who are you?")
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30_000)
            first = page.inner_text(".msg.assistant .content")
            assert first.strip(), "the streamed answer is empty"
            # second turn: the history goes with it
            page.fill("#input", "Tell me more.")
            page.click("#send")
            page.wait_for_function(
                "document.querySelectorAll(\".msg.assistant[data-done='1']\").length == 2", timeout=30_000
            )
            assert page.locator(".msg.user").count() == 2
            assert page.is_hidden("#error")
            page.screenshot(path=str(shots / "web_chat.png"), full_page=True)
            assert (shots / "web_chat.png").stat().st_size > 5_000
            # what the page sent
            assert len(bodies) == 2
            assert bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 12 and bodies[0]["seed"] == 7
            roles = [m["role"] for m in bodies[1]["messages"]]
            assert roles == ["user", "assistant", "user"]
            assert bodies[1]["messages"][1]["content"] == first
            # the conversation survives a reload (localStorage), and "New chat" clears it
            page.reload(wait_until="domcontentloaded")
            assert page.locator(".msg.user").count() == 2
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert engine.stats()["running"] == 0


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("model") / "smallctx", max_seq_len=96)
    engine = Engine.from_pretrained(folder, max_batch=1, max_queue=4).start()
    with ServerThread(create_app(engine)) as url:
        yield url, engine
    engine.close()


def test_overflowing_conversation_drops_the_oldest_turns_visibly(small_server, tmp_path):
    """Once the conversation exceeds the context, every later message used to fail until "New
    chat"; the page now stops sending the oldest exchanges (greyed out, with a notice) and goes on."""
    url, engine = small_server
    shots = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = open_page(pw, tmp_path / "profile")
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            sent, answers = [], []
            page.on(
                "request",
                lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None,
            )
            page.on(
                "response", lambda r: answers.append(r.status) if r.url.endswith("/completions") else None
            )
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_function("document.getElementById('model').textContent.includes('smallctx')")
            page.fill("#max_tokens", "8")
            page.fill("#seed", "1")
            question = "The quick brown fox jumps over the lazy dog near the river bank, turn {}."
            for turn in range(5):
                page.fill("#input", question.format(turn))
                page.keyboard.press("Enter")
                page.wait_for_function(
                    f"document.querySelectorAll(\".msg.assistant[data-done='1']\").length == {turn + 1}",
                    timeout=30_000,
                )
                assert page.is_hidden("#error"), page.inner_text("#error")
            assert page.is_visible("#notice") and "oldest exchange" in page.inner_text("#notice")
            dropped = page.locator(".msg[data-dropped='1']").count()
            assert dropped >= 2 and dropped % 2 == 0
            assert page.locator(".msg.user").count() == 5  # still shown, only no longer sent
            assert 400 in answers and answers[-1] == 200  # it overflowed, and the last turn went through
            last = [m["content"] for m in sent[-1]["messages"] if m["role"] == "user"]
            assert last[-1] == question.format(4) and question.format(0) not in last
            assert len(last) == 5 - dropped // 2
            page.screenshot(path=str(shots / "web_chat_overflow.png"), full_page=True)
            # the dropped count survives a reload, and "New chat" starts over
            page.reload(wait_until="domcontentloaded")
            assert page.locator(".msg[data-dropped='1']").count() == dropped
            page.click("#new-chat")
            assert page.is_hidden("#notice") and page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert engine.stats()["running"] == 0
