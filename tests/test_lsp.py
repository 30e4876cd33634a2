"""The language server end to end: the real `python -m dg_edit.lsp.server` process over stdio, driven
by pygls's `LanguageClient`, with the real model (`model_dir`: the embedded model, or
DG_EDIT_TEST_MODEL). Assertions are about the protocol (shapes, ranges, versions, cancellation,
errors), never about the quality of the text, so they hold for the tiny random model too.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient

from dg_edit.testing import plain, stop_language_client

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SERVER = [sys.executable, "-m", "dg_edit.lsp.server"]

PY_DOC = '''import math


def area(radius):
    """Area of a circle."""
    return 

def main():
    print(area(2.0))
'''
PY_CURSOR = t.Position(line=5, character=11)  # after "    return "


class Harness:
    """A LanguageClient plus everything the server sent it (notifications and server→client requests)."""

    def __init__(self, encodings: list[str] | None = None):
        self.client = LanguageClient("dg-edit-tests", "0")
        self.encodings = encodings
        self.canvas: list[dict] = []
        self.progress: list[tuple[object, object]] = []
        self.logs: list[t.LogMessageParams] = []
        self.shown: list[t.ShowMessageParams] = []
        self.edits: list[t.ApplyWorkspaceEditParams] = []
        self.created_tokens: list[object] = []
        self.apply_result = True
        self.pull_settings: dict[str, dict] = {}  # what workspace/configuration answers, per section
        self.versions: dict[str, int] = {}
        c = self.client
        c.feature("dgEdit/canvas")(lambda ls, p: self.canvas.append(plain(p)))
        c.feature(t.PROGRESS)(lambda ls, p: self.progress.append((p.token, p.value)))
        c.feature(t.WINDOW_LOG_MESSAGE)(lambda ls, p: self.logs.append(p))
        c.feature(t.WINDOW_SHOW_MESSAGE)(lambda ls, p: self.shown.append(p))

        @c.feature(t.WORKSPACE_APPLY_EDIT)
        def apply_edit(ls, params: t.ApplyWorkspaceEditParams):
            self.edits.append(params)
            return t.ApplyWorkspaceEditResult(applied=self.apply_result)

        @c.feature(t.WORKSPACE_CONFIGURATION)
        def configuration(ls, params: t.ConfigurationParams):
            return [self.pull_settings.get(item.section) for item in params.items]

        @c.feature(t.WINDOW_WORK_DONE_PROGRESS_CREATE)
        def create(ls, params: t.WorkDoneProgressCreateParams):
            self.created_tokens.append(params.token)
            return None

    async def start(self, *args: str, options: dict | None = None) -> t.InitializeResult:
        await self.client.start_io(*SERVER, *args, env=ENV)
        general = t.GeneralClientCapabilities(position_encodings=self.encodings) if self.encodings else None
        caps = t.ClientCapabilities(
            general=general,
            window=t.WindowClientCapabilities(work_done_progress=True),
            workspace=t.WorkspaceClientCapabilities(
                apply_edit=True, configuration=True, workspace_edit=t.WorkspaceEditClientCapabilities(document_changes=True)),
        )
        result = await self.client.initialize_async(
            t.InitializeParams(capabilities=caps, process_id=os.getpid(), initialization_options=options))
        self.client.initialized(t.InitializedParams())
        return result

    async def stop(self) -> None:
        await stop_language_client(self.client, 60)

    # ------------------------------------------------------------------ documents
    def open(self, text: str, language: str = "python", name: str | None = None) -> str:
        uri = f"file:///tmp/dg-edit-tests/{name or uuid.uuid4().hex}.py"
        self.versions[uri] = 1
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)))
        return uri

    def change(self, uri: str, rng: t.Range, text: str) -> int:
        self.versions[uri] += 1
        self.client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[t.TextDocumentContentChangePartial(range=rng, text=text)]))
        return self.versions[uri]

    def configure(self, settings: dict) -> None:
        self.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings=settings))

    # ------------------------------------------------------------------ requests
    def inline_params(self, uri: str, pos: t.Position, invoked: bool = False, token=None,
                      selected: t.SelectedCompletionInfo | None = None) -> t.InlineCompletionParams:
        kind = t.InlineCompletionTriggerKind.Invoked if invoked else t.InlineCompletionTriggerKind.Automatic
        return t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=kind, selected_completion_info=selected),
            text_document=t.TextDocumentIdentifier(uri=uri), position=pos, work_done_token=token)

    async def inline(self, uri: str, pos: t.Position, **kw) -> t.InlineCompletionList:
        return await asyncio.wait_for(
            self.client.text_document_inline_completion_async(self.inline_params(uri, pos, **kw)), 120)

    def send_inline(self, uri: str, pos: t.Position, msg_id: str, **kw) -> asyncio.Future:
        return self.client.protocol.send_request_async(
            t.TEXT_DOCUMENT_INLINE_COMPLETION, self.inline_params(uri, pos, **kw), msg_id=msg_id)

    def cancel(self, msg_id: str) -> None:
        self.client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=msg_id))

    async def raw_request(self, method: str, params) -> Future:
        """Send a request whose params are whatever JSON we like (to test the server's validation)."""
        msg_id = f"raw-{uuid.uuid4().hex}"
        future: Future = Future()
        self.client.protocol._request_futures[msg_id] = future
        self.client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return await asyncio.wait_for(asyncio.wrap_future(future), 60)

    async def stats(self) -> dict:
        return plain(await asyncio.wait_for(self.client.protocol.send_request_async("dgEdit/stats", None), 60))

    async def execute(self, command: str, argument: dict):
        return plain(await asyncio.wait_for(self.client.workspace_execute_command_async(
            t.ExecuteCommandParams(command=command, arguments=[argument])), 120))


def apply_utf16(text: str, rng: t.Range, new_text: str) -> str:
    """Apply an LSP edit to `text` the way a UTF-16 editor does (independent of pygls)."""

    def offset(pos: t.Position) -> int:
        lines = text.split("\n")
        before = sum(len(line) + 1 for line in lines[: pos.line])
        units, index = 0, 0
        line = lines[pos.line]
        while units < pos.character:
            units += 2 if ord(line[index]) > 0xFFFF else 1
            index += 1
        assert units == pos.character, "position splits a surrogate pair"
        return before + index

    return text[: offset(rng.start)] + new_text + text[offset(rng.end):]


def utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


SLOW = {"languages": ["python"], "max_denoising_steps": 48, "candidates": 3}
# Idle prefill has its own server below (`warm_lsp`); on this shared one it would only add background
# work between the tests and make the encoder counts of test_prefix_cache_* depend on timing.
NORMAL = {"languages": ["python"], "idle_prefill_ms": 600_000}


async def started(model_dir, options: dict) -> Harness:
    h = Harness()
    h.init = await h.start("--model", str(model_dir), options=options)
    return h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lsp(model_dir):
    h = await started(model_dir, NORMAL)
    yield h
    await h.stop()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- initialize


async def test_initialize_capabilities(lsp):
    caps = lsp.init.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert caps.position_encoding == t.PositionEncodingKind.Utf16  # the client offered nothing
    sync = caps.text_document_sync
    assert sync.change == t.TextDocumentSyncKind.Incremental and sync.open_close
    assert {"dg-edit.rewrite", "dg-edit.infill", "dg-edit.accepted"} <= set(caps.execute_command_provider.commands)
    assert t.CodeActionKind.RefactorRewrite in caps.code_action_provider.code_action_kinds
    assert lsp.init.server_info.name == "dg-edit"


# ---------------------------------------------------------------------- inline completion


async def test_inline_completion_returns_text_at_the_cursor(lsp):
    uri = lsp.open(PY_DOC)
    result = await lsp.inline(uri, PY_CURSOR)
    assert len(result.items) == 1  # automatic trigger: one item
    item = result.items[0]
    assert item.insert_text.strip()
    assert item.range == t.Range(start=PY_CURSOR, end=PY_CURSOR)
    # The text must not write out the rest of the document again.
    suffix_line = PY_DOC.split("\n")[7]  # "def main():"
    assert not item.insert_text.rstrip().endswith(suffix_line)
    assert PY_DOC.split("return ", 1)[1] not in item.insert_text
    # Accepting runs the item's command, which the server counts.
    assert item.command.command == "dg-edit.accepted"
    before = (await lsp.stats())["accepted"]
    await lsp.execute("dg-edit.accepted", item.command.arguments[0])
    assert (await lsp.stats())["accepted"] == before + 1


async def test_invoked_gives_distinct_candidates(lsp):
    uri = lsp.open(PY_DOC)
    result = await lsp.inline(uri, PY_CURSOR, invoked=True)
    texts = [item.insert_text for item in result.items]
    assert len(texts) <= 3 and len(set(texts)) == len(texts) and all(text.strip() for text in texts)
    assert [item.command.arguments[0]["index"] for item in result.items] == list(range(len(texts)))


async def test_selected_completion_info_is_extended(lsp):
    uri = lsp.open(PY_DOC)
    # The completion widget proposes "math" for the word "ma" typed after "return ".
    doc = PY_DOC.replace("    return \n", "    return ma\n")
    v = lsp.change(uri, t.Range(start=PY_CURSOR, end=PY_CURSOR), "ma")
    assert v == 2
    rng = t.Range(start=PY_CURSOR, end=t.Position(line=5, character=13))
    result = await lsp.inline(uri, rng.end, selected=t.SelectedCompletionInfo(range=rng, text="math"))
    for item in result.items:
        assert item.range == rng and item.insert_text.startswith("math")
        assert apply_utf16(doc, item.range, item.insert_text) == PY_DOC.replace(
            "    return \n", "    return " + item.insert_text + "\n")


async def test_same_place_same_version_is_answered_from_memory(lsp):
    uri = lsp.open(PY_DOC)
    first = await lsp.inline(uri, PY_CURSOR)
    again = await lsp.inline(uri, PY_CURSOR)
    more = await lsp.inline(uri, PY_CURSOR, invoked=True)  # only the seeds not tried yet run
    assert [i.insert_text for i in again.items] == [i.insert_text for i in first.items]
    assert [i.insert_text for i in more.items][: len(first.items)] == [i.insert_text for i in first.items]
    records = [r for r in (await lsp.stats())["recent"] if r.get("uri") == uri]
    assert [r["cached"] for r in records] == [False, True, True]
    assert records[1]["steps"] == 0 and records[2]["steps"] > 0
    lsp.change(uri, t.Range(start=PY_CURSOR, end=PY_CURSOR), " ")
    await lsp.inline(uri, t.Position(line=5, character=12))
    assert (await lsp.stats())["recent"][-1]["cached"] is False  # a new version computes afresh


async def test_languages_not_enabled_get_nothing(lsp):
    uri = lsp.open("just some prose\n", language="plaintext")
    result = await lsp.inline(uri, t.Position(line=0, character=4))
    assert list(result.items) == []


async def test_completion_fallback_inserts_the_infill(lsp):
    uri = lsp.open(PY_DOC)
    result = await asyncio.wait_for(lsp.client.text_document_completion_async(t.CompletionParams(
        text_document=t.TextDocumentIdentifier(uri=uri), position=PY_CURSOR)), 120)
    assert result.is_incomplete
    assert len(result.items) <= 1  # none when the model's infill is empty
    for item in result.items:
        assert item.text_edit.range == t.Range(start=PY_CURSOR, end=PY_CURSOR)
        assert item.text_edit.new_text.strip()
        assert item.label and "\n" not in item.label


async def test_prefix_cache_is_reused_between_keystrokes(lsp):
    uri = lsp.open(PY_DOC * 8)
    pos = t.Position(line=5 + 7 * PY_DOC.count("\n"), character=11)  # "return " of the last copy
    first_items = (await lsp.inline(uri, pos)).items
    # Type a character the answer does not start with: typing the answer is typed-ahead, tested below.
    typed = "q" if first_items and first_items[0].insert_text.startswith("r") else "r"
    lsp.change(uri, t.Range(start=pos, end=pos), typed)
    await lsp.inline(uri, t.Position(line=pos.line, character=pos.character + 1))
    records = [r for r in (await lsp.stats())["recent"] if r.get("uri") == uri]
    first, second = records[-2], records[-1]
    assert first["encoded"] == first["prefix_tokens"] > 200  # a fresh document: everything encoded
    # Only the changed tail (the engine re-encodes from the start of the chunk holding the change).
    assert 0 < second["encoded"] <= second["prefix_tokens"] // 4


async def test_other_open_documents_are_context_ahead_of_the_prefix(model_dir):
    """What llama.vim sends a llama.cpp server as input_extra, the language server takes from the
    other open documents: the encoder prompt grows when one opens and shrinks when it closes, and
    the chunks stay in the prefix cache while the user types in this document."""
    h = Harness()
    await h.start("--model", str(model_dir), options=NORMAL)
    try:
        async def prompt_record(uri: str, pos: t.Position) -> dict:
            await h.inline(uri, pos)
            return [r for r in (await h.stats())["recent"] if r.get("uri") == uri][-1]

        uri = h.open(PY_DOC, name="main")
        alone = await prompt_record(uri, PY_CURSOR)
        other = h.open("RATE = 0.25\nLIMIT = 100\n\ndef clamp(x):\n    return min(max(x, 0), LIMIT)\n",
                       name="consts")
        with_other = await prompt_record(uri, PY_CURSOR)  # same place and version: the context is new
        assert with_other["prefix_tokens"] > alone["prefix_tokens"] + 10
        version = h.change(uri, t.Range(start=PY_CURSOR, end=PY_CURSOR), "r")
        typed = await prompt_record(uri, t.Position(line=PY_CURSOR.line, character=PY_CURSOR.character + 1))
        assert version == 2 and 0 < typed["encoded"] <= typed["prefix_tokens"] // 2  # the chunk was reused
        h.client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=other)))
        await asyncio.sleep(0.2)
        h.change(uri, t.Range(start=t.Position(line=PY_CURSOR.line, character=PY_CURSOR.character + 1),
                              end=t.Position(line=PY_CURSOR.line, character=PY_CURSOR.character + 1)), "a")
        closed = await prompt_record(uri, t.Position(line=PY_CURSOR.line, character=PY_CURSOR.character + 2))
        assert closed["prefix_tokens"] < with_other["prefix_tokens"]
    finally:
        await h.stop()


