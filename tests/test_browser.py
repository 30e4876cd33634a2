"""The demo page in a real headless Chromium against a real `dg-edit serve`: type, put the cursor,
press Ctrl+Space, watch the middle refine in place (at least two different drafts), see the final
text, press Tab to accept. Screenshots go to artifacts/ (git-ignored) for a person to look at.

Needs Debian's chromium at /usr/bin/chromium and Playwright from PyPI; no `playwright install`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dg_edit.serve_process import ServeProcess

from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.timeout(300)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TOKEN = "browser-token"
# The cursor on an indented empty line of a function body: a multi-line infill, which even a weak
# model fills with something (at the end of a line it may well propose nothing).
PREFIX = 'import os\n\n\ndef list_files(path):\n    """Return the names of the files in path."""\n    '
SUFFIX = "\n\n\nprint(list_files('.'))\n"

# Records every text the ghost (the draft shown in place) takes, as the page renders it.
RECORD_DRAFTS = """
window.__drafts = [];
window.__tokens = [];
new MutationObserver(() => {
  const ghost = document.getElementById("ghost");
  if (!ghost || ghost.dataset.step === undefined) return;  // only drafts drawn from step frames
  window.__drafts.push(ghost.textContent);
  for (const tok of ghost.querySelectorAll(".tok")) window.__tokens.push([tok.className, tok.title]);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    # With a token, as a user exposing the page would run it: the page must carry it to the websocket.
    # Every block runs 8 steps (never stable for 8 steps before the 9th, never "confident enough"), so
    # there is a refinement to watch with any model, however sure of itself.
    config = tmp_path_factory.mktemp("browser") / "settings.json"
    steady = {"max_denoising_steps": 8, "confidence_threshold": 1e-30, "stability_threshold": 8}
    config.write_text(json.dumps({"sampling": steady}))
    with ServeProcess(["--model", str(model_dir), "--config", str(config)], env={"DG_EDIT_TOKEN": TOKEN}) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1100, "height": 640})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.frames_received = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: page.frames_received.append(json.loads(f))))
    page.add_init_script(RECORD_DRAFTS)
    yield page
    context.close()


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def type_document(page, prefix: str, suffix: str) -> None:
    """Type the text as a person would, then walk the cursor back to the end of `prefix`."""
    editor = page.locator("#editor")
    editor.fill("")
    editor.click()
    page.keyboard.type(prefix + suffix)
    for _ in range(utf16_len(suffix)):
        page.keyboard.press("ArrowLeft")
    assert page.evaluate("() => document.getElementById('editor').selectionStart") == utf16_len(prefix)


def open_page(page, service):
    page.goto(f"{service.url}/?token={TOKEN}")
    page.wait_for_selector('#connection[data-state="open"]', timeout=60_000)


def test_infill_refines_in_place_and_tab_accepts(page, service):
    open_page(page, service)
    prefix, suffix = PREFIX, SUFFIX
    type_document(page, prefix, suffix)
    page.fill("#max-new-tokens", "64")
    page.locator("#editor").focus()
    page.keyboard.press("Control+Space")
    page.wait_for_selector("#preview:not([hidden])")
    page.wait_for_selector('#status[data-kind="done"]', timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-infill-done.png"))

    done = [f for f in page.frames_received if f["type"] == "done"]
    assert len(done) == 1, page.frames_received
    final = done[0]["text"]
    drafts = page.evaluate("() => window.__drafts")
    distinct = set(drafts)
    assert len(distinct) >= 2, f"the middle should visibly refine; drafts shown: {drafts!r}"
    # The final text sits in place between prefix and suffix, inserted as text (never parsed as HTML).
    assert page.text_content("#ghost") == final
    assert page.text_content("#preview") == prefix + final + suffix
    assert f"{done[0]['steps']} steps" in page.text_content("#status")
    # Tab accepts: the editor now holds the middle, the cursor after it.
    page.keyboard.press("Tab")
    assert page.input_value("#editor") == prefix + final + suffix
    caret = page.evaluate("() => document.getElementById('editor').selectionStart")
    assert caret == utf16_len(prefix + final)  # JavaScript counts UTF-16 code units
    assert page.is_hidden("#preview")
    assert page.problems == []


def test_selection_is_rewritten_in_place(page, service):
    sent = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(json.loads(f))))
    open_page(page, service)
    editor = page.locator("#editor")
    editor.fill("")
    editor.click()
    page.keyboard.type("def area(w, h):\n    return w * h\n")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("End")
    for _ in range(5):  # select "w * h" as a person would
        page.keyboard.press("Shift+ArrowLeft")
    page.keyboard.press("Control+Space")
    page.wait_for_selector('#status[data-kind="done"]', timeout=120_000)
    requests = [f for f in sent if f["type"] in ("infill", "rewrite")]
    assert [r["type"] for r in requests] == ["rewrite"]
    assert (requests[0]["prefix"], requests[0]["selection"], requests[0]["suffix"]) == \
        ("def area(w, h):\n    return ", "w * h", "\n")
    final = next(f for f in page.frames_received if f["type"] == "done")["text"]
    page.keyboard.press("Tab")
    assert page.input_value("#editor") == "def area(w, h):\n    return " + final + "\n"
    assert page.problems == []


