"""Security checks that test_service.py does not already make (it covers 401 by header and query, 403
for a foreign Origin, 1009, the CSP header's presence and refusing 0.0.0.0/example.com without a token).

Here: the token comparison goes through `hmac.compare_digest` for every offer; more unsafe binds are
refused and a token-guarded non-loopback bind does demand its token; Origin look-alikes (another
local port, suffix tricks, `null`) get 403; in headless Chromium the demo page renders model output
that is markup (`<script>`, `<img onerror>`) as text and its CSP blocks inline script; and the
language server and the CLI never open, list or write a path in the user's folder other than the
one the user named (checked with a Python audit hook in the real processes).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import uuid
from http import HTTPStatus
from pathlib import Path

import pytest
from starlette.requests import HTTPConnection
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from dg_edit.serve import gate as http_gate
from dg_edit.serve_process import ServeProcess, dg_edit_command

pytestmark = pytest.mark.timeout(300)
TOKEN = "correct-horse-battery"


# ---------------------------------------------------------------------------------------------- token
def _request(path: str, **headers) -> HTTPConnection:
    path, _, query = path.partition("?")
    raw = [(k.lower().encode(), v.encode()) for k, v in {"Host": "127.0.0.1:8765", **headers}.items()]
    return HTTPConnection({"type": "http", "path": path, "query_string": query.encode(), "headers": raw})


def test_every_token_offer_is_compared_with_compare_digest(monkeypatch):
    calls = []
    real = http_gate.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http_gate.hmac, "compare_digest", spy)
    gate = http_gate.Gate(host="127.0.0.1", token=TOKEN, public_paths=frozenset({"/"}))
    for path, headers in [("/healthz", {}), ("/healthz?token=guess", {}),
                          ("/ws?token=a&token=b", {"Authorization": "Bearer c"})]:
        calls.clear()
        response = gate.check(_request(path, **headers))
        assert response.status_code == HTTPStatus.UNAUTHORIZED, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        offered = re.findall(r"token=(\w+)", path) + [v.split()[1] for v in headers.values()]
        assert sorted(b for _, b in calls) == sorted(o.encode() for o in offered)  # each offer, no shortcut
        assert all(a == TOKEN.encode() for a, _ in calls)
    calls.clear()
    assert gate.check(_request("/healthz", Authorization=f"Bearer {TOKEN}")) is None  # let through
    assert calls == [(TOKEN.encode(), TOKEN.encode())]


def test_token_check_does_not_use_plain_equality():
    """Belt and braces for the above: no `==`/`in` comparison of the token anywhere in the gate."""
    source = Path(http_gate.__file__).read_text(encoding="utf-8")
    body = source[source.index("def _token_ok"):source.index("def _host_ok")]
    assert "compare_digest" in body
    assert not re.search(r"(==|!=|\bin\b)\s*(expected|self\.token)|(expected|self\.token)\s*(==|!=)", body), body


# ---------------------------------------------------------------------------------------------- binding
@pytest.mark.parametrize("host", ["::", "", "192.0.2.1", "localhost.example.com", "127.0.0.1.nip.io"])
def test_non_loopback_binds_without_a_token_are_refused(host, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DG_EDIT_TOKEN", None)
    run = subprocess.run([*dg_edit_command(), "serve", "--host", host, "--port", "0", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2, run.stderr
    assert "without a token" in run.stderr and "Traceback" not in run.stderr


def _lan_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_a_token_guarded_bind_on_every_interface_demands_the_token(model_dir):
    with ServeProcess(["--model", str(model_dir), "--host", "0.0.0.0"], env={"DG_EDIT_TOKEN": TOKEN}) as proc:
        host = _lan_address() or "127.0.0.1"
        url = f"ws://{host}:{proc.port}/ws"
        with pytest.raises(InvalidStatus) as info:
            async with connect(url):
                pass
        assert info.value.response.status_code == 401
        async with connect(url + f"?token={TOKEN}") as ws:
            await ws.send(json.dumps({"type": "cancel", "id": "x"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["code"] == "unknown_id"


# ---------------------------------------------------------------------------------------------- origin
@pytest.fixture(scope="module")
def plain_service(model_dir):
    with ServeProcess(["--model", str(model_dir)]) as proc:
        yield proc


async def test_origin_look_alikes_are_refused(plain_service):
    port = plain_service.port
    for origin in (f"http://127.0.0.1:{port + 1}", f"http://localhost:{port + 1}",  # another local web app
                   f"http://127.0.0.1:{port}.evil.example", f"http://evil.example/127.0.0.1:{port}",
                   f"file://", "null", f"chrome-extension://abcdef", f"http://127.0.0.1"):
        with pytest.raises(InvalidStatus) as info:
            async with connect(plain_service.ws_url, origin=origin):
                pass
        assert info.value.response.status_code == 403, origin
    async with connect(plain_service.ws_url, origin=f"http://127.0.0.1:{port}") as ws:  # the page itself
        await ws.send(json.dumps({"type": "cancel", "id": "x"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["code"] == "unknown_id"


# ---------------------------------------------------------------------------------------------- the page in Chromium
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAYLOADS = ['<script>window.__pwned = "script"</script>', '<img src=x onerror="window.__pwned=\'img\'">',
            '"><svg onload="window.__pwned=\'svg\'">', "</span><b id=injected>bold</b>"]
HOSTILE = "".join(PAYLOADS)


def test_the_page_shows_model_markup_as_text_and_its_csp_blocks_inline_script(plain_service):
    """A model (here: a websocket double in front of the real service) whose drafts and final text are
    markup: the page must show it literally, run nothing, and create no elements from it."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")

    def hostile(message: str) -> str:
        frame = json.loads(message)
        if frame["type"] in ("step", "done"):
            frame["text"] = HOSTILE
            if frame["type"] == "step":
                frame["tokens"] = [{"text": p, "accepted": True, "confidence": 0.9} for p in PAYLOADS]
        return json.dumps(frame)

    def route(ws):
        server = ws.connect_to_server()
        ws.on_message(server.send)
        server.on_message(lambda m: ws.send(hostile(m)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            dialogs, violations = [], []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.route_web_socket(re.compile(r"/ws(\?|$)"), route)
            response = page.goto(plain_service.url + "/")
            assert "script-src 'self'" in response.headers["content-security-policy"]
            page.wait_for_selector('#connection[data-state="open"]', timeout=60_000)
            page.evaluate("""() => document.addEventListener('securitypolicyviolation',
                                 e => (window.__violations ||= []).push(e.violatedDirective))""")
            page.locator("#editor").fill("def f():\n    return ")
            page.locator("#editor").focus()
            page.keyboard.press("End")
            page.keyboard.press("Control+Space")
            page.wait_for_selector('#status[data-kind="done"]', timeout=120_000)
            assert page.text_content("#ghost") == HOSTILE  # shown as text, character for character
            assert page.evaluate("() => window.__pwned") is None
            assert page.query_selector("#injected") is None and page.query_selector("#preview img, #preview svg, "
                                                                                  "#preview script") is None
            page.keyboard.press("Tab")  # accepted into the textarea: still just text
            assert page.input_value("#editor").endswith(HOSTILE)
            assert page.evaluate("() => window.__pwned") is None
            # The CSP itself: inline script injected into the DOM does not run.
            page.evaluate("""() => { const s = document.createElement('script');
                                     s.textContent = 'window.__pwned = "inline"'; document.body.append(s); }""")
            page.wait_for_timeout(200)
            assert page.evaluate("() => window.__pwned") is None
            assert "script-src-elem" in (page.evaluate("() => window.__violations") or []) or \
                   "script-src" in (page.evaluate("() => window.__violations") or [])
            assert dialogs == []
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------- file access
AUDIT = textwrap.dedent("""
    import os, runpy, sys
    watched = os.path.realpath(sys.argv[1]); log = open(sys.argv[2], "a", buffering=1)
    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.mkdir", "shutil.rmtree"):
            path = args[0] if args else None
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.fsdecode(path)
                if os.path.realpath(path).startswith(watched):
                    mode = args[1] if event == "open" and len(args) > 1 else ""
                    log.write(f"{event} {mode} {path}\\n")
    sys.addaudithook(hook)
    command = sys.argv[3:]
    if command[0] == "lsp":
        sys.argv = ["dg-edit-lsp", *command[1:]]
        runpy.run_module("dg_edit.lsp.server", run_name="__main__")
    else:
        from dg_edit.cli import main
        sys.exit(main(command))
""")


@pytest.fixture
def workspace(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "named.py").write_text("def add(a, b):\n    return \n")
    (folder / "secret.env").write_text("API_KEY=do-not-read\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "other.py").write_text("x = 1\n")
    return folder


def _audited(workspace: Path, log: Path, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", AUDIT, str(workspace), str(log), *argv], env=env, timeout=240,
                          capture_output=True, **kwargs)


def test_cli_opens_only_the_file_it_was_given(workspace, tmp_path, model_dir):
    log = tmp_path / "audit.log"
    named = workspace / "named.py"
    run = _audited(workspace, log, "infill", str(named), "--at", "2:12", "--max-new-tokens", "4",
                   "--model", str(model_dir), text=True)
    assert run.returncode == 0, run.stderr
    events = log.read_text().splitlines()
    assert events and all(e.split()[-1] == str(named) for e in events), events
    assert all(e.startswith("open r") for e in events), events  # read, never written
    # JSON lines whose text looks like paths are text, not paths.
    log.write_text("")
    lines = "".join(json.dumps({"prefix": p, "max_new_tokens": 2}) + "\n"
                    for p in (str(workspace / "secret.env"), "../../secret.env", f"file://{workspace}/sub/other.py"))
    run = _audited(workspace, log, "infill", "--json", "--model", str(model_dir), input=lines, text=True)
    assert run.returncode == 0, run.stderr
    assert log.read_text() == "", log.read_text()


def test_language_server_never_touches_the_users_files(workspace, tmp_path, model_dir):
    """Documents come from the editor (didOpen/didChange); the server opens nothing in the project,
    not even the file a URI names, and edits only through workspace/applyEdit."""
    log = tmp_path / "audit.log"
    named = workspace / "named.py"
    uri = named.as_uri()
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "processId": None, "rootUri": workspace.as_uri(), "capabilities": {"workspace": {"applyEdit": True}},
            "workspaceFolders": [{"uri": workspace.as_uri(), "name": "project"}],
            "initializationOptions": {"max_new_tokens": 4}}},
        {"jsonrpc": "2.0", "method": "initialized", "params": {}},
        {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": "def add(a, b):\n    return \n"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}}},
        # A document the editor never opened, on disk in the project: an error, not a read.
        {"jsonrpc": "2.0", "id": 3, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": (workspace / "secret.env").as_uri()}, "position": {"line": 0, "character": 3},
            "context": {"triggerKind": 1}}},
        {"jsonrpc": "2.0", "id": 4, "method": "workspace/executeCommand", "params": {
            "command": "dg-edit.infill", "arguments": [{"uri": (workspace / "sub" / "other.py").as_uri(),
                                                         "position": {"line": 0, "character": 0}}]}},
        {"jsonrpc": "2.0", "method": "textDocument/didClose", "params": {"textDocument": {"uri": uri}}},
        {"jsonrpc": "2.0", "id": 5, "method": "shutdown", "params": None},
        {"jsonrpc": "2.0", "method": "exit", "params": None},
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", AUDIT, str(workspace), str(log), "lsp", "--model",
                             str(model_dir), "--log-file", str(tmp_path / "lsp.log")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def send(message: dict) -> None:
        body = json.dumps(message).encode()
        proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        proc.stdin.flush()

    def receive() -> dict:
        length = None
        while True:
            line = proc.stdout.readline()
            assert line, "the language server closed its output"
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
            elif line in (b"\r\n", b"\n") and length is not None:
                return json.loads(proc.stdout.read(length))

    replies: dict = {}
    try:
        for m in messages[:-3]:
            send(m)
        while not {2, 3, 4} <= set(replies):
            m = receive()
            if "method" in m and "id" in m:  # a request from the server (progress, configuration): answer it
                send({"jsonrpc": "2.0", "id": m["id"], "result": None})
            elif "id" in m and "method" not in m:
                replies[m["id"]] = m
        for m in messages[-3:]:  # didClose, shutdown, exit
            send(m)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = json.dumps(replies)[-2000:]
    assert "result" in replies.get(2, {}), out[-2000:]
    assert replies[3]["error"]["code"] == -32602 and "not open" in replies[3]["error"]["message"]
    assert replies[4]["error"]["code"] == -32602
    assert log.read_text() == "", log.read_text()
    assert named.read_text() == "def add(a, b):\n    return \n"
