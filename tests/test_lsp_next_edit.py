"""Next-edit suggestions over the language server, end to end: the real `python -m dg_edit.lsp.server`
over stdio with the real model, driven by pygls's `LanguageClient` (the `Harness` of test_lsp.py).

What is checked is the protocol: the edit history didChange feeds (UTF-16 ranges to characters),
`textDocument/copilotInlineEdit`'s shape and ranges, stale versions, preparation while quiet, errors,
and the inline-completion item with a range. The model's text is never judged.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import pytest_asyncio
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException

from dg_edit.testing import plain
from test_lsp import Harness, apply_utf16, boom_model_dir, started, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

METHOD = "textDocument/copilotInlineEdit"
# Preparation runs once the editor has been quiet this long; short, so the tests do not wait.
OPTIONS = {"languages": ["python"], "idle_prefill_ms": 200}

RENAME_DOC = '''def total_price(items):
    count = 0
    for item in items:
        count += item.price
    return count


print(total_price([]))
'''


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lsp(model_dir):
    h = await started(model_dir, OPTIONS)
    await engine_ready(h)
    yield h
    await h.stop()


async def engine_ready(h: Harness) -> None:
    """Edits made while the model loads are not history: the tests edit once it is there."""
    deadline = time.monotonic() + 120
    while (await h.stats())["engine"]["state"] != "ready":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


def pos(line: int, character: int) -> t.Position:
    return t.Position(line=line, character=character)


async def inline_edit(h: Harness, uri: str, position: t.Position, version: int | None = None) -> dict:
    params = {"textDocument": {"uri": uri, "version": h.versions[uri] if version is None else version},
              "position": {"line": position.line, "character": position.character}}
    return plain(await asyncio.wait_for(asyncio.wrap_future(_send(h, params, f"ne-{uuid.uuid4().hex}")), 180))


def _send(h: Harness, params: dict, msg_id: str):
    from concurrent.futures import Future

    future: Future = Future()
    h.client.protocol._request_futures[msg_id] = future
    h.client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": METHOD, "params": params})
    return future


async def edit_history(h: Harness, uri: str) -> list[dict]:
    [entry] = [e for e in (await h.stats())["next_edit"]["history"] if e["uri"] == uri]
    return entry["edits"]


def rename_count(h: Harness, uri: str) -> str:
    """Rename `count` to `total` on line 1, in two keystroke-like changes; returns the new text."""
    h.change(uri, t.Range(start=pos(1, 4), end=pos(1, 9)), "")
    h.change(uri, t.Range(start=pos(1, 4), end=pos(1, 4)), "total")
    return RENAME_DOC.replace("    count = 0", "    total = 0", 1)


def check_edits(result: dict, uri: str, version: int, text: str) -> None:
    """The result's shape, and that every edit applies to `text` as a UTF-16 editor applies it."""
    assert set(result) == {"edits"}
    for i, edit in enumerate(plain_edits(result)):
        assert set(edit) == {"range", "text", "textDocument", "command"}
        assert edit["textDocument"] == {"uri": uri, "version": version}
        assert edit["command"]["command"] == "dg-edit.accepted"
        assert edit["command"]["arguments"][0]["kind"] == "next_edit"
        assert edit["command"]["arguments"][0]["index"] == i
        rng = t.Range(start=pos(**edit["range"]["start"]), end=pos(**edit["range"]["end"]))
        apply_utf16(text, rng, edit["text"])  # raises when a range is outside the text


def plain_edits(result: dict) -> list[dict]:
    return result["edits"]


