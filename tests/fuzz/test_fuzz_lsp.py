"""Hypothesis against one long-lived `dg-edit lsp` (the real process over stdio, pygls's client, the
test model with a short budget so each example costs milliseconds).

- Documents with any Unicode (astral characters that are surrogate pairs in UTF-16, combining marks,
  CJK, CR/LF/CRLF line breaks, form feeds and Unicode line separators, which are NOT line breaks in
  LSP) are opened and edited with random incremental `didChange`s. The server's copy is read back
  through `dg-edit.rewrite` with strength 0 (which returns the selected text unchanged, no model)
  and must equal the client's copy: positions and edits landed where an LSP client means them.
- Inline completions at random positions, valid or not (past the line, past the document, inside
  a surrogate pair): a list of items at the cursor, or InvalidParams (-32602); never a crash.
- Random JSON as the params of every method the server offers: a result or a JSON-RPC error that
  is not InternalError (-32603); the next valid request is answered.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from concurrent.futures import Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient

from fuzz_support import HYPOTHESIS, examples

pytestmark = pytest.mark.timeout(600)

OPTIONS = {"max_new_tokens": 4, "max_denoising_steps": 2, "candidates": 2}
ROUTINE_ERRORS = (-32602, -32601, -32600, -32800, -32801)


class Client:
    """pygls's LanguageClient on an event loop of its own thread, so hypothesis tests stay synchronous."""

    def __init__(self, model_dir, log_file):
        self.log_file = log_file
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lsp-fuzz-client", daemon=True)
        self.thread.start()
        self.client = LanguageClient("dg-edit-fuzz", "0")
        self.client.feature(t.WORKSPACE_APPLY_EDIT)(lambda ls, p: t.ApplyWorkspaceEditResult(applied=False))
        self.client.feature(t.WINDOW_WORK_DONE_PROGRESS_CREATE)(lambda ls, p: None)
        self.logs: list[str] = []
        self.client.feature(t.WINDOW_LOG_MESSAGE)(lambda ls, p: self.logs.append(p.message))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # The log goes to a file: pygls's client pipes the server's stderr and never reads it, so a
        # chatty server would block on a full pipe after ~64 KiB of log.
        self.run(self.client.start_io(sys.executable, "-m", "dg_edit.lsp.server", "--model", str(model_dir),
                                      "--log-file", str(log_file), env=env))
        caps = t.ClientCapabilities(workspace=t.WorkspaceClientCapabilities(apply_edit=True))
        self.run(self.client.initialize_async(t.InitializeParams(capabilities=caps, initialization_options=OPTIONS)))
        self.notify(t.INITIALIZED, t.InitializedParams())
        self.versions: dict[str, int] = {}

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, method: str, params, timeout: float = 60):
        """A request with any JSON as params; returns the result or raises JsonRpcException."""
        async def send():
            msg_id = f"fuzz-{uuid.uuid4().hex}"
            future: Future = Future()
            self.client.protocol._request_futures[msg_id] = future
            self.client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
            return await asyncio.wrap_future(future)
        return self.run(send(), timeout)

    def notify(self, method: str, params) -> None:
        self.loop.call_soon_threadsafe(self.client.protocol.notify, method, params)

    def open(self, text: str) -> str:
        uri = f"file:///tmp/dg-edit-fuzz/{uuid.uuid4().hex}.py"
        self.versions[uri] = 1
        self.notify(t.TEXT_DOCUMENT_DID_OPEN, t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        return uri

    def change(self, uri: str, rng: t.Range, text: str) -> None:
        self.versions[uri] += 1
        self.notify(t.TEXT_DOCUMENT_DID_CHANGE, t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[t.TextDocumentContentChangePartial(range=rng, text=text)]))

    def close(self, uri: str) -> None:
        self.notify(t.TEXT_DOCUMENT_DID_CLOSE, t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=uri)))

    def server_text(self, uri: str, end: t.Position) -> str:
        """The server's copy of the document, via a strength-0 rewrite of all of it (no model runs)."""
        argument = {"uri": uri, "range": {"start": {"line": 0, "character": 0},
                                          "end": {"line": end.line, "character": end.character}},
                    "strength": 0}
        result = self.call("workspace/executeCommand", {"command": "dg-edit.rewrite", "arguments": [argument]})
        return result.text

    def inline(self, uri: str, line: int, character: int):
        return self.call(t.TEXT_DOCUMENT_INLINE_COMPLETION, {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 1}})

    def stop(self) -> None:
        proc = self.client._server
        try:
            self.run(self.client.shutdown_async(None), 10)
            self.notify(t.EXIT, None)
            try:
                self.run(asyncio.wait_for(proc.wait(), 20), 30)
            except TimeoutError:  # not what these tests check; reported in the log, then the process is killed
                print("dg-edit lsp did not exit within 20 s of 'exit'")
        finally:
            if proc.returncode is None:
                proc.kill()
            self.run(self.client.stop(), 15)
            self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def lsp(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz-lsp") / "server.log"
    client = Client(model_dir, log)
    yield client
    alive = client.client._server.returncode is None
    client.stop()
    assert alive, "the language server died during the fuzz tests"


# ---------------------------------------------------------------------------------------------- LSP text model
def split_lines(text: str) -> list[str]:
    """Lines as LSP defines them: only \\n, \\r\\n and \\r end a line (not \\f, \\v, \\u2028, ...)."""
    lines, start, i = [], 0, 0
    while i < len(text):
        if text[i] in "\r\n":
            end = i + (2 if text[i] == "\r" and text[i + 1:i + 2] == "\n" else 1)
            lines.append(text[start:i])
            start = i = end
        else:
            i += 1
    lines.append(text[start:])
    return lines


def utf16_len(s: str) -> int:
    return sum(2 if ord(c) > 0xFFFF else 1 for c in s)


def position_of(text: str, offset: int) -> t.Position:
    """LSP position (UTF-16 code units) of a code-point offset that is not inside a CRLF."""
    before = text[:offset]
    lines = split_lines(before)
    return t.Position(line=len(lines) - 1, character=utf16_len(lines[-1]))


def end_position(text: str) -> t.Position:
    return position_of(text, len(text))


def is_valid_cursor(text: str, line: int, character: int) -> bool:
    lines = split_lines(text)
    if line >= len(lines):
        return False
    units = 0
    for c in lines[line]:
        if units == character:
            return True
        units += 2 if ord(c) > 0xFFFF else 1
    return units == character


# ---------------------------------------------------------------------------------------------- strategies
PIECES = ["a", "x = 1", " ", "\t", "\n", "\r\n", "\r", "😀", "𝔘", "e\u0301", "\u0301", "你好", "é", "\u200d",
          "\u2028", "\u2029", "\x0c", "\x0b", "\x85", "\x00", "\ufeff", "👩\u200d💻", "def f():\n    return "]
doc_text = st.lists(st.sampled_from(PIECES), max_size=25).map("".join) | st.text(max_size=40)
insert_text = st.lists(st.sampled_from(PIECES), max_size=6).map("".join) | st.text(max_size=8)


def boundaries(text: str) -> list[int]:
    """Code-point offsets where an edit may start or end (not between the \\r and \\n of a CRLF)."""
    return [i for i in range(len(text) + 1) if not (0 < i < len(text) and text[i - 1] == "\r" and text[i] == "\n")]


@st.composite
def edit_scripts(draw):
    text = draw(doc_text)
    edits = []
    current = text
    for _ in range(draw(st.integers(0, 6))):
        points = boundaries(current)
        a, b = sorted((draw(st.sampled_from(points)), draw(st.sampled_from(points))))
        new = draw(insert_text)
        # A CRLF must not be created by joining a \r and a \n across the edit's ends: it would change
        # the line count of text the edit did not touch (clients do the same, so this is fair game,
        # but the mirror below would need CRLF-merging rules; keep the script unambiguous).
        result = current[:a] + new + current[b:]
        edits.append((position_of(current, a), position_of(current, b), new))
        current = result
    return text, edits, current


# ---------------------------------------------------------------------------------------------- tests
@settings(max_examples=examples(60), **HYPOTHESIS)
@given(edit_scripts())
def test_incremental_edits_with_any_unicode_land_where_the_client_means(lsp, fuzz_count, script):
    fuzz_count()
    text, edits, expected = script
    uri = lsp.open(text)
    for start, end, new in edits:
        lsp.change(uri, t.Range(start=start, end=end), new)
    if expected.strip():
        assert lsp.server_text(uri, end_position(expected)) == expected, (text, edits)
    lsp.close(uri)


def classify(text: str, line: int, character: int) -> str:
    """How LSP reads a cursor: "valid", "past_line_end" (the spec reads it as the line's end; a server
    may refuse it instead), "mid_surrogate" (inside a UTF-16 surrogate pair) or "outside"."""
    lines = split_lines(text)
    after_final_break = line == len(lines) and character == 0 and text.endswith(("\n", "\r"))
    if after_final_break:
        return "valid"
    if line >= len(lines):
        return "outside"
    if character > utf16_len(lines[line]):
        return "past_line_end"
    return "valid" if is_valid_cursor(text, line, character) else "mid_surrogate"


@settings(max_examples=examples(60), **HYPOTHESIS)
@given(doc_text, st.integers(0, 8), st.integers(0, 30))
def test_inline_completion_at_any_position(lsp, fuzz_count, text, line, character):
    fuzz_count()
    uri = lsp.open(text)
    kind = classify(text, line, character)
    try:
        result = lsp.inline(uri, line, character)
    except JsonRpcException as e:
        assert e.code == -32602, e
        # A valid cursor is refused only when there is nothing to condition on.
        assert kind != "valid" or not text.strip() or "empty" in e.message, (text, line, character, e.message)
    else:
        assert kind != "outside", f"position {line}:{character} outside {text!r} was accepted"
        lines = split_lines(text)
        for item in result.items:
            at = (item.range.start.line, item.range.start.character)
            if kind == "valid":
                assert at == (line, character), (text, line, character, item.range)
            elif kind == "past_line_end":
                assert at == (line, utf16_len(lines[line])), (text, line, character, item.range)
            else:  # inside a surrogate pair: placed on one side of the character, never inside it
                assert at[0] == line and is_valid_cursor(text, *at), (text, line, character, item.range)
            assert isinstance(item.insertText, str)
    lsp.close(uri)


METHODS = [t.TEXT_DOCUMENT_INLINE_COMPLETION, t.TEXT_DOCUMENT_COMPLETION, t.TEXT_DOCUMENT_CODE_ACTION,
           "workspace/executeCommand", "dgEdit/stats", "textDocument/copilotInlineEdit"]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=10))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                           max_leaves=10)