# ---------------------------------------------------------------------- cancellation and versions


async def test_cancel_request_stops_denoising(lsp):
    lsp.configure(SLOW)
    try:
        uri = lsp.open(PY_DOC)
        msg_id = f"cancel-{uuid.uuid4().hex}"
        pending = lsp.send_inline(uri, PY_CURSOR, msg_id, invoked=True)
        await wait_for(lambda: any(c["requestId"] == msg_id for c in lsp.canvas), 60)  # denoising has begun
        # The loop stays responsive while the model works: another request is answered meanwhile.
        assert (await lsp.stats())["inflight"] == 1
        lsp.cancel(msg_id)
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(pending, 10)  # generous: CI machines are shared
        assert info.value.code == -32800
        await wait_for(lambda: any(c["requestId"] == msg_id and c["done"] for c in lsp.canvas))
        final = [c for c in lsp.canvas if c["requestId"] == msg_id and c["done"]]
        assert len(final) == 1 and final[0]["text"] == ""
        steps = [c["step"] for c in lsp.canvas if c["requestId"] == msg_id and not c["done"]]
        await asyncio.sleep(0.5)
        later = [c["step"] for c in lsp.canvas if c["requestId"] == msg_id and not c["done"]]
        assert later == steps  # nothing ran after the cancellation
        assert max(steps) < 48  # it did not run to the end of its budget
        assert (await lsp.stats())["inflight"] == 0
    finally:
        lsp.configure(NORMAL)
    assert isinstance(await lsp.inline(uri, PY_CURSOR), t.InlineCompletionList)  # the next request is served