async def test_did_change_feeds_the_edit_history_in_characters(lsp):
    # Astral characters before the edit: UTF-16 columns and Python character offsets differ there.
    doc = 'name = "😀😀"; count = 1\nprint(count)\n'
    uri = lsp.open(doc)
    col = len('name = "😀😀"; '.encode("utf-16-le")) // 2
    lsp.change(uri, t.Range(start=pos(0, col), end=pos(0, col + 5)), "total")
    history = await edit_history(lsp, uri)
    start = doc.index("count")
    assert [(e["start"], e["end"], e["text"], e["old_text"]) for e in history] == [(start, start + 5, "total", "count")]
    # A full-text change (no range) becomes the minimal edit between the two texts.
    lsp.versions[uri] += 1
    lsp.client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=lsp.versions[uri]),
        content_changes=[t.TextDocumentContentChangeWholeDocument(text=doc.replace("count", "total"))]))
    history = await edit_history(lsp, uri)
    second = doc.replace("count", "total", 1).index("print(") + len("print(")
    assert (history[-1]["start"], history[-1]["end"], history[-1]["text"]) == (second, second + 5, "total")


async def test_copilot_inline_edit_answers_edits_for_the_current_version(lsp):
    uri = lsp.open(RENAME_DOC)
    text = rename_count(lsp, uri)
    version = lsp.versions[uri]
    result = await inline_edit(lsp, uri, pos(1, 9))
    check_edits(result, uri, version, text)
    records = [r for r in (await lsp.stats())["recent"] if r.get("kind") == "next_edit" and r["uri"] == uri]
    assert records[-1]["edits"] == len(result["edits"]) and records[-1]["version"] == version
    # Asking again at the same place in the same version: the same answer, from memory.
    again = await inline_edit(lsp, uri, pos(1, 9))
    assert [(e["range"], e["text"]) for e in again["edits"]] == [(e["range"], e["text"]) for e in result["edits"]]
    assert (await lsp.stats())["recent"][-1]["cached"] is True
    # Steps were reported as dgEdit/canvas drafts, ending with exactly one done.
    assert any(c["uri"] == uri and c["done"] for c in lsp.canvas)


async def test_a_stale_version_gets_no_edits(lsp):
    uri = lsp.open(RENAME_DOC)
    rename_count(lsp, uri)
    before = (await lsp.stats())["requests"]
    assert await inline_edit(lsp, uri, pos(1, 9), version=lsp.versions[uri] - 1) == {"edits": []}
    assert (await lsp.stats())["requests"] == before  # no model call for a text that is gone


async def test_a_change_while_the_model_runs_answers_no_edits(lsp):
    lsp.configure({**OPTIONS, "max_denoising_steps": 48})
    try:
        uri = lsp.open(RENAME_DOC)
        rename_count(lsp, uri)
        msg_id = f"ne-stale-{uuid.uuid4().hex}"
        pending = asyncio.wrap_future(_send(lsp, {"textDocument": {"uri": uri, "version": lsp.versions[uri]},
                                                  "position": {"line": 1, "character": 9}}, msg_id))
        await wait_for(lambda: any(c["requestId"] == msg_id for c in lsp.canvas), 120)
        lsp.change(uri, t.Range(start=pos(2, 0), end=pos(2, 0)), "#")
        assert plain(await asyncio.wait_for(pending, 30)) == {"edits": []}
        assert (await lsp.stats())["recent"][-1].get("stale") is True
    finally:
        lsp.configure(OPTIONS)


