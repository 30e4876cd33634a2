"""Websocket service latency and throughput, measured side by side in one run against a real
`dg-edit serve` process (started here, or an existing one with --url).

For 1, 4 and 16 concurrent clients (each sending requests one after another):
  first step  time from sending a request to its first `step` frame (target: about one denoising step)
  done        time from sending a request to its `done` frame
  throughput  requests/s and denoising steps/s over all clients, and the ratio to 1 client
Then 4 clients next to a fifth connection running 4 long requests, once reading its frames and
once reading nothing: the ratio of their latencies shows whether a stalled client slows the others.

    OMP_NUM_THREADS=1 python bench/ws.py [--model DIR] [--clients 1 4 16] [--requests 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass

from websockets.asyncio.client import connect

from dg_edit.serve_process import ServeProcess

PROMPTS = [
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("import os\n\ndef list_files(path):\n    ", "\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = ", "\n\n    def push(self, x):\n"),
    ("for i in range(10):\n    if i % 2 == 0:\n        ", "\n"),
]


@dataclass
class Sample:
    first_step_ms: float | None  # None: the request finished without a step frame
    done_ms: float
    steps: int


async def one_client(url: str, client_no: int, requests: int, max_new_tokens: int | None) -> list[Sample]:
    samples = []
    async with connect(url, max_size=None) as ws:
        for n in range(requests):
            prefix, suffix = PROMPTS[(client_no + n) % len(PROMPTS)]
            rid = f"c{client_no}-{n}"
            frame = {"type": "infill", "id": rid, "prefix": prefix, "suffix": suffix, "seed": client_no * 1000 + n}
            if max_new_tokens:
                frame["max_new_tokens"] = max_new_tokens
            t0 = time.perf_counter()
            await ws.send(json.dumps(frame))
            first = None
            while True:
                reply = json.loads(await ws.recv())
                now = (time.perf_counter() - t0) * 1000
                if reply["type"] == "step" and first is None:
                    first = now
                elif reply["type"] == "done":
                    samples.append(Sample(first, now, reply["steps"]))
                    break
                elif reply["type"] != "step":
                    print(f"  request {rid} failed: {reply.get('code')}: {reply.get('message')}", file=sys.stderr)
                    break
    return samples


async def background_client(host: str, port: int, url: str, max_new_tokens: int, stalled: bool):
    """A fifth connection with 4 long requests; `stalled`: it then reads nothing (small TCP window,
    paused reader), otherwise it reads and discards its frames. Returns (connection, reader task)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if stalled:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.setblocking(False)
    ws = await connect(url, sock=sock, max_queue=1 if stalled else 16, max_size=None)
    for n in range(4):
        prefix, suffix = PROMPTS[n]
        await ws.send(json.dumps({"type": "infill", "id": f"bg{n}", "prefix": prefix, "suffix": suffix,
                                  "seed": n, "max_new_tokens": max_new_tokens}))

    async def drain():
        finals = 0
        while finals < 4:
            finals += json.loads(await ws.recv())["type"] in ("done", "cancelled", "error")

    return ws, None if stalled else asyncio.create_task(drain())


async def run_level(url: str, clients: int, requests: int, max_new_tokens: int | None) -> tuple[float, list[Sample]]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(url, c, requests, max_new_tokens) for c in range(clients)))
    return time.perf_counter() - t0, [s for r in results for s in r]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def report(label: str, wall: float, samples: list[Sample], base: tuple[float, float] | None) -> tuple[float, float]:
    firsts = [s.first_step_ms for s in samples if s.first_step_ms is not None]
    dones = [s.done_ms for s in samples]
    if not firsts:
        print(f"{label:>18}     0  no request finished")
        return base or (float("nan"), float("nan"))
    steps = sum(s.steps for s in samples)
    rps, sps = len(samples) / wall, steps / wall
    ratio = f"{rps / base[0]:5.2f}x" if base else "  1.00x"
    print(f"{label:>18} {len(samples):5d}  {statistics.median(firsts):8.1f} {pct(firsts, 0.95):8.1f}  "
          f"{statistics.median(dones):8.1f} {pct(dones, 0.95):8.1f}  {rps:7.2f} {sps:8.1f}  {ratio}")
    return rps, sps


async def bench(url: str, host: str, port: int, args) -> None:
    health = json.loads(urllib.request.urlopen(url.replace("ws://", "http://").replace("/ws", "/healthz")).read())
    print(f"model {health['model']} ({health['parameters']} parameters, canvas {health['canvas_length']}) on "
          f"{health['device']}; {args.requests} requests per client, max_new_tokens "
          f"{args.max_new_tokens or 'default'}")
    await run_level(url, 1, 2, args.max_new_tokens)  # warm-up
    solo_wall, solo = await run_level(url, 1, args.requests, args.max_new_tokens)
    step_ms = statistics.median(s.done_ms / max(s.steps, 1) for s in solo)
    print(f"one denoising step (1 client, median done time / steps): {step_ms:.1f} ms")
    print(f"{'clients':>18} {'reqs':>5}  {'first step ms':>17}  {'done ms':>17}  {'req/s':>7} {'steps/s':>8}  vs 1")
    print(f"{'':>18} {'':>5}  {'p50':>8} {'p95':>8}  {'p50':>8} {'p95':>8}")
    base = report("1", solo_wall, solo, None)
    by_level = {}
    for clients in args.clients:
        if clients == 1:
            continue
        wall, samples = await run_level(url, clients, args.requests, args.max_new_tokens)
        by_level[clients] = samples
        report(str(clients), wall, samples, base)
    first_ratio = statistics.median(s.first_step_ms for s in solo if s.first_step_ms) / step_ms
    print(f"first step / one denoising step (1 client): {first_ratio:.2f}")
    # 4 clients next to a fifth connection running 4 long requests: reading, then stalled.
    long_tokens = 8 * health["canvas_length"]
    done_p50 = {}
    for stalled in (False, True):
        ws, reader = await background_client(host, port, url, long_tokens, stalled)
        wall, samples = await run_level(url, 4, args.requests, args.max_new_tokens)
        label = "4 + stalled reader" if stalled else "4 + busy reader"
        report(label, wall, samples, base)
        done_p50[stalled] = statistics.median(s.done_ms for s in samples)
        if reader is not None:
            await reader
        ws.transport.abort()
        await asyncio.sleep(0.5)  # let the service notice and free the model
    print(f"4 clients' median done time next to a stalled reader / next to a reading one: "
          f"{done_p50[True] / done_p50[False]:.2f} (about 1: a stalled client costs the others nothing extra)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--url", default=None, help="an existing service's ws://HOST:PORT/ws (no token)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if args.url:
        host, port = args.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        asyncio.run(bench(args.url, host, int(port), args))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the service below on the way out
    with ServeProcess(["--model", args.model] if args.model else []) as server:
        print(f"dg-edit serve at {server.url}")
        asyncio.run(bench(server.ws_url, server.host, server.port, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
