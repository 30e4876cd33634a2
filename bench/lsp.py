"""Keystroke → inline-completion latency of the language server over stdio, typing and jumping.

A real `python -m dg_edit.lsp.server` process, driven by pygls's LanguageClient like an editor, on a
2,000-line Python file (the standard library's argparse, repeated). Two patterns, each with idle
prefill off and on, measured side by side in one run (the phases alternate, `--rounds` times):

- typing: in a function body around line 1,500, type a few characters (incremental didChange, one
  per character), ask for an inline completion (automatic trigger), wait for it, repeat;
- jumping: open the file, stay idle (with prefill: until the server has prefilled it), then move
  the cursor 80 lines down 12 times and back up 12 times at other lines (40 lines off), asking at
  the middle of each line's code.

Printed beside the targets: p50 / p95 latency from the request to its answer, and prefix tokens the
encoder ran per request (from `dgEdit/stats`: every inline-completion record carries `encoded`,
`prefix_tokens` and `typed_ahead`), then the ratios of each pattern with prefill on over off. The
machine is shared: absolute times move with the load (printed), the ratios much less.

Targets: jumps after prefill p50 <= 150 ms, p95 <= 300 ms (embedded model); typing no slower than
today: give `--baseline-python` a Python whose `dg_edit` is the code before this change (e.g. a
venv with `pip install --no-deps -e` of an older checkout) to run the typing pattern on it too.
The editor's debounce (settings.debounce_ms) is not included: it is the editor's wait before
sending, the same for every backend.

    OMP_NUM_THREADS=1 python bench/lsp.py [--model DIR] [--rounds 1] [--requests 30] [--chars 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

from dg_edit.testing import plain

TYPING_TARGETS = {"p50_ms": 200.0, "p95_ms": 400.0, "reencoded": 0.05}
JUMP_TARGETS = {"p50_ms": 150.0, "p95_ms": 300.0}
JUMP_LINES, JUMPS = 80, 12

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


def jump_targets(text: str, start: int) -> list[t.Position]:
    """12 jumps of 80 lines down from `start`, then 12 back up at the lines 40 off; each at the middle
    of the line's code (the next line with code when the line is blank)."""
    lines = text.split("\n")
    down = [start + JUMP_LINES * k for k in range(JUMPS)]
    up = [down[-1] - JUMP_LINES // 2 - JUMP_LINES * k for k in range(JUMPS)]
    out = []
    for line in down + up:
        while not lines[line].strip():
            line += 1
        code = lines[line]
        indent = len(code) - len(code.lstrip())
        out.append(t.Position(line=line, character=indent + (len(code) - indent) // 2))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Result:
    """One pattern run: latency per request and the server's records of the same requests."""

    latencies: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    note: str = ""

    def extend(self, other: "Result") -> None:
        self.latencies += other.latencies
        self.ids += other.ids
        self.records += other.records
        self.note = "; ".join(n for n in (self.note, other.note) if n)

    @property
    def encoded(self) -> list[int]:
        return [r["encoded"] for r in self.records]

    def model_calls(self) -> list[float]:
        """Latencies of the requests that ran the model (not typed ahead)."""
        by_id = {r["requestId"]: r for r in self.records}
        return [ms for ms, rid in zip(self.latencies, self.ids) if not by_id.get(rid, {}).get("typed_ahead")]


class Server:
    """One language server process and the client driving it."""

    def __init__(self, python: str, model: str | None, options: dict):
        self.python, self.model, self.options = python, model, options
        self.client = LanguageClient("dg-edit-bench", "0")
        self.client.feature("dgEdit/canvas")(lambda ls, params: None)  # drafts an editor would animate
        self.client.feature(t.WINDOW_LOG_MESSAGE)(lambda ls, params: None)
        self.versions: dict[str, int] = {}
        self.ids = 0

    async def start(self) -> dict:
        args = ["-m", "dg_edit.lsp.server", "--log-level", "WARNING"] + (["--model", self.model] if self.model else [])
        env = {**os.environ}
        env.setdefault("OMP_NUM_THREADS", "1")
        # cwd "/": a Python's own install decides which dg_edit runs, not a checkout in the current directory
        await self.client.start_io(self.python, *args, env=env, cwd="/")
        await self.client.initialize_async(t.InitializeParams(capabilities=t.ClientCapabilities(),
                                                              initialization_options=self.options))
        self.client.initialized(t.InitializedParams())
        while (engine := (await self.stats())["engine"])["state"] in ("idle", "loading"):
            await asyncio.sleep(0.1)
        if engine["state"] != "ready":
            raise SystemExit(f"model failed to load: {engine.get('error')}")
        return engine

    async def stop(self) -> None:
        await self.client.shutdown_async(None)
        self.client.exit(None)
        await asyncio.sleep(0.2)
        await self.client.stop()

    async def stats(self) -> dict:
        return plain(await self.client.protocol.send_request_async("dgEdit/stats", None))

    def configure(self, options: dict) -> None:
        self.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings=options))

    def open(self, name: str, text: str) -> str:
        uri = f"file:///bench/{name}.py"
        self.versions[uri] = 1
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        return uri

    def close(self, uri: str) -> None:
        self.client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=uri)))

    def type_text(self, uri: str, pos: t.Position, s: str) -> t.Position:
        for ch in s:
            self.versions[uri] += 1
            self.client.text_document_did_change(t.DidChangeTextDocumentParams(
                text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
                content_changes=[t.TextDocumentContentChangePartial(range=t.Range(start=pos, end=pos), text=ch)]))
            pos = t.Position(line=pos.line + 1, character=0) if ch == "\n" else \
                t.Position(line=pos.line, character=pos.character + 1)
        return pos

    async def ask(self, uri: str, pos: t.Position) -> tuple[str, float]:
        self.ids += 1
        msg_id = f"bench-{self.ids}"
        params = t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
            text_document=t.TextDocumentIdentifier(uri=uri), position=pos)
        t0 = time.perf_counter()
        await self.client.protocol.send_request_async(t.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id)
        return msg_id, (time.perf_counter() - t0) * 1000

    async def records(self, msg_ids: list[str]) -> list[dict]:
        by_id = {r["requestId"]: r for r in (await self.stats())["recent"] if r.get("kind") == "inline"}
        return [by_id[i] for i in msg_ids if i in by_id]

    async def wait_prefilled(self, uri: str, timeout: float) -> tuple[float, dict]:
        """Seconds until idle prefill of `uri` is done, and the cache figures then."""
        t0 = time.perf_counter()
        while True:
            cache = (await self.stats())["cache"]
            done = cache and cache["prefill"]["pending"] == 0 and any(d["session"] == uri for d in cache["documents"])
            if done or time.perf_counter() - t0 > timeout:
                return time.perf_counter() - t0, cache
            await asyncio.sleep(0.1)