async def test_stale_versions_get_no_result(lsp):
    lsp.configure(SLOW)
    try:
        uri = lsp.open(PY_DOC)
        msg_id = f"stale-{uuid.uuid4().hex}"
        pending = lsp.send_inline(uri, PY_CURSOR, msg_id, invoked=True)
        await wait_for(lambda: any(c["requestId"] == msg_id for c in lsp.canvas), 60)
        lsp.change(uri, t.Range(start=PY_CURSOR, end=PY_CURSOR), "2")
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(pending, 10)
        assert info.value.code == -32801  # ContentModified: computed for version 1, the document is at 2
    finally:
        lsp.configure(NORMAL)
    result = await lsp.inline(uri, t.Position(line=5, character=12))
    assert all(item.command.arguments[0]["version"] == 2 for item in result.items)


async def test_request_timeout_stops_a_long_request(lsp):
    lsp.configure({**SLOW, "request_timeout_s": 0.001})
    try:
        with pytest.raises(JsonRpcException) as info:
            await lsp.inline(lsp.open(PY_DOC), PY_CURSOR, invoked=True)
        assert info.value.code == -32803 and "request_timeout_s" in info.value.message
    finally:
        lsp.configure(NORMAL)
    assert (await lsp.stats())["inflight"] == 0


# ---------------------------------------------------------------------- bad input


