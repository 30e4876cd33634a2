"""dg-edit language server: DiffusionGemma infilling and selection rewrite over LSP (pygls 2).

Run: `dg-edit lsp` (stdio) or `dg-edit lsp --tcp 127.0.0.1:2087`, or `python -m dg_edit.lsp.server`.
Options: `--model DIR --device --dtype --quantize --device-map --max-memory --compile --threads --config FILE`
(as every dg-edit command; a model the memory plan says cannot fit is reported to every request),
`--log-file FILE`, `--log-level LEVEL`. Logs go to stderr (stdout is the protocol).

Model loading: `initialize` is answered at once; torch/transformers are imported from process start,
the weights load in the background right after `initialize` (the model path may come from
`initializationOptions`), followed by a one-step warm-up. Requests that arrive earlier wait for it.

Protocol reference (for editor plug-ins)
========================================

Server capabilities (all positions and ranges are in the negotiated encoding)
-------------------
positionEncoding "utf-8" when the client offers it, else "utf-16" · textDocumentSync incremental ·
inlineCompletionProvider · completionProvider · codeActionProvider (refactor.rewrite) ·
executeCommandProvider ["dg-edit.accepted", "dg-edit.rewrite", "dg-edit.infill"].

Requests (client → server)
--------------------------
textDocument/inlineCompletion   InlineCompletionParams → InlineCompletionList
    triggerKind Automatic (2) → at most 1 item (seed 0); Invoked (1) → up to `candidates` distinct
    items (seeds 0, 1, ...; deterministic). An empty infill gives an empty list.
    Without selectedCompletionInfo: item.range is the empty range at the cursor, insertText the
    infill. With it: item.range = selected.range and insertText = selected.text + infill.
    item.command = {command: "dg-edit.accepted", arguments: [{uri, version, requestId, index, length}]}.
    Pass `workDoneToken` to get `$/progress`. Language not enabled → empty list.
    Results are remembered per (uri, version, cursor): asking again at the same place in the same
    version answers at once (an Invoked request after an Automatic one only runs the new seeds).
    Typed-ahead: when the user has typed the beginning of the previous answer at its cursor (same
    suffix), the rest of that answer comes back without a model call (stats record typed_ahead).
    Open documents are prefilled while the editor is quiet (idle_prefill_ms), so a request anywhere
    in them encodes only the chunk holding its cursor.
    When a next-edit suggestion was already computed for this version and cursor (below) and one of
    its edits lies on the cursor's line and covers the cursor, it comes last, as an item whose
    range is the edit's range (arguments kind "next_edit"); no model call is made for it.
textDocument/copilotInlineEdit  {textDocument: {uri, version}, position, workDoneToken?} →
    {edits: [{range, text, textDocument: {uri, version}, command: dg-edit.accepted [{uri, version,
    requestId, kind: "next_edit", index, length}]}]}: the edits the user will likely make next near
    the position (Engine.next_edit, aimed by the document's edit history, which every didChange
    feeds). The version must be the document's current one; a stale version, or a document changed
    while the model ran, answers {edits: []}. Answers at once when the engine prepared it while the
    editor was quiet (after each didChange the document is handed over with the cursor at the end of
    the last edit). dgEdit/canvas and $/progress as for inline completion; errors as below.
textDocument/completion         fallback: one item (none if the infill is empty), label = its first
                                line, textEdit inserts the infill at the cursor; isIncomplete = true.
textDocument/codeAction         non-empty range → [{title: "Rewrite selection (dg-edit)",
                                kind: "refactor.rewrite", command: dg-edit.rewrite [{uri, range}]}]
workspace/executeCommand
    dg-edit.rewrite  [{uri, range, instruction?: str, strength?: float 0..1 (0.6)}]
    dg-edit.infill   [{uri, position}]
        Both run the model, then send workspace/applyEdit (server → client; a versioned
        TextDocumentEdit when the client supports documentChanges) and return
        {applied: bool, text: str, version: int, failureReason?: str}.
    dg-edit.accepted [{...the item's arguments}] → null; counted in dgEdit/stats.
dgEdit/stats                    (custom, no params) → {requests, completed, cancelled, stale, errors,
                                accepted, inflight, engine: {state: idle|loading|ready|failed, load_ms,
                                model?, error?}, settings, recent: [{kind, uri, version, requestId, ms,
                                cached, encoded, prefix_tokens, steps, typed_ahead, items|applied}],
                                cache: null | {bytes_per_token, budget_bytes, bytes, window_tokens,
                                documents: [{session (the uri), strips, tokens, bytes}], prefill: {pending, running,
                                encoded, passes, budget_full, error}},
                                next_edit: {history: null | [{uri, edits: [{start, end, text, old_text, score}]}],
                                prepared_all: null | bool (no next-edit preparation pending or running)}}
$/cancelRequest                 stops the denoising loop within one step; answer: error -32800.

Notifications (server → client)
-------------------------------
dgEdit/canvas    {uri, version, requestId, step, text, done}: one per denoising step (done=false,
                 steps count up from 1) with the current draft of the infill (or, for
                 dg-edit.rewrite, of the replacement), then exactly one done=true with the final
                 text ("" if the request was cancelled, went stale or failed; step 0 when the answer
                 came from memory). requestId is the JSON-RPC id of the request
                 (inlineCompletion / completion / executeCommand). For Invoked inline completions
                 only the first candidate's steps are sent. Next-edit requests add kind: "next_edit"
                 (their draft is the rewritten window).
$/progress       work-done begin / report "step i/N" (percentage) / end, on the client's
                 workDoneToken (inline completion, completion) or a server-created token
                 (window/workDoneProgress/create, for the commands, if the client supports it).
window/logMessage   model failures and invalid configuration; window/showMessage for the latter.

Errors
------
-32602 InvalidParams    unknown document (not opened), a position outside the document (a line past
                        its end, or a character past the end of its line: stricter than the spec's
                        clamping, since such a position means the editor's text and ours differ),
                        malformed params, input the engine rejects.
-32800 RequestCancelled after $/cancelRequest.
-32801 ContentModified  the document changed (didChange to a newer version) while the request ran:
                        no result is ever sent for an older version.
-32803 RequestFailed    the model could not be loaded (message says why), or the request ran longer
                        than request_timeout_s.
-32603 InternalError    a model failure (also logged with window/logMessage); the server lives on.

Configuration: initializationOptions / workspace/didChangeConfiguration
-----------------------------------------------------------------------
Keys of dg_edit.config.Settings, flat or under "dgEdit" (unknown keys → error message, ignored):
    model (str, "" = embedded), max_new_tokens (48), single_line_tokens (32, when the cursor's line has
    text), candidates (3), languages (["*"] or languageIds),
    max_prefix_tokens (2048), max_suffix_tokens (512), suffix_head_tokens (16), max_extra_tokens (1024,
    chunks of the other open documents ahead of the prefix; 0 = none), debounce_ms (150,
    for plug-ins), cache_budget_mb (1024), idle_prefill (true), idle_prefill_ms (500), typed_ahead
    (true), sampling ({...}) — and sampling names at the top level, e.g.
    max_denoising_steps, t_min, t_max, entropy_bound; request_timeout_s (60). A changed `model`
    reloads the engine. Each didChangeConfiguration replaces the previous one (applied on top of the
    command line + initializationOptions, not of the last change). An empty/null `settings` makes the server
    pull the "dgEdit" section with workspace/configuration (if the client supports it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pygls.exceptions import JsonRpcException

from dg_edit.errors import UsageError
from dg_edit.startup import add_model_arguments, load_engine, load_options, settings_from_args
from dg_edit.distributed import add_parallel_arguments
from dg_edit.config import Settings

from . import completion, config, documents, inline, next_edit, rewrite, stats
from .engine_host import EngineHost, preload_imports
from .state import DgEditServer

FEATURES = (documents, config, inline, completion, rewrite, next_edit, stats)


def build_server(settings: Settings | None = None, host: EngineHost | None = None) -> DgEditServer:
    """A server with every feature module registered (one feature per module)."""
    server = DgEditServer(settings or Settings(), host or EngineHost())
    for module in FEATURES:
        module.register(server)
    return server


def _parse_tcp(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--tcp must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


class _AnsweredErrors(logging.Filter):
    """pygls logs a traceback for every request answered with an error; for the routine ones
    (cancelled, stale, invalid params) the answer is the whole story, so keep them out of the log."""

    ROUTINE = (-32800, -32801, -32602)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, JsonRpcException) and exc.code in self.ROUTINE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dg-edit lsp", description="dg-edit language server (stdio by default)")
    parser.add_argument("--tcp", metavar="HOST:PORT", default=None, help="serve one client over TCP instead")
    parser.add_argument("--stdio", action="store_true",
                        help="serve over stdin/stdout (the default; accepted because many clients append it)")
    parser.add_argument("--log-file", default=None, help="append logs here instead of stderr")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    add_model_arguments(parser)
    add_parallel_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)  # a bad --config FILE is a UsageError already
    # Only the cheap check here (dg_edit.engine imports torch, which would delay `initialize` by
    # seconds); the full check runs when the model loads and is reported to the editor.
    if settings.model and not Path(settings.model).expanduser().is_dir():
        raise UsageError(f"model directory not found: {settings.model}")
    tcp = _parse_tcp(args.tcp) if args.tcp else None
    target = {"filename": args.log_file} if args.log_file else {"stream": sys.stderr}
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            **target)
    except ValueError as e:
        raise UsageError(f"--log-level: {e}") from None
    logging.getLogger("pygls").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("pygls.protocol.json_rpc").addFilter(_AnsweredErrors())
    # --parallel (torchrun): every rank loads its shard now; only rank 0 returns, to serve
    launched = load_engine(args) if args.parallel else None
    preload_imports()
    server = build_server(settings, EngineHost(options=load_options(args), threads=args.threads, engine=launched))
    try:
        if tcp is not None:
            server.start_tcp(*tcp)
        else:
            server.start_io()
    finally:
        server.host.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"dg-edit lsp: {e}", file=sys.stderr)
        sys.exit(2)
