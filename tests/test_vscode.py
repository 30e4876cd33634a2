"""End to end: the VS Code extension (editors/vscode) in real VS Code (code-server) driven through
headless Chromium, against the real `dg-edit lsp` and the test model.

code-server gets its own XDG/user/extension directories and is stopped with its whole process
group (its file watcher outlives the main process). The language server is started by the
extension through a tee (tests/editor_tools.py) that records what the server sent, so the test
can check that the ghost text and the accepted text are the server's, not the model's quality.
Screenshots land in artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from editor_tools import REPO, editor_tools, lsp_command, read_tee_log, server_env

ARTIFACTS = REPO / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SOURCE = 'import math\n\n\ndef area(radius):\n    """Area of a circle."""\n    return \n\n\nprint(area(2.0))\n'
REWRITE_SOURCE = "import os\nvalues = [x * 2 for x in range(10)]\nprint(values)\n"
RENAME_SOURCE = "def total_price(items):\n    count = 0\n    for item in items:\n        count += item.price\n    return count\n"
LINE, PREFIX_END = 6, "    return "  # the cursor goes to the end of line 6
GHOST = ".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"code-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"code-server did not answer {url} within {timeout}s")


@pytest.fixture(scope="module")
def code_server(tmp_path_factory, model_dir):
    """A running code-server with the .vsix installed, its settings pointing at the test model."""
    tools = editor_tools()
    root = tmp_path_factory.mktemp("code-server")
    dirs = {name: root / name for name in ("config", "data", "user", "extensions", "workspace")}
    for d in dirs.values():
        d.mkdir()
    tee_log = root / "lsp-messages.jsonl"
    server_cmd = lsp_command(model_dir)
    settings = {
        # Start the server through the tee; VS Code runs `<command> <args…> lsp <serverArgs…>`.
        "dgEdit.command": sys.executable,
        "dgEdit.args": [str(REPO / "tests" / "editor_tools.py"), str(tee_log), "--", *server_cmd[:-3]],
        "dgEdit.serverArgs": server_cmd[-2:],
        "editor.inlineSuggest.enabled": True,
        "editor.quickSuggestions": {"other": False, "comments": False, "strings": False},
        "editor.suggestOnTriggerCharacters": False,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "extensions.autoUpdate": False,
        "extensions.ignoreRecommendations": True,
        "telemetry.telemetryLevel": "off",
        "files.autoSave": "off",
        "security.workspace.trust.enabled": False,
        "chat.disableAIFeatures": True,
        "dgEdit.trace.server": "messages",  # the LSP traffic lands in the extension host log
    }
    assert server_cmd[-3] == "lsp"
    (dirs["user"] / "User").mkdir()
    settings_file = dirs["user"] / "User" / "settings.json"
    settings_file.write_text(json.dumps(settings, indent=2))
    source = dirs["workspace"] / "example.py"
    source.write_text(SOURCE)
    (dirs["workspace"] / "rewrite_me.py").write_text(REWRITE_SOURCE)
    (dirs["workspace"] / "rename_me.py").write_text(RENAME_SOURCE)

    env = server_env()
    env.update(XDG_CONFIG_HOME=str(dirs["config"]), XDG_DATA_HOME=str(dirs["data"]),
               PATH=f"{Path(tools['node']).parent}{os.pathsep}{env['PATH']}")
    common = ["--user-data-dir", str(dirs["user"]), "--extensions-dir", str(dirs["extensions"])]
    installed = subprocess.run([tools["code_server"], *common, "--install-extension", tools["vsix"]],
                               env=env, capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0 and "successfully installed" in installed.stdout, installed.stdout + installed.stderr

    port = _free_port()
    log = open(root / "code-server.log", "w")
    proc = subprocess.Popen(
        [tools["code_server"], *common, "--auth", "none", "--bind-addr", f"127.0.0.1:{port}",
         "--disable-telemetry", "--disable-update-check", "--disable-workspace-trust", str(dirs["workspace"])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=60)
        yield {"url": f"http://127.0.0.1:{port}/?folder={dirs['workspace']}", "source": source,
               "workspace": dirs["workspace"], "settings_file": settings_file, "settings": settings,
               "tee_log": tee_log, "log": root / "code-server.log", "root": root}
    finally:
        # The whole group: code-server, its extension host, the language server, the file watcher.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="module")
def page(code_server):
    """One browser tab on the workbench for the module's tests (loading VS Code takes a while)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(code_server["url"])
        page.locator(".monaco-workbench").wait_for(state="visible", timeout=90_000)
        try:
            yield page
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "vscode-last.png"))
            browser.close()


