"""Soak: a fixed count of requests against the real websocket service and language server, from several
client processes over loopback, with cancels and disconnects mixed in.

Why: an editor backend runs for days. Whatever a request leaves behind (a task, a thread, a cache
entry, a queued frame) adds up; this drives both servers long enough for that to show, and reports:
requests served, final answers by kind, unexpected errors, p50/p95 latency (request to final frame
or response), resident memory of each server after warm-up and at the end (VmRSS from
/proc/PID/status), thread counts, and what the servers themselves report as in flight at the end
(/healthz for the service, dgEdit/stats for the language server).

Targets: no unexpected errors, memory growth under 5 % after warm-up, nothing left in flight, no
thread growth.

    OMP_NUM_THREADS=1 python bench/soak.py                       # 10,000 requests, embedded model
    OMP_NUM_THREADS=1 python bench/soak.py --requests 2000 --model /work/tiny/model --json soak.json

The request mix per websocket client: infills with a small budget, 1 in 10 cancelled after its first
draft, 1 in 20 abandoned by dropping the connection mid-stream (the client reconnects), 1 in 10
rewrites. The language-server client types into one document (didChange) and asks for an inline
completion after each edit, cancelling 1 in 10 ($/cancelRequest after it was sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dg_edit.serve_process import ServeProcess, dg_edit_command  # noqa: E402

PROMPTS = [
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("import os\n\ndef list_files(path):\n    ", "\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = ", "\n"),
    ("for i in range(10):\n    ", "\n"),
]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads of a process, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------------------------- websocket client
def ws_worker(args: tuple) -> dict:
    url, count, seed, max_new_tokens, concurrency = args
    return asyncio.run(_ws_worker(url, count, seed, max_new_tokens, concurrency))


async def _ws_worker(url: str, count: int, seed: int, max_new_tokens: int, concurrency: int) -> dict:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    rng = random.Random(seed)
    finals: dict[str, int] = {}
    latencies: list[float] = []
    unexpected: list[str] = []
    sent = 0

    async def one_connection(quota: int) -> None:
        nonlocal sent
        done_here = 0
        while done_here < quota:
            async with connect(url, max_size=None) as ws:
                while done_here < quota:
                    n = min(concurrency, quota - done_here)
                    plans, started = {}, {}
                    for _ in range(n):
                        rid = uuid.uuid4().hex[:12]
                        roll = rng.random()
                        plan = "disconnect" if roll < 0.05 else "cancel" if roll < 0.15 else "run"
                        prefix, suffix = rng.choice(PROMPTS)
                        if rng.random() < 0.1:
                            frame = {"type": "rewrite", "id": rid, "prefix": prefix, "selection": "x + 1",
                                     "suffix": suffix, "strength": 0.5, "seed": rng.randrange(1000)}
                        else:
                            frame = {"type": "infill", "id": rid, "prefix": prefix, "suffix": suffix,
                                     "max_new_tokens": max_new_tokens, "seed": rng.randrange(1000)}
                        plans[rid] = plan
                        started[rid] = time.perf_counter()
                        await ws.send(json.dumps(frame))
                        sent += 1
                    pending = set(plans)
                    dropped = False
                    try:
                        while pending:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), 300))
                            rid = frame.get("id")
                            if frame["type"] == "step" and rid in pending:
                                if plans[rid] == "cancel":
                                    plans[rid] = "cancelled-sent"
                                    await ws.send(json.dumps({"type": "cancel", "id": rid}))
                                elif plans[rid] == "disconnect":
                                    ws.transport.abort()  # vanish mid-stream, no closing handshake
                                    dropped = True
                                    break
                            elif frame["type"] in ("done", "cancelled", "error"):
                                if frame["type"] == "error" and frame["code"] == "unknown_id":
                                    continue  # a cancel that crossed its request's final frame
                                kind = frame["type"] if frame["type"] != "error" else f"error:{frame['code']}"
                                finals[kind] = finals.get(kind, 0) + 1
                                if frame["type"] == "error":
                                    unexpected.append(f"{frame['code']}: {frame['message'][:200]}")
                                elif frame["type"] == "done":
                                    latencies.append((time.perf_counter() - started[rid]) * 1000)
                                pending.discard(rid)
                    except ConnectionClosed:
                        if not dropped:
                            raise
                    done_here += n
                    if dropped:
                        finals["disconnected"] = finals.get("disconnected", 0) + len(pending)
                        break

    await one_connection(count)
    return {"sent": sent, "finals": finals, "latencies": latencies, "unexpected": unexpected}


# ---------------------------------------------------------------------------------------------- LSP client
def lsp_worker(args: tuple) -> dict:
    host, port, count, seed, server_pid = args
    return asyncio.run(_lsp_worker(host, port, count, seed, server_pid))


async def _lsp_worker(host: str, port: int, count: int, seed: int, server_pid: int) -> dict:
    from lsprotocol import types as t
    from pygls.exceptions import JsonRpcException
    from pygls.lsp.client import LanguageClient

    rng = random.Random(seed)
    client = LanguageClient("dg-edit-soak", "0")
    client.feature("dgEdit/canvas")(lambda ls, p: None)
    client.feature(t.WINDOW_LOG_MESSAGE)(lambda ls, p: None)
    for _ in range(600):
        try:
            await client.start_tcp(host, port)
            break
        except OSError:
            await asyncio.sleep(0.1)
    await client.initialize_async(t.InitializeParams(capabilities=t.ClientCapabilities(),
                                                     initialization_options={"max_new_tokens": 8}))
    client.initialized(t.InitializedParams())
    uri = "file:///tmp/dg-edit-soak/doc.py"
    text = "import math\n\n\ndef area(r):\n    return "
    version = 1
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
    finals: dict[str, int] = {}
    latencies: list[float] = []
    unexpected: list[str] = []
    for i in range(count):
        # Type one character at the end (keep the document from growing without bound).
        lines = text.split("\n")
        if len(text) > 400:
            version += 1
            text = "import math\n\n\ndef area(r):\n    return "
            client.text_document_did_change(t.DidChangeTextDocumentParams(
                text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[t.TextDocumentContentChangeWholeDocument(text=text)]))
            lines = text.split("\n")
        ch = rng.choice("abcxyz_ (+1")
        end = t.Position(line=len(lines) - 1, character=len(lines[-1]))
        version += 1
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[t.TextDocumentContentChangePartial(range=t.Range(start=end, end=end), text=ch)]))
        text += ch
        lines = text.split("\n")
        pos = t.Position(line=len(lines) - 1, character=len(lines[-1]))
        msg_id = f"soak-{i}"
        params = t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
            text_document=t.TextDocumentIdentifier(uri=uri), position=pos)
        t0 = time.perf_counter()
        future = client.protocol.send_request_async(t.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id)
        if rng.random() < 0.1:
            await asyncio.sleep(rng.random() * 0.05)
            client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=msg_id))
        try:
            await asyncio.wait_for(future, 300)
            finals["done"] = finals.get("done", 0) + 1
            latencies.append((time.perf_counter() - t0) * 1000)
        except JsonRpcException as e:
            kind = "cancelled" if e.code == -32800 else f"error:{e.code}"
            finals[kind] = finals.get(kind, 0) + 1
            if e.code != -32800:
                unexpected.append(f"{e.code}: {e.message[:200]}")
    stats = await client.protocol.send_request_async("dgEdit/stats", None)
    await asyncio.sleep(1.0)
    status_at_end = proc_status(server_pid)  # before shutdown: the server exits with its one client
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return {"sent": count, "finals": finals, "latencies": latencies, "unexpected": unexpected,
            "inflight_at_end": stats.inflight, "status_at_end": status_at_end}


# ---------------------------------------------------------------------------------------------- driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        return json.loads(r.read())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_phase(pool, service, lsp_port, ws_count, lsp_count, clients, seed, max_new_tokens) -> list[dict]:
    per_client = [ws_count // clients + (1 if i < ws_count % clients else 0) for i in range(clients)]
    ws_jobs = [pool.apply_async(ws_worker, ((service.ws_url, n, seed + i, max_new_tokens, 2),))
               for i, n in enumerate(per_client) if n]
    lsp_job = pool.apply_async(lsp_worker, (("127.0.0.1", lsp_port, lsp_count, seed + 100),)) if lsp_count else None
    results = [("ws", j.get()) for j in ws_jobs]
    if lsp_job is not None:
        results.append(("lsp", lsp_job.get()))
    return results


def summarise(results: list[tuple[str, dict]]) -> dict:
    out = {}
    for kind in ("ws", "lsp"):
        parts = [r for k, r in results if k == kind]
        if not parts:
            continue
        finals: dict[str, int] = {}
        for r in parts:
            for k, v in r["finals"].items():
                finals[k] = finals.get(k, 0) + v
        lat = [x for r in parts for x in r["latencies"]]
        out[kind] = {"sent": sum(r["sent"] for r in parts), "finals": finals,
                     "unexpected": [u for r in parts for u in r["unexpected"]][:20],
                     "unexpected_count": sum(len(r["unexpected"]) for r in parts),
                     "p50_ms": round(percentile(lat, 0.5), 1), "p95_ms": round(percentile(lat, 0.95), 1)}
        if kind == "lsp":
            out[kind]["inflight_at_end"] = parts[0]["inflight_at_end"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="total requests, both servers (10,000)")
    parser.add_argument("--lsp-share", type=float, default=0.2, help="share sent to the language server (0.2)")
    parser.add_argument("--clients", type=int, default=4, help="websocket client processes (4)")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of requests before the start figures")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)

    model = ["--model", args.model] if args.model else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    lsp_port = free_port()
    lsp_log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"dg-edit-soak-lsp-{os.getpid()}.log", "wb")
    lsp = subprocess.Popen([*dg_edit_command(), "lsp", "--tcp", f"127.0.0.1:{lsp_port}", *model,
                            "--log-level", "WARNING"], stdout=lsp_log, stderr=subprocess.STDOUT, env=env,
                           start_new_session=True)
    service = ServeProcess(model).start().wait_ready()
    ctx = multiprocessing.get_context("spawn")
    total_lsp = round(args.requests * args.lsp_share)
    total_ws = args.requests - total_lsp
    warm_ws, warm_lsp = round(total_ws * args.warmup), round(total_lsp * args.warmup)
    report: dict = {"requests": args.requests, "clients": args.clients, "model": args.model or "embedded"}
    t0 = time.perf_counter()
    try:
        with ctx.Pool(args.clients + 1) as pool:
            # The LSP server serves one TCP client per run: warm-up and main phase share one connection,
            # so the language server is driven once with all its requests; its start figures are taken
            # when the websocket warm-up ends (by then it has served its share of the warm-up too).
            lsp_job = pool.apply_async(lsp_worker, (("127.0.0.1", lsp_port, total_lsp, args.seed + 100, lsp.pid),))
            warm = run_phase(pool, service, lsp_port, warm_ws, 0, args.clients, args.seed, args.max_new_tokens)
            start = {"ws": proc_status(service.proc.pid), "lsp": proc_status(lsp.pid)}
            t_main = time.perf_counter()
            main_results = run_phase(pool, service, lsp_port, total_ws - warm_ws, 0, args.clients, args.seed + 1000,
                                     args.max_new_tokens)
            lsp_result = lsp_job.get()
            wall = time.perf_counter() - t_main
        time.sleep(1.0)  # let the servers finish tearing down the last connections
        end = {"ws": proc_status(service.proc.pid), "lsp": lsp_result["status_at_end"]}
        h = health(service.url)
    finally:
        service.stop()
        lsp.terminate()
        try:
            lsp.wait(20)
        except subprocess.TimeoutExpired:
            lsp.kill()
        lsp_log.close()
    summary = summarise(warm + main_results + [("lsp", lsp_result)])
    report.update(summary)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["main_phase_s"] = round(wall, 1)
    for kind in ("ws", "lsp"):
        rss0, rss1 = start[kind]["VmRSS"], end[kind]["VmRSS"]
        report[kind].update(rss_start_mib=round(rss0 / 1024, 1), rss_end_mib=round(rss1 / 1024, 1),
                            rss_growth_pct=round(100 * (rss1 - rss0) / rss0, 2),
                            threads_start=start[kind]["Threads"], threads_end=end[kind]["Threads"])
    report["ws"].update(inflight_at_end=h["inflight"], connections_at_end=h["connections"])
    ok = (all(report[k]["unexpected_count"] == 0 for k in ("ws", "lsp"))
          and all(report[k]["rss_growth_pct"] < 5 for k in ("ws", "lsp"))
          and report["ws"]["inflight_at_end"] == 0 and report["ws"]["connections_at_end"] == 0
          and report["lsp"]["inflight_at_end"] == 0
          # Worker pools start threads lazily up to the peak concurrency, so a few more threads at the
          # end than after warm-up is not a leak; growth with the request count would be.
          and all(report[k]["threads_end"] <= report[k]["threads_start"] + 4 for k in ("ws", "lsp")))
    report["targets_met"] = ok
    print(f"soak: {args.requests} requests ({total_ws} websocket from {args.clients} processes, {total_lsp} LSP), "
          f"{report['wall_s']} s, model {report['model']}")
    for kind in ("ws", "lsp"):
        r = report[kind]
        print(f"  {kind:3}  sent {r['sent']:6}  finals {json.dumps(r['finals'], sort_keys=True)}  unexpected "
              f"{r['unexpected_count']}  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms")
        print(f"       RSS {r['rss_start_mib']} -> {r['rss_end_mib']} MiB ({r['rss_growth_pct']:+.2f} %, target < 5 %)  "
              f"threads {r['threads_start']} -> {r['threads_end']}  in flight at end {r['inflight_at_end']}"
              + (f"  connections at end {r['connections_at_end']}" if kind == "ws" else ""))
        for u in r["unexpected"][:5]:
            print(f"       unexpected: {u}")
    print(f"  targets met: {ok}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