async def test_bad_positions_get_errors_and_the_server_lives_on(lsp):
    uri = lsp.open("x = 1\ny = 2\n")
    for pos in (t.Position(line=7, character=0), t.Position(line=3, character=0), t.Position(line=0, character=40),
                t.Position(line=2, character=1)):
        with pytest.raises(JsonRpcException) as info:
            await lsp.inline(uri, pos)
        assert info.value.code == -32602
        assert "outside the document" in info.value.message or "past the end of line" in info.value.message
    with pytest.raises(JsonRpcException) as info:
        await lsp.inline("file:///never/opened.py", t.Position(line=0, character=0))
    assert info.value.code == -32602 and "not open" in info.value.message
    # The end of the document (after the final newline) is a valid cursor.
    await lsp.inline(uri, t.Position(line=2, character=0))
    assert isinstance(await lsp.inline(lsp.open(PY_DOC), PY_CURSOR), t.InlineCompletionList)


async def test_invalid_params_are_answered(lsp):
    uri = lsp.open("x = 1\n")
    bad = [
        {"textDocument": {"uri": uri}, "position": {"line": -1, "character": 0}, "context": {"triggerKind": 1}},
        {"textDocument": {"uri": uri}, "position": {"line": "one", "character": 0}, "context": {"triggerKind": 1}},
        {"textDocument": {"uri": uri}},
        None,
    ]
    for params in bad:
        with pytest.raises(JsonRpcException) as info:
            await lsp.raw_request(t.TEXT_DOCUMENT_INLINE_COMPLETION, params)
        assert info.value.code == -32602, info.value
    with pytest.raises(JsonRpcException) as info:
        await lsp.raw_request("workspace/executeCommand", {"command": "dg-edit.rewrite", "arguments": [{"uri": 3}]})
    assert info.value.code == -32602
    with pytest.raises(JsonRpcException) as info:
        await lsp.raw_request("dgEdit/noSuchMethod", {})
    assert info.value.code == -32601
    # A malformed notification is logged, not fatal.
    lsp.client.protocol._send_data({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"x": 1}})
    assert (await lsp.inline(uri, t.Position(line=1, character=0))) is not None