PARAMS_URI = "file:///tmp/dg-edit-fuzz/params.py"


@st.composite
def lsp_params(draw):
    """Params shaped like the real ones with any part replaced by random JSON."""
    uri = PARAMS_URI
    position = {"line": draw(st.one_of(st.integers(-1, 3), json_values)),
                "character": draw(st.one_of(st.integers(-1, 40), json_values))}
    base = {
        "textDocument": draw(st.sampled_from([{"uri": uri}, {"uri": "file:///nope.py"}, {}, {"uri": 5},
                                              {"uri": uri, "version": 1}, {"uri": uri, "version": "1"}])),
        "position": position,
        "range": {"start": position, "end": draw(st.sampled_from([position, {"line": 0, "character": 0}]))},
        "context": draw(st.one_of(st.just({"triggerKind": 1}), st.just({"diagnostics": []}), json_values)),
        "command": draw(st.sampled_from(["dg-edit.rewrite", "dg-edit.infill", "dg-edit.accepted", "nope"])),
        "arguments": draw(st.one_of(st.just([{"uri": uri, "range": {"start": position, "end": position}}]),
                                    st.just([{"uri": uri, "position": position, "strength": 2}]),
                                    st.lists(json_values, max_size=2))),
    }
    keys = draw(st.lists(st.sampled_from(sorted(base)), unique=True, max_size=6))
    params = {k: base[k] for k in keys}
    if draw(st.booleans()):
        params[draw(st.text(max_size=6))] = draw(json_values)
    return draw(st.one_of(st.just(params), json_values))