async def typing(server: Server, text: str, name: str, args, prefill: bool) -> Result:
    uri = server.open(name, text)
    line = cursor_line(text, int(args.lines * 0.75))
    pos = server.type_text(uri, t.Position(line=line, character=0), "        \n")  # a fresh line above `return`
    pos = t.Position(line=line, character=8)
    note = ""
    if prefill:
        seconds, cache = await server.wait_prefilled(uri, args.prefill_timeout)
        note = f"prefilled in {seconds:.1f} s"
    typed = iter(TYPED * 10)
    out = Result(note=note)
    for i in range(args.warmup + args.requests):
        pos = server.type_text(uri, pos, "".join(next(typed) for _ in range(args.chars)))
        msg_id, ms = await server.ask(uri, pos)
        if i >= args.warmup:
            out.latencies.append(ms)
            out.ids.append(msg_id)
    out.records = await server.records(out.ids)
    server.close(uri)
    return out


async def jumping(server: Server, text: str, name: str, args, prefill: bool) -> Result:
    uri = server.open(name, text)
    if prefill:
        seconds, cache = await server.wait_prefilled(uri, args.prefill_timeout)
        doc = next((d for d in cache["documents"] if d["session"] == uri), {})
        note = (f"prefilled in {seconds:.1f} s: {doc.get('tokens', 0):,} tokens in {doc.get('strips', 0)} windows, "
                f"{cache['bytes'] / 2**20:.0f} MiB at {cache['bytes_per_token']:,} B/token")
    else:
        await asyncio.sleep(args.idle)
        note = f"idle {args.idle:g} s without prefill"
    out = Result(note=note)
    for pos in jump_targets(text, args.jump_start):
        msg_id, ms = await server.ask(uri, pos)
        out.latencies.append(ms)
        out.ids.append(msg_id)
    out.records = await server.records(out.ids)
    server.close(uri)
    return out


def row(name: str, r: Result, targets: dict) -> str:
    p50, p95 = percentile(r.latencies, 0.5), percentile(r.latencies, 0.95)
    enc = r.encoded
    ok50 = "yes" if p50 <= targets["p50_ms"] else "NO"
    ok95 = "yes" if p95 <= targets["p95_ms"] else "NO"
    typed = sum(bool(x.get("typed_ahead")) for x in r.records)
    prefix = statistics.mean(x["prefix_tokens"] or 0 for x in r.records)
    steps = statistics.mean(x["steps"] for x in r.records)
    server = percentile([x["ms"] for x in r.records], 0.5)
    return (f"{name:16} {p50:6.0f} {p95:6.0f} {server:7.0f}   {statistics.mean(enc):7.1f} {max(enc):5d} {prefix:7.0f} "
            f"{steps:5.1f} {typed:5d}   {targets['p50_ms']:3.0f}/{targets['p95_ms']:.0f} ms {ok50:>4}/{ok95:<4}")