async def test_ten_megabyte_file(lsp):
    line = "value = compute(value, 12345)  # padding padding padding\n"
    text = line * (10 * 1024 * 1024 // len(line))
    uri = lsp.open(text)
    end = t.Position(line=text.count("\n"), character=0)
    try:
        result = await lsp.inline(uri, end)
        assert isinstance(result.items, (list, tuple))
    except JsonRpcException as e:  # an error is acceptable; a dead server is not
        assert e.code in (-32602, -32603, -32803)
    lsp.client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=uri)))
    assert isinstance(await lsp.inline(lsp.open(PY_DOC), PY_CURSOR), t.InlineCompletionList)


# ---------------------------------------------------------------------- non-ASCII documents

NON_ASCII = 'greeting = "😀 你好世界 🎉"; total = \nprint(greeting, total)\n'
CURSOR_AT = NON_ASCII.index("\n")  # end of the first line: emoji and CJK before the cursor
SELECTED = NON_ASCII.index("你"), NON_ASCII.index("; total")  # '你好世界 🎉"'


async def _check_non_ascii(h: Harness, units) -> None:
    uri = h.open(NON_ASCII)
    line0 = NON_ASCII.split("\n")[0]
    pos = t.Position(line=0, character=units(line0[:CURSOR_AT]))
    result = await h.inline(uri, pos)
    for item in result.items:
        assert item.range == t.Range(start=pos, end=pos)
    # The server splits the document where the client means: rewriting a non-ASCII range with
    # strength 0 returns exactly the selected text, so the applied edit leaves the document unchanged.
    start, cut = SELECTED
    rng = t.Range(start=t.Position(line=0, character=units(line0[:start])),
                  end=t.Position(line=0, character=units(line0[:cut])))
    out = await h.execute("dg-edit.rewrite", {"uri": uri, "range": _json_range(rng), "strength": 0})
    assert out["text"] == line0[start:cut] == '你好世界 🎉"'
    edit = h.edits[-1].edit.document_changes[0].edits[0]
    assert edit.range == rng and edit.new_text == line0[start:cut]
    # Incremental sync in the same units: insert after the first emoji, then read it back the same way.
    emoji_end = line0.index("😀") + 1
    at = t.Position(line=0, character=units(line0[:emoji_end]))
    h.change(uri, t.Range(start=at, end=at), "X")
    line0 = line0[:emoji_end] + "X" + line0[emoji_end:]
    rng = t.Range(start=at, end=t.Position(line=0, character=units(line0[:emoji_end + 3])))
    out = await h.execute("dg-edit.rewrite", {"uri": uri, "range": _json_range(rng), "strength": 0})
    assert out["text"] == "X 你"


def _json_range(rng: t.Range) -> dict:
    return {"start": {"line": rng.start.line, "character": rng.start.character},
            "end": {"line": rng.end.line, "character": rng.end.character}}


async def test_non_ascii_utf16(lsp):
    await _check_non_ascii(lsp, utf16_len)
    # and applying an item the way a UTF-16 editor does puts its text right at the cursor
    uri = lsp.open(NON_ASCII)
    line0 = NON_ASCII.split("\n")[0]
    pos = t.Position(line=0, character=utf16_len(line0[:CURSOR_AT]))
    result = await lsp.inline(uri, pos, invoked=True)
    for item in result.items:
        after = apply_utf16(NON_ASCII, item.range, item.insert_text)
        assert after == NON_ASCII[:CURSOR_AT] + item.insert_text + NON_ASCII[CURSOR_AT:]


