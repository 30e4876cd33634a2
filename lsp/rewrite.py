"""In-line editing: the "Rewrite selection (dg-edit)" code action and the commands that apply edits.

- `textDocument/codeAction` offers, for a non-empty selection, a `refactor.rewrite` action whose
  command is `dg-edit.rewrite` with `[{uri, range}]`.
- `dg-edit.rewrite` `[{uri, range, instruction?, strength?}]`: re-denoises the selected text with
  `engine.rewrite` and applies the result with `workspace/applyEdit`.
- `dg-edit.infill` `[{uri, position}]`: infills at a position and inserts the result the same way.

Both return `{"applied": bool, "text": str, "version": int}` (plus `failureReason` when the client
declined the edit). The edit names the document version it was computed for, so a client whose
buffer moved on rejects it; the server also refuses to send it when the version changed while
the model ran (ContentModified). A failed model call never sends an edit.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import attrs
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from . import documents
from .context import other_documents
from .engine_host import RequestFailed
from .progress import StepReporter
from .runner import infill_texts, run_events
from .state import DgEditServer

REWRITE = "dg-edit.rewrite"
INFILL = "dg-edit.infill"
ACTION_TITLE = "Rewrite selection (dg-edit)"


@attrs.define
class RewriteArguments:
    uri: str
    range: types.Range
    instruction: Optional[str] = None
    strength: float = 0.6


@attrs.define
class InfillArguments:
    uri: str
    position: types.Position


def code_action(ls: DgEditServer, params: types.CodeActionParams) -> list[types.CodeAction]:
    rng = params.range
    uri = params.text_document.uri
    doc = ls.workspace.text_documents.get(uri)
    if doc is None or rng.start == rng.end or not documents.language_enabled(ls, doc):
        return []
    if params.context.only and not any(types.CodeActionKind.RefactorRewrite.value.startswith(k)
                                       for k in params.context.only):
        return []
    argument = {"uri": uri, "range": {"start": {"line": rng.start.line, "character": rng.start.character},
                                      "end": {"line": rng.end.line, "character": rng.end.character}}}
    return [types.CodeAction(title=ACTION_TITLE, kind=types.CodeActionKind.RefactorRewrite,
                             command=types.Command(title=ACTION_TITLE, command=REWRITE, arguments=[argument]))]


async def rewrite(ls: DgEditServer, args: RewriteArguments) -> dict[str, Any]:
    around, selection = documents.span_at(ls, args.uri, args.range)
    if not selection.strip():
        raise JsonRpcInvalidParams("dg-edit.rewrite needs a non-empty selection")
    engine = await ls.host.get()
    settings = ls.settings
    extra = other_documents(ls, args.uri)  # read on the loop, where the workspace changes
    record: dict[str, Any] = {"kind": "rewrite", "uri": args.uri, "version": around.version,
                              "requestId": ls.protocol.msg_id}
    async with ls.tracked(args.uri, around.version, "rewrite"):
        reporter = await StepReporter.for_command(ls, args.uri, around.version, "dg-edit: rewriting")
        with reporter:
            done = await run_events(ls, lambda: engine.stream_rewrite(
                around.prefix, selection, around.suffix, instruction=args.instruction, strength=args.strength,
                seed=0, session=args.uri, extra=extra, **dict(settings.sampling)), reporter)
            reporter.done(done)
            ls.check_current(args.uri, around.version)
        result = await _apply(ls, args.uri, around.version, around.range, done.text, "dg-edit: rewrite selection")
    record.update(ms=round(done.ms, 1), steps=done.steps, applied=result["applied"])
    ls.stats.recent.append(record)
    return result


async def infill(ls: DgEditServer, args: InfillArguments) -> dict[str, Any]:
    cursor = documents.cursor_at(ls, args.uri, args.position)
    record: dict[str, Any] = {"kind": "infill", "uri": args.uri, "version": cursor.version,
                              "requestId": ls.protocol.msg_id}
    async with ls.tracked(args.uri, cursor.version, "infill"):
        reporter = await StepReporter.for_command(ls, args.uri, cursor.version, "dg-edit: infilling")
        with reporter:
            texts = await infill_texts(ls, cursor, 1, reporter, record)
            ls.check_current(args.uri, cursor.version)
        text = texts[0] if texts else ""
        here = cursor.range
        result = (await _apply(ls, args.uri, cursor.version, here, text, "dg-edit: infill") if text
                  else {"applied": False, "text": "", "version": cursor.version, "failureReason": "empty infill"})
    record["applied"] = result["applied"]
    ls.stats.recent.append(record)
    return result


async def _apply(ls: DgEditServer, uri: str, version: int, rng: types.Range, text: str, label: str) -> dict:
    edit = types.TextEdit(range=rng, new_text=text)
    workspace_caps = ls.client_capabilities.workspace
    edit_caps = workspace_caps.workspace_edit if workspace_caps is not None else None
    if edit_caps is not None and edit_caps.document_changes:
        workspace_edit = types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version), edits=[edit])])
    else:
        workspace_edit = types.WorkspaceEdit(changes={uri: [edit]})
    try:
        async with asyncio.timeout(ls.settings.request_timeout_s):
            answer = await ls.workspace_apply_edit_async(
                types.ApplyWorkspaceEditParams(edit=workspace_edit, label=label))
    except TimeoutError:
        raise RequestFailed("dg-edit: the editor did not answer workspace/applyEdit") from None
    result: dict[str, Any] = {"applied": bool(answer.applied), "text": text, "version": version}
    if answer.failure_reason:
        result["failureReason"] = answer.failure_reason
    return result


def register(server: DgEditServer) -> None:
    server.feature(types.TEXT_DOCUMENT_CODE_ACTION,
                   types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite]))(code_action)
    server.command(REWRITE)(rewrite)
    server.command(INFILL)(infill)