async def test_a_quiet_editor_gets_a_prepared_answer_at_once(lsp):
    uri = lsp.open(RENAME_DOC)
    rename_count(lsp, uri)  # the cursor ends after "total" on line 1: where preparation aims
    cursor = pos(1, 9)
    deadline = time.monotonic() + 120
    # the engine prepares after idle_prefill_ms of quiet; poll its state, not a sleep
    while not (await lsp.stats())["next_edit"]["prepared_all"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    result = await inline_edit(lsp, uri, cursor)
    record = [r for r in (await lsp.stats())["recent"] if r.get("kind") == "next_edit"][-1]
    assert record["prepared"] is True and record["ms"] < 50  # taken, not computed
    check_edits(result, uri, lsp.versions[uri], RENAME_DOC.replace("    count = 0", "    total = 0", 1))


async def test_bad_params_and_unknown_documents_are_invalid_params(lsp):
    for params in ({}, {"textDocument": {"uri": "file:///x.py"}}, {"position": {"line": 0, "character": 0}},
                   {"textDocument": {"uri": "file:///not-open.py", "version": 1}, "position": {"line": 0, "character": 0}}):
        with pytest.raises(JsonRpcException) as info:
            await lsp.raw_request(METHOD, params)
        assert info.value.code == -32602, params
    uri = lsp.open("x = 1\n")
    with pytest.raises(JsonRpcException) as info:
        await inline_edit(lsp, uri, pos(5, 0))
    assert info.value.code == -32602
    assert isinstance(await inline_edit(lsp, uri, pos(0, 5)), dict)  # the server lives on


async def test_an_edit_covering_the_cursor_is_also_an_inline_completion_item(lsp):
    uri = lsp.open(RENAME_DOC)
    text = rename_count(lsp, uri)
    version = lsp.versions[uri]
    for line, character in ((3, 13), (4, 14), (1, 9)):  # on uses of the old name, and the rename
        result = await inline_edit(lsp, uri, pos(line, character))
        items = (await lsp.inline(uri, pos(line, character))).items
        offset = sum(len(x) + 1 for x in text.split("\n")[:line]) + character
        covering = [e for e in plain_edits(result)
                    if e["range"]["start"]["line"] == e["range"]["end"]["line"] == line
                    and e["range"]["start"]["character"] <= character <= e["range"]["end"]["character"]
                    and "\n" not in e["text"]]
        ranged = [i for i in items if i.command.arguments[0].get("kind") == "next_edit"]
        if covering:
            assert len(ranged) == 1 and ranged[0].insert_text == covering[0]["text"]
            assert ranged[0].range == t.Range(start=pos(**covering[0]["range"]["start"]),
                                              end=pos(**covering[0]["range"]["end"]))
            assert items[-1] is ranged[0] and ranged[0].command.arguments[0]["version"] == version
        else:
            assert ranged == [], (offset, plain_edits(result))


async def test_model_failure_is_an_error_and_never_an_edit(tmp_path, tiny_model_dir):
    """A model that fails mid-request (a token id past its embedding table): an LSP error, no applyEdit."""
    broken = boom_model_dir(tmp_path, tiny_model_dir)
    h = Harness()
    await h.start("--model", str(broken), options={"idle_prefill": False})
    try:
        await engine_ready(h)
        uri = h.open("x = BOOM\ny = x + 1\nprint(y)\n")
        h.change(uri, t.Range(start=pos(1, 0), end=pos(1, 1)), "z")
        with pytest.raises(JsonRpcException) as info:
            await inline_edit(h, uri, pos(1, 1))
        assert info.value.code == -32603 and "model failure" in info.value.message
        assert h.edits == []  # the server never touched the buffer
        assert (await h.stats())["errors"] == 1
    finally:
        await h.stop()


async def test_edits_made_while_the_model_loads_still_aim_the_first_suggestion(model_dir):
    h = await started(model_dir, OPTIONS)
    try:
        uri = h.open(RENAME_DOC)
        rename_count(h, uri)  # at once: the model is still loading
        assert (await h.stats())["engine"]["state"] == "loading"
        await inline_edit(h, uri, pos(1, 9))
        history = await edit_history(h, uri)
        start = RENAME_DOC.index("count")
        assert [(e["start"], e["end"], e["text"], e["old_text"]) for e in history] == [(start, start + 5, "total", "count")]
    finally:
        await h.stop()


async def test_text_the_engine_refuses_is_not_history_and_the_server_lives_on(lsp):
    uri = lsp.open("x = 1\n")
    lsp.change(uri, t.Range(start=pos(0, 4), end=pos(0, 5)), "\ud800")  # a lone surrogate (JSON allows it)
    assert await edit_history(lsp, uri) == []
    with pytest.raises(JsonRpcException) as info:
        await inline_edit(lsp, uri, pos(0, 0))
    assert info.value.code == -32602  # the engine's reason, as invalid params
    lsp.change(uri, t.Range(start=pos(1, 0), end=pos(1, 0)), "y = 2\n")  # an edit away from it is history
    assert [e["text"] for e in await edit_history(lsp, uri)] == ["y = 2\n"]