async def test_non_ascii_utf8_when_offered(model_dir):
    h = Harness(encodings=[t.PositionEncodingKind.Utf16, t.PositionEncodingKind.Utf8])
    init = await h.start("--model", str(model_dir))
    try:
        assert init.capabilities.position_encoding == t.PositionEncodingKind.Utf8
        await _check_non_ascii(h, lambda s: len(s.encode("utf-8")))
    finally:
        await h.stop()


# ---------------------------------------------------------------------- rewrite, progress, canvas


async def test_rewrite_code_action_applies_an_edit_with_progress(lsp):
    uri = lsp.open(PY_DOC)
    rng = t.Range(start=t.Position(line=3, character=0), end=t.Position(line=5, character=10))
    # Raw JSON, as an editor sees it (pygls's client would guess Command for a CodeAction).
    actions = plain(await lsp.raw_request(t.TEXT_DOCUMENT_CODE_ACTION, {
        "textDocument": {"uri": uri}, "range": _json_range(rng), "context": {"diagnostics": []}}))
    assert len(actions) == 1 and actions[0]["title"] == "Rewrite selection (dg-edit)"
    assert actions[0]["kind"] == "refactor.rewrite"
    command = actions[0]["command"]
    assert command["command"] == "dg-edit.rewrite"
    edits_before = len(lsp.edits)
    out = await lsp.execute(command["command"], command["arguments"][0])
    assert out["applied"] is True and out["version"] == 1
    assert len(lsp.edits) == edits_before + 1
    change = lsp.edits[-1].edit.document_changes[0]
    assert change.text_document.uri == uri and change.text_document.version == 1
    assert change.edits[0].range == rng and change.edits[0].new_text == out["text"]
    # $/progress on a server-created token: begin, "step i/N" reports counting up, end.
    token = lsp.created_tokens[-1]
    values = [plain(v) for tok, v in lsp.progress if tok == token]
    assert values[0]["kind"] == "begin" and values[-1]["kind"] == "end"
    reports = [int(v["message"].split()[1].split("/")[0]) for v in values if v["kind"] == "report"]
    assert reports and reports == sorted(reports) and len(set(reports)) == len(reports)
    # dgEdit/canvas for the same request: steps counting up, then one done with the applied text.
    canvas = [c for c in lsp.canvas if c["uri"] == uri]
    steps = [c["step"] for c in canvas if not c["done"]]
    assert steps and steps == sorted(steps) and steps[0] >= 1
    assert canvas[-1]["done"] and canvas[-1]["text"] == out["text"] and canvas[-1]["version"] == 1
    assert {c["requestId"] for c in canvas} == {canvas[-1]["requestId"]}


async def test_rewrite_refused_by_the_editor_and_empty_selection(lsp):
    uri = lsp.open(PY_DOC)
    lsp.apply_result = False
    try:
        rng = t.Range(start=t.Position(line=5, character=4), end=t.Position(line=5, character=10))
        out = await lsp.execute("dg-edit.rewrite", {"uri": uri, "range": _json_range(rng), "instruction": "shorter"})
        assert out["applied"] is False
    finally:
        lsp.apply_result = True
    with pytest.raises(JsonRpcException) as info:
        await lsp.execute("dg-edit.rewrite", {"uri": uri, "range": _json_range(
            t.Range(start=t.Position(line=1, character=0), end=t.Position(line=1, character=0)))})
    assert info.value.code == -32602


async def test_cancelled_rewrite_never_edits_the_buffer(lsp):
    lsp.configure(SLOW)
    try:
        uri = lsp.open(PY_DOC * 3)
        rng = t.Range(start=t.Position(line=0, character=0), end=t.Position(line=20, character=0))
        msg_id = f"rw-{uuid.uuid4().hex}"
        edits_before = len(lsp.edits)
        pending = lsp.client.protocol.send_request_async(t.WORKSPACE_EXECUTE_COMMAND, t.ExecuteCommandParams(
            command="dg-edit.rewrite", arguments=[{"uri": uri, "range": _json_range(rng), "strength": 1.0}]),
            msg_id=msg_id)
        await wait_for(lambda: any(c["requestId"] == msg_id for c in lsp.canvas), 60)
        lsp.cancel(msg_id)
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(pending, 10)
        assert info.value.code == -32800
        await wait_for(lambda: any(c["requestId"] == msg_id and c["done"] for c in lsp.canvas))
        steps = [c["step"] for c in lsp.canvas if c["requestId"] == msg_id]
        await asyncio.sleep(0.5)
        assert [c["step"] for c in lsp.canvas if c["requestId"] == msg_id] == steps  # the model stopped
        assert len(lsp.edits) == edits_before
        assert (await lsp.stats())["inflight"] == 0
    finally:
        lsp.configure(NORMAL)


