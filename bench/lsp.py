"""Keystroke → inline-completion latency of the language server over stdio, on this CPU.

A real `python -m dg_edit.lsp.server` process, driven by pygls's LanguageClient like an editor:
open a 2,000-line Python file, then in a function body around line 1,500 type a few characters
(incremental didChange, one per character), ask for an inline completion (automatic trigger), wait
for the answer, and repeat. Reported side by side with the targets:

    p50 / p95 latency (ms) from the request to its answer      targets <= 200 / <= 400
    share of the prefix re-encoded per request                  target  <= 5 %

The re-encoded share comes from the server's `dgEdit/stats` request: each inline-completion record
carries `encoded` (prefix tokens the encoder ran this request) and `prefix_tokens` (the windowed
prefix). The editor's debounce (settings.debounce_ms) is not included: it is the editor's wait
before sending, the same for every backend.

    OMP_NUM_THREADS=1 python bench/lsp.py [--model DIR] [--requests 30] [--chars 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

TARGETS = {"p50_ms": 200.0, "p95_ms": 400.0, "reencoded": 0.05}

# What the simulated user types, one character per didChange.
TYPED = ("result = self._parse_known_args(arg_strings, namespace)\n        "
         "if result is None:\n            raise ValueError('no result')\n        "
         "for name, value in sorted(vars(result).items()):\n            print(name, value)\n        ")


def python_file(lines: int) -> str:
    """A real 2,000-line Python file: the standard library's argparse, repeated if it is shorter."""
    import argparse as source_module

    text = Path(source_module.__file__).read_text(encoding="utf-8").splitlines(keepends=True)
    out = []
    while len(out) < lines:
        out.extend(text[: lines - len(out)])
    return "".join(out)


def cursor_line(text: str, near: int) -> int:
    """The first `return` line in a function body at or after line `near` (we type just above it)."""
    lines = text.split("\n")
    for i in range(near, len(lines)):
        if lines[i].startswith("        return"):
            return i
    raise SystemExit("no function body found to type in")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run(args: argparse.Namespace) -> int:
    client = LanguageClient("dg-edit-bench", "0")
    canvas_steps = []  # an editor would animate these drafts; we only count them
    client.feature("dgEdit/canvas")(lambda ls, params: canvas_steps.append(params.step))
    server_args = ["-m", "dg_edit.lsp.server", "--log-level", "WARNING"]
    if args.model:
        server_args += ["--model", args.model]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    await client.start_io(sys.executable, *server_args, env=env)
    t0 = time.perf_counter()
    await client.initialize_async(t.InitializeParams(capabilities=t.ClientCapabilities(), initialization_options={}))
    init_ms = (time.perf_counter() - t0) * 1000
    client.initialized(t.InitializedParams())

    text = python_file(args.lines)
    uri = "file:///bench/argparse_2000.py"
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
    line = cursor_line(text, int(args.lines * 0.75))
    version = 1
    # A fresh line above the `return`, indented like the body: the user starts typing there.
    pos = t.Position(line=line, character=0)

    def type_text(s: str) -> None:
        nonlocal version, pos
        for ch in s:
            version += 1
            client.text_document_did_change(t.DidChangeTextDocumentParams(
                text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[t.TextDocumentContentChangePartial(range=t.Range(start=pos, end=pos), text=ch)]))
            pos = t.Position(line=pos.line + 1, character=0) if ch == "\n" else \
                t.Position(line=pos.line, character=pos.character + 1)

    type_text("        \n")
    pos = t.Position(line=line, character=8)

    async def stats() -> dict:
        return _plain(await client.protocol.send_request_async("dgEdit/stats", None))

    t0 = time.perf_counter()
    while (engine := (await stats())["engine"])["state"] in ("idle", "loading"):
        await asyncio.sleep(0.1)
    if engine["state"] != "ready":
        print(f"model failed to load: {engine.get('error')}", file=sys.stderr)
        return 1
    ready_ms = (time.perf_counter() - t0) * 1000 + init_ms

    latencies: list[float] = []
    request_ids: list[str] = []
    typed = iter(TYPED * 10)
    for i in range(args.warmup + args.requests):
        type_text("".join(next(typed) for _ in range(args.chars)))
        params = t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
            text_document=t.TextDocumentIdentifier(uri=uri), position=pos)
        msg_id = f"bench-{i}"
        t1 = time.perf_counter()
        await client.protocol.send_request_async(t.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id)
        if i >= args.warmup:
            latencies.append((time.perf_counter() - t1) * 1000)
            request_ids.append(msg_id)

    records = {r["requestId"]: r for r in (await stats())["recent"] if r.get("kind") == "inline"}
    mine = [records[r] for r in request_ids if r in records]
    shares = [r["encoded"] / r["prefix_tokens"] for r in mine if r.get("prefix_tokens")]
    await client.shutdown_async(None)
    client.exit(None)
    await asyncio.sleep(0.2)
    await client.stop()

    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    share = statistics.mean(shares) if shares else float("nan")
    print(f"model {engine.get('model')} · canvas {engine.get('canvas_length')} · "
          f"max {engine.get('max_denoising_steps')} denoising steps · OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print(f"file {args.lines} lines · cursor at line {line + 1} · {args.chars} characters typed between "
          f"requests · {len(latencies)} requests (+{args.warmup} warm-up)")
    print(f"initialize answered in {init_ms:.0f} ms; model ready {ready_ms:.0f} ms after start")
    server_ms = [r["ms"] for r in mine]
    by_id = dict(zip(request_ids, latencies))
    overhead = [by_id[r["requestId"]] - r["ms"] for r in mine]
    per_step = [r["ms"] / r["steps"] for r in mine if r.get("steps")]
    print(f"prefix tokens per request: mean {statistics.mean(r['prefix_tokens'] for r in mine):.0f}; "
          f"denoising steps: mean {statistics.mean(r['steps'] for r in mine):.1f}; "
          f"dgEdit/canvas notifications: {len(canvas_steps)}")
    print(f"where the time goes (p50): model {percentile(server_ms, 0.5):.0f} ms "
          f"(~{percentile(per_step, 0.5):.0f} ms per denoising step incl. prefill), "
          f"LSP transport + server overhead {percentile(overhead, 0.5):.1f} ms")
    print()
    print(f"{'metric':32} {'measured':>10} {'target':>10}  ok")
    rows = [("keystroke→completion p50 (ms)", p50, TARGETS["p50_ms"], f"{p50:.0f}", f"<= {TARGETS['p50_ms']:.0f}"),
            ("keystroke→completion p95 (ms)", p95, TARGETS["p95_ms"], f"{p95:.0f}", f"<= {TARGETS['p95_ms']:.0f}"),
            ("prefix re-encoded per request", share, TARGETS["reencoded"], f"{share:.1%}",
             f"<= {TARGETS['reencoded']:.0%}")]
    for name, value, target, shown, target_shown in rows:
        print(f"{name:32} {shown:>10} {target_shown:>10}  {'yes' if value <= target else 'NO'}")
    if shares:
        print(f"(re-encoded share per request: max {max(shares):.1%}, min {min(shares):.1%})")
    return 0


def _plain(value):
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chars", type=int, default=3, help="characters typed between requests")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