def run_command(page, title: str) -> None:
    """Run a command from the palette, as a user does (F1, type, Enter)."""
    page.keyboard.press("F1")
    box = page.locator(".quick-input-widget input")
    box.wait_for(state="visible")
    box.fill(">" + title)
    page.locator(".quick-input-list .monaco-list-row", has_text=title).first.wait_for(state="visible")
    page.keyboard.press("Enter")


def open_file_at(page, name: str, line: int) -> None:
    """Quick-open `name`, then go to the end of `line`."""
    page.keyboard.press("Control+P")
    box = page.locator(".quick-input-widget input")
    box.wait_for(state="visible")
    box.fill(name)
    page.locator(".quick-input-list .monaco-list-row", has_text=name).first.wait_for(state="visible")
    page.keyboard.press("Enter")
    page.locator(f".monaco-editor[data-uri$='{name}'] .view-lines").wait_for(state="visible")
    page.keyboard.press("Control+G")
    box.wait_for(state="visible")
    box.fill(f":{line}")
    page.keyboard.press("Enter")
    page.keyboard.press("End")


def inline_items(tee_log: Path) -> list[str]:
    """insertText of every inline-completion item the server sent."""
    texts = []
    for msg in read_tee_log(tee_log):
        result = msg.get("result")
        if isinstance(result, dict) and isinstance(result.get("items"), list):
            for item in result["items"]:
                text = item.get("insertText")
                texts.append(text["value"] if isinstance(text, dict) else text)
    return texts


def wait_for_ghost_text(page, tee_log: Path, timeout: float) -> None:
    """Wait for ghost text; fail at once, with the reason, if the server answered the explicit
    trigger with no item (the model's infill was empty)."""
    ghost = page.locator(GHOST).first
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ghost.is_visible():
            return
        invoked = {m["id"] for m in read_tee_log(tee_log, "client")
                   if m.get("method") == "textDocument/inlineCompletion" and m["params"]["context"]["triggerKind"] == 1}
        answers = [m.get("result") for m in read_tee_log(tee_log) if m.get("id") in invoked]
        if answers and all(a is not None and not a.get("items") for a in answers):
            time.sleep(2)  # let a just-arrived answer render
            if ghost.is_visible():
                return
            pytest.fail(f"the server answered the trigger with no suggestion (empty infill): {answers}")
        time.sleep(0.3)
    pytest.fail(f"no ghost text within {timeout}s")


def _visible(text: str) -> str:
    """What survives rendering in any editor: letters and digits."""
    return re.sub(r"[^0-9A-Za-z]", "", text)