async def test_infill_command_inserts_at_the_position(lsp):
    uri = lsp.open(PY_DOC)
    out = await lsp.execute("dg-edit.infill", {"uri": uri, "position": {"line": 5, "character": 11}})
    if out["applied"]:
        edit = lsp.edits[-1].edit.document_changes[0].edits[0]
        assert edit.range == t.Range(start=PY_CURSOR, end=PY_CURSOR) and edit.new_text == out["text"]
    else:
        assert out["failureReason"] == "empty infill"


async def test_inline_progress_with_client_token(lsp):
    uri = lsp.open(PY_DOC)
    token = f"tok-{uuid.uuid4().hex}"
    await lsp.inline(uri, PY_CURSOR, token=token)
    values = [plain(v) for tok, v in lsp.progress if tok == token]
    assert values[0]["kind"] == "begin" and values[-1]["kind"] == "end"
    messages = [v["message"] for v in values if v["kind"] == "report"]
    assert messages and all(m.startswith("step ") for m in messages)
    steps = [int(m.split()[1].split("/")[0]) for m in messages]
    assert steps == sorted(steps)


# ---------------------------------------------------------------------- configuration and failures


async def test_invalid_configuration_is_reported_and_ignored(lsp):
    shown = len(lsp.shown)
    lsp.configure({"dgEdit": {"candidates": 2, "no_such_key": 1}})
    await wait_for(lambda: len(lsp.shown) > shown)
    assert "no_such_key" in lsp.shown[-1].message
    assert (await lsp.stats())["settings"]["candidates"] == 3
    lsp.configure({"dgEdit": {"languages": ["python"], "candidates": 2}})
    assert (await lsp.stats())["settings"]["candidates"] == 2
    # A pull-model client sends an empty notification; the server then asks for the "dgEdit" section.
    lsp.pull_settings["dgEdit"] = {"languages": ["python"], "candidates": 1}
    lsp.configure(None)
    deadline = time.monotonic() + 10
    while (await lsp.stats())["settings"]["candidates"] != 1:
        assert time.monotonic() < deadline, "the server did not pull its configuration"
        await asyncio.sleep(0.05)
    lsp.configure(NORMAL)


