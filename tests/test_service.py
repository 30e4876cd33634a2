"""`dg-edit serve` end to end: real service processes, real `websockets` clients, real HTTP requests,
the test model. Covers the protocol, concurrency, cancellation, limits, bad input, auth and origin.

Nothing here asserts what the model writes, only how the service behaves, so the tests hold for
the embedded model and for the tiny random one (DG_EDIT_TEST_MODEL).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from email.message import Message
from importlib import resources

import jsonschema
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.uri import parse_uri
from websockets.exceptions import ConnectionClosed, InvalidStatus

from dg_edit.serve_process import ServeGroup, ServeProcess, dg_edit_command

pytestmark = pytest.mark.timeout(240)

TOKEN = "s3cret-token"
ALLOWED = "http://allowed.example:3000"
TERMINAL = {"done", "cancelled", "error"}
PROMPTS = [
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n", 1),
    ("import os\n\ndef list_files(path):\n", "\n", 2),
    ("class Stack:\n    def __init__(self):\n        self.items = ", "\n\n    def push(self, x):\n", 3),
]

BLOCK_PROMPTS = [
    ("def add(a, b):\n", "\n\nprint(add(1, 2))\n", 1),
    ("import os\n\ndef list_files(path):\n", "\n", 2),
    ("class Stack:\n    def __init__(self):\n", "\n\n    def push(self, x):\n", 3),
]

_SERVER_FRAME = None


def server_frame_validator():
    global _SERVER_FRAME
    if _SERVER_FRAME is None:
        schema = json.loads((resources.files("dg_edit") / "schema" / "protocol.schema.json").read_text("utf-8"))
        _SERVER_FRAME = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/ServerFrame"})
    return _SERVER_FRAME


# Every block runs exactly 8 denoising steps: the argmax canvas can never have been stable for 8 steps
# before the 9th, and the model never looks "confident enough" (a fully unmasked row under mask noise
# has entropy exactly 0, so the confidence bound alone would let it stop). A request of two canvas
# blocks runs 16 steps with any model, and cancel/busy/interleaving tests do not race a lucky early
# stop, nor wait for 48-step blocks.
STEADY = {"sampling": {"max_denoising_steps": 8, "confidence_threshold": 1e-30, "stability_threshold": 8}}


@pytest.fixture(scope="module")
def steady_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "steady.json"
    path.write_text(json.dumps(STEADY))
    return path


@pytest.fixture(scope="module")
def servers(model_dir, steady_config, tmp_path_factory):
    """Three services started side by side, all with steady sampling: plain (default limits), auth (a
    token and an allow-list) and limits (a request time limit far below one request's run time)."""
    limits = tmp_path_factory.mktemp("serve") / "limits.json"
    limits.write_text(json.dumps({**STEADY, "request_timeout_s": 0.05}))
    model = ["--model", str(model_dir)]
    group = ServeGroup(
        plain=ServeProcess([*model, "--config", str(steady_config)]),
        auth=ServeProcess([*model, "--config", str(steady_config), "--token", TOKEN, "--allow-origin", ALLOWED]),
        limits=ServeProcess([*model, "--config", str(limits)]),
    )
    with group:
        yield group
    # SIGTERM is a clean shutdown, even with connections and requests having come and gone.
    assert group.codes == {name: 0 for name in group}, {name: group[name].log()[-2000:] for name in group}
    assert all("dg-edit serve: stopped" in proc.log() for proc in group.values())


@pytest.fixture(scope="module")
def server(servers):
    return servers["plain"]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """Status, headers (looked up case-insensitively, as HTTP names are) and body."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def health(server) -> dict:
    status, _, body = http_get(server.url + "/healthz")
    assert status == 200
    return json.loads(body)


def long_tokens(server) -> int:
    """Two canvas blocks: with steady sampling (STEADY), a request of many denoising steps."""
    return 2 * health(server)["canvas_length"]


async def recv(ws, timeout: float = 120) -> dict:
    frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    server_frame_validator().validate(frame)
    return frame


async def collect(ws, ids, timeout: float = 120) -> dict[str, list[dict]]:
    """Frames per request id until each id got its final frame; every frame must match the schema."""
    frames: dict[str, list[dict]] = {i: [] for i in ids}
    pending = set(ids)
    while pending:
        frame = await recv(ws, timeout)
        frames.setdefault(frame["id"], []).append(frame)
        if frame["type"] in TERMINAL:
            pending.discard(frame["id"])
    return frames


def infill(rid, prefix, suffix="", **extra):
    return json.dumps({"type": "infill", "id": rid, "prefix": prefix, "suffix": suffix, **extra})


def check_stream(frames: list[dict]) -> dict:
    """Steps with increasing numbers, then exactly one final frame; returns the final frame."""
    *steps, final = frames
    assert final["type"] in TERMINAL
    assert all(f["type"] == "step" for f in steps), frames
    numbers = [f["step"] for f in steps]
    assert numbers == sorted(set(numbers))
    return final


# ---------------------------------------------------------------------------------------------- HTTP
def test_healthz_reports_model_device_uptime(server, model_dir):
    info = health(server)
    assert info["status"] == "ok"
    assert info["model"] == str(model_dir)
    assert info["device"] == "cpu"
    assert info["uptime_s"] >= 0
    assert info["inflight"] == 0


def test_page_is_served_with_a_content_security_policy(server):
    status, headers, body = http_get(server.url + "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert f"ws://127.0.0.1:{server.port}" in csp
    assert b'<script src="app.js"' in body
    for name in ("app.js", "style.css", "favicon.svg"):
        status, headers, _ = http_get(f"{server.url}/{name}")
        assert status == 200, name
        assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, body = http_get(server.url + "/../pyproject.toml")
    assert status == 404
    assert http_get(server.url + "/nope.js")[0] == 404


def test_page_script_never_parses_model_output_as_html():
    source = (resources.files("dg_edit") / "web" / "app.js").read_text("utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, sink


def test_unknown_host_header_is_refused_without_a_token(server):
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example.
    status, _, body = http_get(server.url + "/healthz", {"Host": f"evil.example:{server.port}"})
    assert status == 403
    assert b"Host" in body
    assert http_get(server.url + "/healthz", {"Host": f"localhost:{server.port}"})[0] == 200


# ---------------------------------------------------------------------------------------------- streaming
async def test_infill_streams_steps_then_done_equal_to_the_cli(server, model_dir, steady_config):
    budget = long_tokens(server)
    # Cursors on empty lines: block requests, which STEADY keeps to every step. (A cursor after text is a
    # single-line request, which stops as soon as its line is decided, whatever STEADY says: then one
    # request could finish in two steps before another has shown its first draft.)
    requests = [dict(id=f"r{i}", prefix=p, suffix=s, seed=seed, max_new_tokens=budget)
                for i, (p, s, seed) in enumerate(BLOCK_PROMPTS)]
    # The same requests through `dg-edit infill --json` with the same model and settings, in its own process.
    cli = subprocess.run(
        [*dg_edit_command(), "infill", "--json", "--model", str(model_dir), "--config", str(steady_config)],
        input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, text=True, timeout=200,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr
    expected = {r["id"]: r["text"] for r in map(json.loads, cli.stdout.splitlines())}
    async with connect(server.ws_url) as ws:
        # All at once on one connection: they run concurrently and must not disturb each other.
        for r in requests:
            await ws.send(json.dumps({"type": "infill", **r}))
        order = []
        frames: dict[str, list[dict]] = {r["id"]: [] for r in requests}
        pending = set(frames)
        while pending:
            frame = await recv(ws)
            order.append((frame["id"], frame["type"]))
            frames[frame["id"]].append(frame)
            if frame["type"] in TERMINAL:
                pending.discard(frame["id"])
    for rid, stream in frames.items():
        final = check_stream(stream)
        assert final["type"] == "done", final
        assert final["text"] == expected[rid]
        assert final["steps"] >= STEADY["sampling"]["max_denoising_steps"] and final["ms"] > 0  # long requests
        assert stream[0]["type"] == "step", "the draft is streamed, not only the result"
        assert stream[0]["total"] >= 1 and isinstance(stream[0]["tokens"], list)
    # Every request's first draft arrives before the first request is done: they interleave.
    first_done = next(i for i, (_, kind) in enumerate(order) if kind == "done")
    first_steps = {rid: next(i for i, (r, k) in enumerate(order) if r == rid and k == "step") for rid in frames}
    assert max(first_steps.values()) < first_done, order


async def test_rewrite_streams_and_matches_the_engine(server, engine):
    prefix, selection, suffix = "def area(r):\n    return ", "3.14 * r * r", "\n"
    expected = engine.rewrite(prefix, selection, suffix, strength=0.8, seed=5, **STEADY["sampling"])
    async with connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "rewrite", "id": "w1", "prefix": prefix, "selection": selection,
                                  "suffix": suffix, "strength": 0.8, "seed": 5}))
        await ws.send(json.dumps({"type": "rewrite", "id": "w0", "prefix": prefix, "selection": selection,
                                  "suffix": suffix, "strength": 0}))
        frames = await collect(ws, ["w1", "w0"])
    final = check_stream(frames["w1"])
    assert final["type"] == "done" and final["text"] == expected.text
    assert frames["w0"] == [{"type": "done", "id": "w0", "text": selection, "steps": 0, "tokens_per_forward": 0.0,
                             "ms": 0.0}]


async def test_session_requests_reuse_the_prefix_cache_and_keep_results(server):
    prefix = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(20)) + "def g(y):\n    return "
    async with connect(server.ws_url) as ws:
        results = []
        for rid in ("s1", "s2"):
            await ws.send(infill(rid, prefix, "\n", seed=4, session="doc.py"))
            results.append(check_stream((await collect(ws, [rid]))[rid]))
        await ws.send(infill("s3", prefix, "\n", seed=4))
        results.append(check_stream((await collect(ws, ["s3"]))["s3"]))
    assert [r["type"] for r in results] == ["done"] * 3
    assert results[0]["text"] == results[1]["text"] == results[2]["text"]


async def test_a_session_is_prefilled_from_its_requests_and_typed_ahead(server):
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(60))
    cut = text.index("return x + 30") + len("return ")
    before = health(server)["cache"]
    async with connect(server.ws_url) as ws:
        for seed in range(12):
            rid = f"p{seed}"
            await ws.send(infill(rid, text[:cut], text[cut:], seed=seed, session="big.py"))
            answer = check_stream((await collect(ws, [rid]))[rid])["text"]
            if answer[:2].strip() and answer[2:].strip():
                break
        else:
            pytest.fail("no answer of three characters or more in 12 seeds")
        # The user types the first two characters of the answer: the rest comes back with no model call.
        await ws.send(infill("t1", text[:cut] + answer[:2], text[cut:], seed=seed, session="big.py"))
        frames = (await collect(ws, ["t1"]))["t1"]
        assert len(frames) == 1 and frames[0]["type"] == "done"
        assert frames[0]["typed_ahead"] is True and frames[0]["steps"] == 0 and frames[0]["text"] == answer[2:]
        # The document the requests showed (prefix + suffix) is prefilled once the connection is quiet.
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            cache = health(server)["cache"]
            if cache["prefill"]["passes"] > before["prefill"]["passes"] and cache["prefill"]["pending"] == 0:
                break
            assert asyncio.get_running_loop().time() < deadline, cache
            await asyncio.sleep(0.2)
    assert cache["prefill"]["encoded"] > before["prefill"]["encoded"] and cache["prefill"]["error"] is None
    assert cache["bytes_per_token"] > 0 and 0 < cache["bytes"] <= cache["budget_bytes"]


# ---------------------------------------------------------------------------------------------- cancel
async def test_cancel_stops_a_running_request(server):
    async with connect(server.ws_url) as ws:
        await ws.send(infill("c1", PROMPTS[0][0], PROMPTS[0][1], max_new_tokens=long_tokens(server)))
        first = await recv(ws)
        assert (first["id"], first["type"]) == ("c1", "step")
        await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
        frames = [first] + (await collect(ws, ["c1"]))["c1"]
        assert frames[-1] == {"type": "cancelled", "id": "c1"}
        check_stream(frames)
        # Nothing more arrives for c1; the connection goes on serving.
        await ws.send(infill("c2", "x = ", seed=1))
        after = await collect(ws, ["c2"])
        assert set(after) == {"c2"}, after.keys()
        assert after["c2"][-1]["type"] == "done"
        # The id is free again once its request ended; cancelling it now is an unknown id.
        await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
        err = await recv(ws)
        assert (err["type"], err["code"], err["id"]) == ("error", "unknown_id", "c1")


async def test_cancel_right_after_the_request_still_answers_cancelled(server):
    async with connect(server.ws_url) as ws:
        await ws.send(infill("q1", "def f():\n", max_new_tokens=long_tokens(server)))
        await ws.send(json.dumps({"type": "cancel", "id": "q1"}))
        frames = (await collect(ws, ["q1"]))["q1"]
    assert frames[-1] == {"type": "cancelled", "id": "q1"}


async def test_client_disconnect_mid_stream_frees_its_requests(server):
    ws = await connect(server.ws_url)
    for i in range(3):
        await ws.send(infill(f"d{i}", "def f():\n", max_new_tokens=long_tokens(server)))
    assert (await recv(ws))["type"] == "step"
    ws.transport.abort()  # no closing handshake: the client just vanished
    for _ in range(200):
        info = health(server)
        if info["inflight"] == 0 and info["connections"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (info["inflight"], info["connections"]) == (0, 0)
    async with connect(server.ws_url) as other:
        await other.send(infill("ok", "x = ", seed=1))
        assert (await collect(other, ["ok"]))["ok"][-1]["type"] == "done"


# ---------------------------------------------------------------------------------------------- limits
async def test_more_than_max_inflight_requests_is_busy(server):
    budget = long_tokens(server)
    async with connect(server.ws_url) as ws:
        ids = [f"b{i}" for i in range(5)]  # Settings.max_inflight defaults to 4
        for rid in ids:
            await ws.send(infill(rid, "def f():\n", max_new_tokens=budget))
        busy = None
        while busy is None:
            frame = await recv(ws)
            if frame["type"] == "error":
                busy = frame
        assert (busy["id"], busy["code"]) == ("b4", "busy")
        assert "max_inflight=4" in busy["message"]
        for rid in ids[:4]:
            await ws.send(json.dumps({"type": "cancel", "id": rid}))
        frames = await collect(ws, ids[:4])
        assert all(f[-1]["type"] in ("cancelled", "done") for f in frames.values())


async def test_request_time_limit_gives_a_timeout_error(servers):
    server = servers["limits"]
    async with connect(server.ws_url) as ws:
        # 16 blocks of 8 steps: far longer than 0.05 s on any machine.
        await ws.send(infill("t1", "def f():\n", max_new_tokens=8 * long_tokens(server)))
        final = check_stream((await collect(ws, ["t1"]))["t1"])
        assert (final["type"], final["code"]) == ("error", "timeout")
        assert "request_timeout_s=0.05" in final["message"]
        # The connection is still usable.
        await ws.send("{}")
        assert (await recv(ws))["code"] == "bad_request"


async def test_oversized_frame_closes_with_1009_and_others_keep_going(server):
    async with connect(server.ws_url) as bystander:
        await bystander.send(infill("by", "def f():\n", max_new_tokens=long_tokens(server)))
        async with connect(server.ws_url, max_size=None) as ws:
            # Just under the 1 MiB limit is a valid (huge) request...
            prefix = "x=1;" * ((1 << 20) // 4 - 40)  # no characters that JSON escapes
            await ws.send(infill("big", prefix, max_new_tokens=4))
            assert check_stream((await collect(ws, ["big"]))["big"])["type"] == "done"
            # ...one byte over closes the connection with 1009 (message too big).
            await ws.send("x" * ((1 << 20) + 1))
            with pytest.raises(ConnectionClosed):
                while True:
                    await recv(ws)
            assert ws.close_code == 1009
        # The other connection is still served: its request answers a cancel (or has finished).
        await bystander.send(json.dumps({"type": "cancel", "id": "by"}))
        frames = (await collect(bystander, ["by"]))["by"]
        assert frames[-1]["type"] in ("cancelled", "done")


class StalledClient:
    """A websocket client that reads nothing until told to: a raw socket with a small receive buffer,
    framed by websockets' sans-I/O protocol. (An asyncio client would keep reading into its own
    256 KiB buffer and hide the back-pressure.)"""

    def __init__(self, url: str, port: int):
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(180)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.handshake_exc is None and not self.protocol.events_received():
            self.protocol.receive_data(self.sock.recv(4096))
        assert self.protocol.handshake_exc is None, self.protocol.handshake_exc
        self.frames: list[dict] = []

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def send(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._flush()

    def read_until_finals(self, ids) -> dict[str, list[dict]]:
        pending = set(ids)
        frames: dict[str, list[dict]] = {i: [] for i in ids}
        while pending:
            self.protocol.receive_data(self.sock.recv(65536))
            self._flush()  # answers the service's keepalive pings
            for event in self.protocol.events_received():
                if event.opcode is Opcode.TEXT:
                    frame = json.loads(event.data)
                    server_frame_validator().validate(frame)
                    frames[frame["id"]].append(frame)
                    if frame["type"] in TERMINAL:
                        pending.discard(frame["id"])
        return frames

    def close(self) -> None:
        self.sock.close()


async def test_a_slow_reader_gets_coalesced_drafts_and_does_not_stall_others(server):
    """A client that stops reading: another client is served meanwhile, the slow one's drafts are
    coalesced to the latest (step numbers skip) and all its finals arrive once it reads again."""
    budget = long_tokens(server)
    slow = await asyncio.to_thread(StalledClient, server.ws_url, server.port)
    started = asyncio.get_running_loop().time()
    ids = [f"s{i}" for i in range(4)]
    # Rewrites of a long selection: every draft carries the whole selection (~40 KiB of step frames per
    # request), far more than the socket buffers hold, whatever the model proposes. (Infill drafts can
    # be a few tokens when the model ends the middle early.)
    selection = "".join(f"    total = total + values[{i}] * weights[{i}]\n" for i in range(8))
    for i, rid in enumerate(ids):
        slow.send(json.dumps({"type": "rewrite", "id": rid, "prefix": "def score(values, weights):\n    total = 0\n",
                              "selection": selection, "suffix": "    return total\n", "seed": i}))
    async with connect(server.ws_url) as fast:
        # a block, not one line: a single line may be decided (and done) after its first step
        await fast.send(infill("f1", "x = ", seed=1, max_new_tokens=budget, single_line=False))
        steps = [await recv(fast) for _ in range(2)]
        assert [(f["id"], f["type"]) for f in steps] == [("f1", "step")] * 2
        await fast.send(json.dumps({"type": "cancel", "id": "f1"}))
        assert (await collect(fast, ["f1"]))["f1"][-1]["type"] in ("cancelled", "done")
    coalesced_before = health(server)["drafts_coalesced"]  # only the slow connection is left
    # Stay stalled until the service had to coalesce drafts (or the requests finished), for at most
    # 25 s: its keepalive ping (sent after 20 s, answered within 20 s) must find the client reading.
    while asyncio.get_running_loop().time() - started < 25:
        info = health(server)
        if info["drafts_coalesced"] > coalesced_before or info["inflight"] == 0:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a few more drafts pile up
    frames = await asyncio.to_thread(slow.read_until_finals, ids)
    slow.close()
    finals = [check_stream(frames[rid]) for rid in ids]
    assert all(f["type"] == "done" for f in finals)
    sent_steps = sum(len(frames[rid]) - 1 for rid in ids)
    run_steps = sum(f["steps"] for f in finals)
    assert sent_steps < run_steps, (sent_steps, run_steps)


# ---------------------------------------------------------------------------------------------- bad input
BAD_FRAMES = [
    ("not json", None, "bad_request"),
    ("[]", None, "bad_request"),
    ('{"type": "infill", "prefix": "x"}', None, "bad_request"),
    ('{"type": "paint", "id": "p1"}', "p1", "bad_request"),
    ('{"type": "infill", "id": "p2"}', "p2", "bad_request"),
    ('{"type": "infill", "id": "p3", "prefix": "x", "seed": "1"}', "p3", "bad_request"),
    ('{"type": "infill", "id": "p4", "prefix": "x", "max_new_tokens": -1}', "p4", "bad_request"),
    ('{"type": "infill", "id": "p5", "prefix": "x", "colour": "red"}', "p5", "bad_request"),
    ('{"type": "infill", "id": "p6", "prefix": "", "suffix": ""}', "p6", "bad_request"),  # the engine refuses
    ('{"type": "rewrite", "id": "p7", "prefix": "x", "selection": "y", "strength": 3}', "p7", "bad_request"),
    ('{"type": "cancel", "id": "nobody"}', "nobody", "unknown_id"),
    ('{"type": ["infill"], "id": "p8"}', "p8", "bad_request"),
]


async def test_every_bad_frame_gets_an_error_and_the_connection_goes_on(server):
    async with connect(server.ws_url) as ws:
        for frame, rid, code in BAD_FRAMES:
            await ws.send(frame)
            err = await recv(ws)
            assert (err["type"], err["id"], err["code"]) == ("error", rid, code), (frame, err)
            assert err["message"]
        await ws.send(b'{"type": "cancel", "id": "x"}')  # a binary frame
        err = await recv(ws)
        assert (err["code"], err["id"]) == ("bad_request", None) and "binary" in err["message"]
        # Duplicate id while the first is in flight: refused, the first goes on (and can be cancelled).
        await ws.send(infill("dup", "def f():\n", max_new_tokens=long_tokens(server)))
        await ws.send(infill("dup", "y = "))
        frames = (await collect(ws, ["dup"]))["dup"]
        errors = [f for f in frames if f["type"] == "error"]
        assert [e["code"] for e in errors] == ["duplicate_id"]
        rest = [f for f in frames if f["type"] != "error"]
        await ws.send(json.dumps({"type": "cancel", "id": "dup"}))
        after_cancel = (await collect(ws, ["dup"]))["dup"]
        if rest and rest[-1]["type"] == "done":  # it finished before the cancel: nothing to cancel
            assert [f["code"] for f in after_cancel] == ["unknown_id"]
        else:
            assert check_stream(rest + after_cancel)["type"] == "cancelled"
        await ws.send(infill("after", "x = ", seed=1))
        assert (await collect(ws, ["after"]))["after"][-1]["type"] == "done"


# ---------------------------------------------------------------------------------------------- security
async def test_token_is_required_by_header_or_query(servers):
    server = servers["auth"]
    assert http_get(server.url + "/healthz")[0] == 401
    assert http_get(server.url + "/healthz?token=wrong")[0] == 401
    assert http_get(server.url + "/healthz", {"Authorization": "Bearer wrong"})[0] == 401
    assert http_get(server.url + "/healthz", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert http_get(server.url + "/")[0] == 200  # the page is public: it has no secrets
    assert http_get(f"{server.url}/healthz?token={TOKEN}")[0] == 200
    for url, headers in ((server.ws_url, None), (server.ws_url + "?token=nope", None),
                         (server.ws_url, {"Authorization": "Basic " + TOKEN})):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
    for url, headers in ((server.ws_url + f"?token={TOKEN}", None),
                         (server.ws_url, {"Authorization": f"Bearer {TOKEN}"})):
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(infill("a1", "x = ", seed=1))
            assert (await collect(ws, ["a1"]))["a1"][-1]["type"] == "done"


@pytest.mark.parametrize("origin, allowed", [
    ("http://evil.example", False),
    ("null", False),
    (ALLOWED, True),
    ("own", True),  # the service's own page
    (None, True),  # not a browser: scripts and editors send no Origin
])
async def test_origin_is_checked_against_the_allow_list(servers, origin, allowed):
    for name in ("auth", "plain"):
        server = servers[name]
        if name == "plain" and origin == ALLOWED:
            allowed_here = False  # only the auth service was started with --allow-origin
        else:
            allowed_here = allowed
        value = f"http://127.0.0.1:{server.port}" if origin == "own" else origin
        url = server.ws_url + (f"?token={TOKEN}" if name == "auth" else "")
        if allowed_here:
            async with connect(url, origin=value) as ws:
                await ws.send('{"type": "cancel", "id": "nothing"}')
                assert (await recv(ws))["code"] == "unknown_id"
        else:
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, origin=value):
                    pass
            assert info.value.response.status_code == 403
            assert b"--allow-origin" in info.value.response.body


@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], "without a token"),
    (["--host", "example.com"], "without a token"),
    (["--allow-origin", "evil.example"], "--allow-origin"),
    (["--port", "70000"], "--port"),
])
def test_refuses_to_start_unsafely_or_with_bad_arguments(args, words, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DG_EDIT_TOKEN", None)
    run = subprocess.run([*dg_edit_command(), "serve", *args, "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2
    assert words in run.stderr
    assert "Traceback" not in run.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    run = subprocess.run([*dg_edit_command(), "serve", "--port", "0", "--model",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "model directory not found" in run.stderr


# ---------------------------------------------------------------------------------------------- next edit
NEXT_EDIT_SOURCE = '''def mean(values):
    count = 0
    acc = 0.0
    for v in values:
        acc += v
        count += 1
    return acc / count
'''


async def test_edits_aim_next_edit_and_a_prepared_suggestion_answers_at_once(server, engine):
    from dg_edit.edits import TextEdit, apply_edits

    at = NEXT_EDIT_SOURCE.index("count = 0")
    # What a browser editor reports while the user renames `count` (backspace x5, then types "total").
    keys = [TextEdit(at + 4 - k, at + 5 - k, "", "count"[4 - k]) for k in range(5)]
    keys += [TextEdit(at + k, at + k, ch) for k, ch in enumerate("total")]
    document = NEXT_EDIT_SOURCE
    async with connect(server.ws_url) as ws:
        for k, key in enumerate(keys):
            document = key.apply(document)
            frame = {"type": "edit", "id": f"e{k}", "session": "m.py", "start": key.start, "end": key.end,
                     "text": key.text, "old_text": key.old_text}
            if k == len(keys) - 1:  # the user goes quiet: prepare the suggestion at the cursor
                frame |= {"document": document, "cursor": at + 5}
            await ws.send(json.dumps(frame))
        # A malformed edit is refused with its id; the history it would have joined is untouched.
        await ws.send(json.dumps({"type": "edit", "id": "bad", "session": "m.py", "start": 5, "end": 2, "text": ""}))
        err = await recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "bad", "bad_request"), err
        for rid, bad in (("bad-text", {"text": "\ud800"}), ("bad-cursor", {"text": "", "document": "ab", "cursor": 3})):
            await ws.send(json.dumps({"type": "edit", "id": rid, "session": "m.py", "start": 0, "end": 0, **bad}))
            err = await recv(ws)
            assert (err["type"], err["id"], err["code"]) == ("error", rid, "bad_request"), err
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            state = health(server)["cache"]["next_edit"]
            if state["ready"] >= 1 and state["pending"] == 0 and state["running"] is None:
                break
            assert state["error"] is None and asyncio.get_running_loop().time() < deadline, state
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "next_edit", "id": "n1", "text": document, "cursor": at + 5,
                                  "session": "m.py"}))
        prepared = await collect(ws, ["n1"])
        # Another cursor was not prepared: it runs, streaming the window's drafts.
        await ws.send(json.dumps({"type": "next_edit", "id": "n2", "text": document, "cursor": 0, "session": "m.py"}))
        cold = check_stream((await collect(ws, ["n2"]))["n2"])
    (done,) = prepared["n1"]
    assert done["type"] == "done" and done["prepared"] is True
    expected = engine.next_edit(document, at + 5, session="ws-reference", sampling=STEADY["sampling"],
                                edits=[TextEdit(at, at + 5, "total", "count")])
    assert done["window"] == list(expected.window) and done["text"] == expected.text
    assert [(e["start"], e["end"], e["text"]) for e in done["edits"]] == [(e.start, e.end, e.text)
                                                                         for e in expected.edits]
    start, end = done["window"]
    suggested = [TextEdit.from_json(e) for e in done["edits"]]
    assert apply_edits(document, suggested) == document[:start] + done["text"] + document[end:]
    assert cold["type"] == "done" and "prepared" not in cold and cold["window"][0] == 0