def test_drafts_are_shaded_by_confidence_and_escape_dismisses(page, service):
    # Hold back the server's `done` frame so the page stays on its last draft for as long as we look.
    held = []

    def route(ws):
        server = ws.connect_to_server()
        ws.on_message(server.send)
        server.on_message(lambda m: held.append(m) if json.loads(m)["type"] == "done" else ws.send(m))

    page.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    open_page(page, service)
    type_document(page, PREFIX, SUFFIX)
    page.fill("#max-new-tokens", "64")
    page.locator("#editor").focus()
    page.keyboard.press("Control+Space")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('step')",
                           timeout=60_000)
    for _ in range(600):  # until the service finished: its done frame is held back, so the page
        if held:          # stays on the last draft
            break
        page.wait_for_timeout(100)
    assert held, "the request should have finished within a minute"
    page.wait_for_timeout(200)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-infill-refining.png"))
    tokens = page.evaluate("() => window.__tokens")
    assert tokens, "drafts are drawn as per-token spans"
    assert all(cls.split()[:2] in (["tok", f"c{i}"] for i in range(5)) for cls, _ in tokens), tokens
    assert all(title.startswith("confidence ") for _, title in tokens), tokens
    before = page.input_value("#editor")
    page.keyboard.press("Escape")
    assert page.is_hidden("#preview")
    assert page.input_value("#editor") == before, "dismissing never touches the text"
    assert page.text_content("#status") == "dismissed"
    assert page.problems == []


def test_page_without_the_token_says_so_and_cannot_connect(browser, service):
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(service.url + "/")
    assert response.status == 200  # the page itself is public; the websocket and /healthz are not
    page.wait_for_selector('#status[data-kind="error"]', timeout=30_000)
    assert "needs a token" in page.text_content("#status")
    page.wait_for_selector('#connection[data-state="closed"]', timeout=30_000)
    context.close()


def test_the_page_names_its_document_for_a_load_balancer(browser, service):
    """Behind replicas (dg_edit/serve/deploy/dg-edit-nginx.conf) a tab must reach the replica that holds
    its cache: its websocket carries ?doc=, the same after a reload, another in another tab."""
    from urllib.parse import parse_qs, urlsplit

    context = browser.new_context()
    try:
        urls: list[str] = []
        first = context.new_page()
        first.on("websocket", lambda ws: urls.append(ws.url))
        open_page(first, service)
        first.reload()
        first.wait_for_selector('#connection[data-state="open"]', timeout=60_000)
        second = context.new_page()
        second.on("websocket", lambda ws: urls.append(ws.url))
        open_page(second, service)
        docs = [parse_qs(urlsplit(url).query).get("doc", [""])[0] for url in urls]
        assert len(docs) == 3 and all(docs), urls
        assert docs[0] == docs[1] != docs[2], docs  # a tab keeps its name across a reload; tabs differ
        assert all(parse_qs(urlsplit(url).query)["token"] == [TOKEN] for url in urls)
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------- next edit
MEAN = "def mean(values):\n    count = 0\n    acc = 0.0\n    for v in values:\n        acc += v\n" \
       "        count += 1\n    return acc / count\n"