async def test_broken_model_is_an_error_not_a_crash(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    h = Harness()
    await h.start("--model", str(broken))
    try:
        uri = h.open(PY_DOC)
        with pytest.raises(JsonRpcException) as info:
            await h.inline(uri, PY_CURSOR)
        assert info.value.code == -32803 and "cannot load the model" in info.value.message
        await wait_for(lambda: any("cannot load" in m.message for m in h.logs))
        assert (await h.stats())["engine"]["state"] == "failed"
    finally:
        await h.stop()


def boom_model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the tiny model whose tokenizer maps "BOOM" to a token id past the embedding table: the
    model fails mid-request on any text that contains it."""
    import json

    broken = tmp_path / "fails-on-boom"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tok = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"].append({"id": 100000, "content": "BOOM", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": False})
    (broken / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    return broken


async def test_model_failure_is_logged_and_answered(tmp_path, tiny_model_dir):
    """A model that fails mid-request (a token id past its embedding table): error + log, server lives on."""
    broken = boom_model_dir(tmp_path, tiny_model_dir)
    h = Harness()
    await h.start("--model", str(broken))
    try:
        bad = h.open("x = BOOM\ny = ")
        with pytest.raises(JsonRpcException) as info:
            await h.inline(bad, t.Position(line=1, character=4))
        assert info.value.code == -32603 and "model failure" in info.value.message
        await wait_for(lambda: any("model failure" in m.message and m.type == t.MessageType.Error for m in h.logs))
        assert isinstance(await h.inline(h.open(PY_DOC), PY_CURSOR), t.InlineCompletionList)  # still serving
        assert (await h.stats())["errors"] == 1
    finally:
        await h.stop()


async def test_tcp_transport(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(*SERVER, "--tcp", f"127.0.0.1:{port}", "--model", str(model_dir),
                                                env=ENV, stderr=asyncio.subprocess.DEVNULL)
    client = LanguageClient("dg-edit-tests", "0")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        result = await asyncio.wait_for(client.initialize_async(
            t.InitializeParams(capabilities=t.ClientCapabilities())), 30)
        assert result.capabilities.inline_completion_provider is not None
        uri = "file:///tmp/tcp.py"
        client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=PY_DOC)))
        out = await asyncio.wait_for(client.text_document_inline_completion_async(t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
            text_document=t.TextDocumentIdentifier(uri=uri), position=PY_CURSOR)), 120)
        assert len(out.items) <= 1
        await asyncio.wait_for(client.shutdown_async(None), 10)
        client.exit(None)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# ---------------------------------------------------------------------- warm everywhere (issue 19)
WARM = {"languages": ["python"], "idle_prefill_ms": 200, "max_prefix_tokens": 512}


def argparse_head(lines: int) -> str:
    """A real Python file: the first `lines` lines of the standard library's argparse."""
    import argparse as source

    from pathlib import Path

    return "".join(Path(source.__file__).read_text(encoding="utf-8").splitlines(keepends=True)[:lines])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def warm_lsp(model_dir):
    h = await started(model_dir, WARM)
    yield h
    await h.stop()


async def inline_record(h: Harness, uri: str) -> dict:
    return [r for r in (await h.stats())["recent"] if r.get("uri") == uri and r["kind"] == "inline"][-1]


async def test_a_jump_after_idle_prefill_is_served_warm(warm_lsp, model_dir):
    from transformers import AutoConfig

    from dg_edit.plan import kv_bytes_per_token

    text = argparse_head(400)  # ~3,700 tokens: 14 windows of at most 512 tokens, two character windows
    uri = warm_lsp.open(text)
    deadline = time.monotonic() + 170
    while True:  # the editor is quiet: the server prefills the document in the background
        cache = (await warm_lsp.stats())["cache"]
        docs = {d["session"]: d for d in cache["documents"]} if cache else {}
        if uri in docs and cache["prefill"]["pending"] == 0 and cache["prefill"]["passes"]:
            break
        assert time.monotonic() < deadline, cache
        await asyncio.sleep(0.2)
    config = AutoConfig.from_pretrained(str(model_dir)).get_text_config(decoder=True)
    assert cache["bytes_per_token"] == kv_bytes_per_token(config, 4)  # the server runs the model in fp32
    assert docs[uri]["tokens"] >= len(text) // 8 and cache["prefill"]["error"] is None
    assert cache["bytes"] <= cache["budget_bytes"]
    lines = text.split("\n")
    for line in (300, 220, 380, 140, 60):  # jumps down and up, the cursor in the middle of a line
        pos = t.Position(line=line, character=len(lines[line]) // 2)
        await warm_lsp.inline(uri, pos)
        record = await inline_record(warm_lsp, uri)
        assert record["prefix_tokens"] > 256 and not record["typed_ahead"], record
        assert record["encoded"] < 2 * 64, record  # at most the chunk holding the cursor (and a word cut)
    # an edit drops what lies after it; after the next quiet moment a jump below it is warm again
    version = warm_lsp.change(uri, t.Range(start=t.Position(line=200, character=0),
                                           end=t.Position(line=200, character=0)), "# edited\n")
    await asyncio.sleep(0.1)
    deadline = time.monotonic() + 170
    passes = cache["prefill"]["passes"]
    while (await warm_lsp.stats())["cache"]["prefill"]["passes"] <= passes:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await warm_lsp.inline(uri, t.Position(line=351, character=4))
    record = await inline_record(warm_lsp, uri)
    assert record["version"] == version and record["encoded"] < 2 * 64, record


async def test_typing_the_answer_gets_the_rest_without_the_model(warm_lsp):
    text = argparse_head(400)
    uri = warm_lsp.open(text)
    lines = text.split("\n")
    for line in (100, 123, 146, 215, 284, 353):  # places where the embedded model writes a few characters
        pos = t.Position(line=line, character=len(lines[line]) // 2)
        items = (await warm_lsp.inline(uri, pos)).items
        answer = items[0].insert_text if items else ""
        if answer[:2].strip() and answer[2:].strip():
            break
    else:
        pytest.fail("no answer of three characters or more at any of the places tried")
    asked = await inline_record(warm_lsp, uri)
    assert not asked["typed_ahead"] and asked["steps"] > 0
    warm_lsp.change(uri, t.Range(start=pos, end=pos), answer[:2])  # the user types what they were shown
    typed = t.Position(line=pos.line, character=pos.character + 2)
    items = (await warm_lsp.inline(uri, typed)).items
    record = await inline_record(warm_lsp, uri)
    assert [item.insert_text for item in items] == [answer[2:]]
    assert record["typed_ahead"] and record["steps"] == 0 and record["encoded"] == 0, record
    # typing something else asks the model again
    warm_lsp.change(uri, t.Range(start=typed, end=typed), "\x07")
    await warm_lsp.inline(uri, t.Position(line=typed.line, character=typed.character + 1))
    record = await inline_record(warm_lsp, uri)
    assert not record["typed_ahead"] and record["steps"] > 0