@settings(max_examples=examples(100), **HYPOTHESIS)
@given(st.sampled_from(METHODS), lsp_params())
def test_random_params_get_an_answer_never_an_internal_error(lsp, fuzz_count, method, params):
    fuzz_count()
    if PARAMS_URI not in lsp.versions:
        lsp.versions[PARAMS_URI] = 1
        lsp.notify(t.TEXT_DOCUMENT_DID_OPEN, t.DidOpenTextDocumentParams(t.TextDocumentItem(
            uri=PARAMS_URI, language_id="python", version=1, text="def f(x):\n    return x\n😀 = 1\n")))
    try:
        lsp.call(method, params)
    except JsonRpcException as e:
        assert e.code in ROUTINE_ERRORS, (method, params, e)


def test_the_server_still_answers_correctly(lsp):
    uri = lsp.open("def add(a, b):\n    return \n")
    result = lsp.inline(uri, 1, 11)
    assert all(item.range.start.line == 1 and item.range.start.character == 11 for item in result.items)
    assert lsp.server_text(uri, t.Position(line=2, character=0)) == "def add(a, b):\n    return \n"
    stats = lsp.call("dgEdit/stats", None)
    assert stats.engine.state == "ready"
    assert not [m for m in lsp.logs if "Traceback" in m or "model failure" in m], lsp.logs