def replay(text: str, frames: list[dict]) -> str:
    """The document after the page's `edit` frames, each applied to the text before it (code points)."""
    for f in frames:
        assert text[f["start"]: f["end"]] == f["old_text"], (f, text)
        text = text[: f["start"]] + f["text"] + text[f["end"]:]
        assert f["document"] == text
    return text


def wait_prepared(service, timeout_s: float = 120.0) -> dict:
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{service.url}/healthz?token={TOKEN}", timeout=30).json()["cache"]["next_edit"]
        if state["ready"] >= 1 and state["pending"] == 0 and state["running"] is None:
            return state
        assert state["error"] is None and time.monotonic() < deadline, state
        time.sleep(0.2)


def test_typed_edits_feed_the_history_and_a_prepared_next_edit_is_shown(page, service):
    from dg_edit.edits import TextEdit, apply_edits

    sent = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(json.loads(f))))
    open_page(page, service)
    initial = page.input_value("#editor")
    editor = page.locator("#editor")
    editor.fill("")
    editor.click()
    page.keyboard.type(MEAN)
    # Rename `count` at its first use, as a person would: select it, type the new name.
    page.keyboard.press("Control+Home")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Home")
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    for _ in range(5):
        page.keyboard.press("Shift+ArrowRight")
    page.keyboard.type("total")
    document = page.input_value("#editor")
    assert document == MEAN.replace("count = 0", "total = 0")
    page.wait_for_timeout(300)
    edits = [f for f in sent if f["type"] == "edit"]
    assert replay(initial, edits) == document and edits[-1]["cursor"] == document.index("total") + 5
    wait_prepared(service)  # the service prepared the suggestion while the page was quiet
    page.keyboard.press("Control+Enter")
    page.wait_for_selector('#status[data-kind="done"]', timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-next-edit.png"))
    done = next(f for f in page.frames_received if f["type"] == "done" and f["id"].startswith("n"))
    assert done["prepared"] is True, done  # answered from the background preparation, at once
    suggested = [TextEdit.from_json(e) for e in done["edits"]]
    if not suggested:
        assert "no edit suggested" in page.text_content("#status") and page.is_hidden("#preview")
    else:
        assert page.text_content("#preview") == apply_edits(document, [
            TextEdit(e.start, e.end, document[e.start: e.end] + e.text) for e in suggested])
        page.keyboard.press("Tab")
        assert page.input_value("#editor") == apply_edits(document, suggested)
    assert page.problems == []


def test_a_next_edit_is_drawn_and_applied_at_the_right_characters(page, service):
    # The service's answer is replaced by a known one, so that drawing and accepting are checked exactly,
    # with a character outside the BMP before the edit (one code point, two UTF-16 units).
    document = "s = '\U0001F600'\nx = total\ny = count\n"
    at = document.index("count")  # a code point offset, as the protocol counts
    edit = {"start": at, "end": at + 5, "text": "total", "old_text": "count", "score": 0.9}
    sent = []

    def route(ws):
        server = ws.connect_to_server()

        def to_server(message):
            frame = json.loads(message)
            sent.append(frame)
            server.send(message)

        def to_page(message):
            frame = json.loads(message)
            if frame["type"] == "done" and frame["id"].startswith("n"):
                frame["edits"], frame["window"] = [edit], [0, len(document)]
                message = json.dumps(frame)
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)

    page.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    open_page(page, service)
    page.locator("#editor").fill(document)
    page.locator("#editor").focus()
    page.keyboard.press("Control+End")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector('#status[data-kind="done"]', timeout=120_000)
    assert page.text_content("#preview .ne-old") == "count" and page.text_content("#preview .ne-new") == "total"
    assert page.text_content("#preview") == document.replace("count", "counttotal")
    request = next(f for f in sent if f["type"] == "next_edit")
    assert request["text"] == document and request["cursor"] == len(document)
    page.keyboard.press("Tab")
    accepted = document.replace("count", "total")
    assert page.input_value("#editor") == accepted
    caret = page.evaluate("() => document.getElementById('editor').selectionStart")
    assert caret == utf16_len(accepted[: at + 5])
    page.wait_for_timeout(200)
    last = [f for f in sent if f["type"] == "edit"][-1]
    assert (last["start"], last["end"], last["text"], last["old_text"]) == (at, at + 5, "total", "count")
    assert page.problems == []