async def run(args: argparse.Namespace) -> int:
    text = python_file(args.lines)
    load_before = os.getloadavg()
    options = {"idle_prefill_ms": args.idle_prefill_ms, "typed_ahead": not args.no_typed_ahead}
    ours = Server(sys.executable, args.model, options)
    engine = await ours.start()
    baseline = None
    if args.baseline_python:
        baseline = Server(args.baseline_python, args.model, {})
        await baseline.start()
    results: dict[str, Result] = {k: Result() for k in ("typing off", "typing on", "jumps off", "jumps on",
                                                        "typing baseline")}
    for r in range(args.rounds):
        # One engine per setting: each configuration change re-wraps the model with empty caches. The
        # order alternates between rounds, so a load that drifts during the run hits both sides.
        for prefill in ((False, True) if r % 2 == 0 else (True, False)):
            ours.configure({**options, "idle_prefill": prefill})
            state = "on" if prefill else "off"
            if "jumps" in args.patterns:
                results[f"jumps {state}"].extend(await jumping(ours, text, f"jump-{state}-{r}", args, prefill))
            if "typing" in args.patterns:
                results[f"typing {state}"].extend(await typing(ours, text, f"type-{state}-{r}", args, prefill))
            if baseline is not None and prefill == (r % 2 == 1) and "typing" in args.patterns:  # between ours
                results["typing baseline"].extend(await typing(baseline, text, f"type-base-{r}", args, False))
    await ours.stop()
    if baseline is not None:
        await baseline.stop()
    load_after = os.getloadavg()

    print(f"model {engine.get('model')} · canvas {engine.get('canvas_length')} · max {engine.get('max_denoising_steps')} "
          f"denoising steps · OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} · {os.cpu_count()} CPUs")
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min) · {args.rounds} round(s) · "
          f"file {args.lines} lines · typing: {args.chars} characters between requests, {args.requests} requests "
          f"(+{args.warmup} warm-up) · jumps: {2 * JUMPS} per round, {JUMP_LINES} lines down then up from line "
          f"{args.jump_start + 1}")
    for name, r in results.items():
        if r.note:
            print(f"  {name}: {r.note}")
    print()
    print(f"{'pattern':16} {'p50':>6} {'p95':>6} {'server':>7}   {'encoded':>7} {'':5} {'prefix':>7} {'steps':>5} "
          f"{'typed':>5}   {'target':>10} {'ok':>9}")
    print(f"{'':16} {'ms':>6} {'ms':>6} {'p50 ms':>7}   {'mean':>7} {'max':>5} {'tokens':>7} {'mean':>5} "
          f"{'ahead':>5}   {'p50/p95':>10}")
    for name, r in results.items():
        if r.latencies:
            print(row(name, r, JUMP_TARGETS if name.startswith("jumps") else TYPING_TARGETS))
    print()

    def ratio(a: str, b: str, q: float) -> str:
        return f"{percentile(results[a].latencies, q) / percentile(results[b].latencies, q):.2f}"

    print(f"side by side (same run{', typed-ahead off' if args.no_typed_ahead else ''}):")
    if "jumps" in args.patterns:
        print(f"  jumps, prefill on / off:      p50 {ratio('jumps on', 'jumps off', 0.5)}   p95 "
              f"{ratio('jumps on', 'jumps off', 0.95)}")
    if "typing" not in args.patterns:
        return 0
    print(f"  typing, prefill on / off:     p50 {ratio('typing on', 'typing off', 0.5)}   p95 "
          f"{ratio('typing on', 'typing off', 0.95)}")
    if results["typing baseline"].latencies:
        print(f"  typing, this / baseline:      p50 {ratio('typing on', 'typing baseline', 0.5)}   p95 "
              f"{ratio('typing on', 'typing baseline', 0.95)}   (target <= 1: no slower than before)")
        ours_model, base = results["typing on"].model_calls(), results["typing baseline"].latencies
        print(f"    model calls only (no typed-ahead answers): p50 "
              f"{percentile(ours_model, 0.5) / percentile(base, 0.5):.2f}   p95 "
              f"{percentile(ours_model, 0.95) / percentile(base, 0.95):.2f}")
    typing_on = results["typing on"].records
    shares = [r["encoded"] / r["prefix_tokens"] for r in typing_on if r.get("prefix_tokens")]
    if shares:
        print(f"  typing, prefix re-encoded per request: {statistics.mean(shares):.1%} "
              f"(target <= {TYPING_TARGETS['reencoded']:.0%})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the four phases (they alternate)")
    parser.add_argument("--requests", type=int, default=30, help="typing: requests measured per phase")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chars", type=int, default=3, help="typing: characters typed between requests")
    parser.add_argument("--jump-start", type=int, default=299, help="jumping: first line (0-based)")
    parser.add_argument("--idle", type=float, default=5.0, help="jumping without prefill: idle seconds first")
    parser.add_argument("--idle-prefill-ms", type=int, default=500)
    parser.add_argument("--prefill-timeout", type=float, default=600.0)
    parser.add_argument("--patterns", nargs="+", choices=("typing", "jumps"), default=["typing", "jumps"])
    parser.add_argument("--no-typed-ahead", action="store_true",
                        help="every typing request runs the model (compare model calls with --baseline-python)")
    parser.add_argument("--baseline-python", default=None,
                        help="also run the typing pattern on this Python's dg_edit (the code before a change)")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