@pytest.mark.timeout(420)
def test_inline_suggestion_from_the_server_is_shown_and_tab_accepts_it(code_server, page):
    open_file_at(page, "example.py", LINE)
    # The extension started the server and the client is running (sparkle icon; a spinner while
    # starting): only then is the inline-completion provider registered.
    dg_status = page.locator(".statusbar-item", has_text="dg-edit")
    dg_status.locator(".codicon-sparkle").wait_for(state="visible", timeout=90_000)

    run_command(page, "Trigger Inline Suggestion")
    wait_for_ghost_text(page, code_server["tee_log"], timeout=180)
    # The extension followed the refinement (dgEdit/canvas) to its end: the status item shows a check.
    dg_status.locator(".codicon-check").wait_for(state="visible", timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "vscode-ghost-text.png"))
    shown = page.locator(GHOST).all_inner_texts()
    items = inline_items(code_server["tee_log"])
    assert items, "the server sent no inline completion items"
    # The ghost text on screen is one of the server's items (compared on letters and digits,
    # which every renderer keeps; the exact text is checked on disk below).
    assert any(_visible("".join(shown)) == _visible(t) for t in items), (shown, items)
    # Ghost text is not in the document: the file on disk is unchanged so far.
    assert code_server["source"].read_text() == SOURCE

    page.keyboard.press("Tab")
    page.keyboard.press("Control+S")
    prefix, suffix = SOURCE.split(PREFIX_END, 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and code_server["source"].read_text() == SOURCE:
        time.sleep(0.2)
    saved = code_server["source"].read_text()
    page.screenshot(path=str(ARTIFACTS / "vscode-accepted.png"))
    # Exactly one of the server's items was inserted at the cursor; the rest of the file is intact.
    assert any(saved == prefix + PREFIX_END + text + suffix for text in items), (saved, items)


def command_results(tee_log: Path, command: str) -> list[dict]:
    """Results the server returned for workspace/executeCommand `command`."""
    ids = {m["id"] for m in read_tee_log(tee_log, "client")
           if m.get("method") == "workspace/executeCommand" and m["params"]["command"] == command}
    return [m["result"] for m in read_tee_log(tee_log) if m.get("id") in ids and "result" in m]


@pytest.mark.timeout(300)
def test_rewrite_selection_command_replaces_the_selection(code_server, page):
    target = code_server["workspace"] / "rewrite_me.py"
    open_file_at(page, "rewrite_me.py", 2)
    page.keyboard.press("Home")
    page.keyboard.press("Shift+End")
    run_command(page, "dg-edit: Rewrite Selection")
    # The extension asks for an optional instruction.
    box = page.locator(".quick-input-widget input")
    box.wait_for(state="visible")
    box.fill("use a loop")
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not command_results(code_server["tee_log"], "dg-edit.rewrite"):
        time.sleep(0.3)
    results = command_results(code_server["tee_log"], "dg-edit.rewrite")
    assert results, "the server answered no dg-edit.rewrite"
    result = results[-1]
    assert result["applied"] is True, result
    # The instruction travelled with the command.
    sent = [m for m in read_tee_log(code_server["tee_log"], "client") if m.get("method") == "workspace/executeCommand"
            and m["params"]["command"] == "dg-edit.rewrite"][-1]
    assert sent["params"]["arguments"][0]["instruction"] == "use a loop"
    page.keyboard.press("Control+S")
    expected = "import os\n" + result["text"] + "\nprint(values)\n"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and target.read_text() != expected:
        time.sleep(0.2)
    page.screenshot(path=str(ARTIFACTS / "vscode-rewrite.png"))
    # Exactly the selected line was replaced by the server's text; its neighbours are untouched.
    assert target.read_text() == expected


def next_edit_answers(tee_log: Path, uri_suffix: str) -> list[tuple[int, dict]]:
    """(version asked for, result) of every textDocument/copilotInlineEdit the server answered."""
    asked = {m["id"]: m["params"]["textDocument"]["version"] for m in read_tee_log(tee_log, "client")
             if m.get("method") == "textDocument/copilotInlineEdit"
             and m["params"]["textDocument"]["uri"].endswith(uri_suffix)}
    return [(asked[m["id"]], m["result"]) for m in read_tee_log(tee_log) if m.get("id") in asked and "result" in m]


def inline_answered(tee_log: Path, uri_suffix: str, version: int) -> bool:
    """Whether every inline completion asked for `version` of the document has been answered."""
    versions, current = {}, None
    for m in read_tee_log(tee_log, "client"):
        if m.get("method") in ("textDocument/didOpen", "textDocument/didChange") \
                and m["params"]["textDocument"]["uri"].endswith(uri_suffix):
            current = m["params"]["textDocument"]["version"]
        elif m.get("method") == "textDocument/inlineCompletion" and m["params"]["textDocument"]["uri"].endswith(uri_suffix):
            versions[m["id"]] = current
    asked = {i for i, v in versions.items() if v == version}
    answered = {m.get("id") for m in read_tee_log(tee_log) if "result" in m or "error" in m}
    return asked <= answered


def last_version(tee_log: Path, uri_suffix: str) -> int | None:
    versions = [m["params"]["textDocument"]["version"] for m in read_tee_log(tee_log, "client")
                if m.get("method") in ("textDocument/didOpen", "textDocument/didChange")
                and m["params"]["textDocument"]["uri"].endswith(uri_suffix)]
    return versions[-1] if versions else None


def _apply_utf16(text: str, edit: dict) -> str:
    lines = text.split("\n")

    def offset(p: dict) -> int:
        line = lines[p["line"]].encode("utf-16-le")[: 2 * p["character"]].decode("utf-16-le")
        return sum(len(x) + 1 for x in lines[: p["line"]]) + len(line)

    return text[: offset(edit["range"]["start"])] + edit["text"] + text[offset(edit["range"]["end"]):]


@pytest.mark.timeout(420)
def test_next_edit_is_decorated_after_a_rename_and_tab_applies_it(code_server, page):
    """Rename a variable; once the editor is quiet the server's next edit is drawn (old text struck
    through, new text after it) without touching the file; Tab applies exactly that edit."""
    target = code_server["workspace"] / "rename_me.py"
    # Ghost text would own Tab (inline suggestions come first): off for this test.
    settings_file = code_server["settings_file"]
    settings = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**settings, "editor.inlineSuggest.enabled": False}, indent=2))
    try:
        time.sleep(1.5)  # VS Code picks up the settings file change
        open_file_at(page, "rename_me.py", 2)
        # The client is running (sparkle), so the edit below reaches the server as didChange.
        page.locator(".statusbar-item", has_text="dg-edit").locator(".codicon-sparkle, .codicon-check").first.wait_for(
            state="visible", timeout=90_000)
        page.keyboard.press("Home")  # the first non-blank character: "count"
        page.keyboard.press("Control+Shift+ArrowRight")
        page.keyboard.type("total")
        renamed = RENAME_SOURCE.replace("    count = 0", "    total = 0", 1)
        deadline = time.monotonic() + 180
        shown = None
        while time.monotonic() < deadline and shown is None:
            version = last_version(code_server["tee_log"], "rename_me.py")
            answers = [r for v, r in next_edit_answers(code_server["tee_log"], "rename_me.py") if v == version]
            if answers and answers[-1]["edits"]:
                shown = answers[-1]["edits"][0]
            elif answers and not answers[-1]["edits"]:
                pytest.fail(f"the server answered with no edit: {answers[-1]}")
            time.sleep(0.3)
        assert shown is not None, "no copilotInlineEdit answer for the renamed text"
        assert shown["textDocument"]["version"] == last_version(code_server["tee_log"], "rename_me.py")
        # On screen: the new text right after the replaced range, on the range's last line ...
        end = shown["range"]["end"]
        line = renamed.split("\n")[end["line"]]
        cut = len(line.encode("utf-16-le")[: 2 * end["character"]].decode("utf-16-le"))
        expected = _visible(line[:cut] + shown["text"].replace("\n", " ") + line[cut:])
        rows = page.locator(".monaco-editor[data-uri$='rename_me.py'] .view-line")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and expected not in [_visible(t) for t in rows.all_inner_texts()]:
            time.sleep(0.2)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "vscode-next-edit.png"))
        assert expected in [_visible(t) for t in rows.all_inner_texts()], (shown, rows.all_inner_texts())
        # ... and the replaced text struck through.
        start = shown["range"]["start"]
        if start != end and start["line"] == end["line"]:
            struck = page.evaluate("""() => [...document.querySelectorAll(".monaco-editor .view-line span span")]
                .filter(s => getComputedStyle(s).textDecorationLine.includes("line-through"))
                .map(s => s.textContent).join("")""")
            old = line[len(line.encode("utf-16-le")[: 2 * start["character"]].decode("utf-16-le")):cut]
            assert _visible(struck) == _visible(old), (struck, old)
        page.keyboard.press("Control+S")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and target.read_text() != renamed:
            time.sleep(0.2)
        assert target.read_text() == renamed  # the suggestion is not in the file
        # An inline suggestion on screen takes Tab first (it comes first in VS Code): let the one asked
        # for the renamed text arrive, and hide it with Escape (which then leaves the next edit alone).
        version = last_version(code_server["tee_log"], "rename_me.py")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not inline_answered(code_server["tee_log"], "rename_me.py", version):
            time.sleep(0.2)
        time.sleep(0.5)
        if page.locator(GHOST).first.is_visible():
            page.keyboard.press("Escape")
            page.locator(GHOST).first.wait_for(state="hidden", timeout=10_000)
        assert expected in [_visible(t) for t in rows.all_inner_texts()], "the next edit went away"
        page.keyboard.press("Tab")
        page.keyboard.press("Control+S")
        applied = _apply_utf16(renamed, shown)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and target.read_text() != applied:
            time.sleep(0.2)
        page.screenshot(path=str(ARTIFACTS / "vscode-next-edit-applied.png"))
        assert target.read_text() == applied
        # Accepting ran the edit's command: the server received dg-edit.accepted with its arguments.
        accepted = [m for m in read_tee_log(code_server["tee_log"], "client")
                    if m.get("method") == "workspace/executeCommand" and m["params"]["command"] == "dg-edit.accepted"]
        assert accepted and accepted[-1]["params"]["arguments"][0]["kind"] == "next_edit"
    finally:
        settings_file.write_text(json.dumps(settings, indent=2))
