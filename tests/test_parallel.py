"""`--parallel tp|ep` under torchrun, on the CPU with the gloo backend: the same tokens as one process,
cancellation on every rank, and the launch failing cleanly (a rank killed, a rank hung, a rank that
cannot load its shard).

Every test starts the real launch a user starts: `python -m torch.distributed.run --standalone
--nproc-per-node 2 -m dg_edit.cli CMD --parallel ...`, with a tiny random model whose 2 key/value heads
and 2 experts split over 2 ranks. The reference is the same model in one process (this one), same seeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version
from websockets.asyncio.client import connect

from dg_edit import faults, hf_adapter as hf
from dg_edit.testing import save_tiny_model_dir, tiny_config

pytestmark = pytest.mark.timeout(240)

RANKS = 2
LAUNCH_TIMEOUT_S = 120.0
PREFIX = "def add(a, b):\n    return "
REQUESTS = [  # (prefix, suffix, max_new_tokens, seed): an infill with a suffix (candidate lengths), a line,
    (PREFIX, "\n\nprint(add(1, 2))\n", None, 1),  # ... and a multi-block request (40 tokens, 16-token canvas)
    ("import os\nx = ", "", None, 2),
    ("class Config:\n", "", 40, 3),
]
REWRITE = ("x = ", "compute(1, 2) + offset", "\n", 4)  # prefix, selection, suffix, seed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("parallel-model"), num_key_value_heads=2)


@pytest.fixture(scope="module")
def requests(reference) -> list:
    """REQUESTS, with the multi-block one's seed chosen so that one process really runs several blocks.

    The tiny model is random and so is its tokenizer's vocabulary (trained on a source file): a fixed
    seed may end the answer with EOS in its first block, and the test would no longer cover what it
    names.
    """
    prefix, suffix, n, _ = REQUESTS[2]
    one_block = reference.sampling.max_denoising_steps
    for seed in range(3, 64):
        if reference.infill(prefix, suffix, max_new_tokens=n, seed=seed).steps > one_block:
            return [*REQUESTS[:2], (prefix, suffix, n, seed)]
    raise AssertionError("no seed in 3..63 gives a multi-block answer with this tiny model")


@pytest.fixture(scope="module")
def reference(model_dir):
    from dg_edit.engine import Engine

    engine = Engine.load(str(model_dir))
    passes = {"n": 0}
    engine.model.register_forward_pre_hook(lambda *a: passes.__setitem__("n", passes["n"] + 1))
    engine.decoder_passes = passes
    return engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, nnodes: int = 1, node_rank: int = 0, master_port: int | None = None,
             nproc: int = RANKS) -> list[str]:
    if nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                      "--master-port", str(master_port)]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc),
            "-m", "dg_edit.cli", *args]


def env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


class Launch:
    """A torchrun launch in its own process group, stderr to a file; `stop()` ends what is left of it."""

    def __init__(self, args: list[str], log: Path, **kw):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(torchrun(args), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env(**kw), start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = LAUNCH_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"the launch exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout:.0f} s:\n{self.log()}")

    def pid(self, rank: int) -> int:
        return int(self.wait_for(rf"rank {rank}/{RANKS}: pid (\d+) holds")[1])

    def stop(self) -> None:
        """SIGKILL torchrun's group and every rank (torchrun starts each rank in a session of its own)."""
        ranks = [int(pid) for pid in re.findall(r"rank \d+/\d+: pid (\d+) holds", self.log())]
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in ranks:  # a frozen rank outlives torchrun otherwise
            try:
                if b"dg_edit.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():  # still ours, not a reused pid
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        self._log.close()


def rank_counts(log: str) -> dict[int, tuple[int, ...]]:
    """Rank 0's summary at a clean stop, per rank: streams, events, decoder passes, request steps (each
    request's own steps, as if run alone), the most requests one decoder pass carried, encoder passes."""
    found = re.findall(r"rank (\d+)/\d+: (\d+) streams, (\d+) events, (\d+) decoder passes \((\d+) request "
                       r"steps, at most (\d+) in one pass\), (\d+) encoder passes", log)
    return {int(r): tuple(map(int, rest)) for r, *rest in found}


# ---------------------------------------------------------------------------------------------- plan (no launch)
def test_corrected_plan_names_the_decoder_and_replicates_the_tied_embedding():
    tp_plan, ep_plan, _ = hf.parallel_plans(tiny_config(num_key_value_heads=2))
    fixed = hf.corrected_plan(tp_plan)
    # transformers' own plan names the encoder only: the decoder, which owns the tied weights, is missing
    assert "model.encoder.language_model.layers.*.self_attn.q_proj" in tp_plan
    assert not any(name.startswith("model.decoder.") for name in tp_plan)
    assert fixed["model.decoder.layers.*.self_attn.q_proj"] == "colwise"
    for name, style in tp_plan.items():  # every rule of the encoder's text model holds for the decoder too
        if name.startswith("model.encoder.language_model.") and not name.endswith("embed_tokens"):
            assert fixed["model.decoder." + name[len("model.encoder.language_model."):]] == style, name
    # transformers 5.23 and 5.24 shard the experts under tp; 5.25 dropped those rules (it deprecates
    # moe_tp_experts for expert parallelism), so there the experts stay whole on every tp rank.
    if hf.tp_splits_experts(tp_plan):
        assert fixed["model.decoder.layers.*.experts"] == "moe_tp_experts"
    # --parallel tp warns that the experts stay whole where this is False (dg_edit.hf_adapter.parallel_load_kwargs)
    assert hf.tp_splits_experts(tp_plan) == (Version(metadata.version("transformers")) < Version("5.25"))
    assert fixed["lm_head"] == "replicate"
    assert fixed["model.encoder.language_model.embed_tokens"] == fixed["model.decoder.embed_tokens"] == "replicate"
    assert hf.corrected_plan(ep_plan)["model.decoder.layers.*.experts"] == "ep_dispatch_experts"


def test_a_split_that_cannot_work_is_refused_with_the_fix():
    _, _, skeleton = hf.parallel_plans(tiny_config())  # 1 key/value head
    with pytest.raises(ValueError, match=r"1 key/value heads.*--parallel ep"):
        hf.check_parallel(skeleton, "tp", 2)
    hf.check_parallel(skeleton, "ep", 2)  # 2 experts: whole experts deal out over 2 ranks
    with pytest.raises(ValueError, match=r"experts \(2\)"):
        hf.check_parallel(skeleton, "ep", 4)


def test_parallel_outside_torchrun_is_a_usage_error(model_dir):
    proc = subprocess.run([sys.executable, "-m", "dg_edit.cli", "infill", "--json", "--parallel", "tp",
                           "--model", str(model_dir)], input="", capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE")})
    assert proc.returncode == 2
    assert "runs under torchrun" in proc.stderr


# ---------------------------------------------------------------------------------------------- same tokens
@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_infill_json_gives_the_same_text_as_one_process(mode, model_dir, reference, requests):
    lines = [json.dumps({"id": i, "prefix": p, "suffix": s, "max_new_tokens": n, "seed": seed})
             for i, (p, s, n, seed) in enumerate(requests)]
    proc = subprocess.run(torchrun(["infill", "--json", "--parallel", mode, "--model", str(model_dir)]),
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=env())
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in replies] == list(range(len(requests)))
    for reply, (prefix, suffix, n, seed) in zip(replies, requests):
        done = reference.infill(prefix, suffix, max_new_tokens=n, seed=seed)
        assert (reply["text"], reply["steps"]) == (done.text, done.steps), reply
    assert replies[2]["steps"] > reference.sampling.max_denoising_steps  # more than one block
    counts = rank_counts(proc.stderr)
    assert set(counts) == {0, 1} and counts[0] == counts[1], proc.stderr


# ---------------------------------------------------------------------------------------------- serve
async def _frames(ws, request_ids: set[str]) -> dict[str, dict]:
    """Read frames until every id in `request_ids` has its final frame."""
    finals: dict[str, dict] = {}
    while set(finals) != request_ids:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if frame["type"] != "step":
            finals[frame["id"]] = frame
    return finals


NEXT_EDIT_TEXT = "def mean(values):\n    total = 0\n    for v in values:\n        count += v\n    return count\n"
NEXT_EDIT_DONE = {"start": NEXT_EDIT_TEXT.index("total"), "end": NEXT_EDIT_TEXT.index("total") + 5, "text": "total",
                  "old_text": "count"}


def test_serve_batches_requests_on_every_rank_like_one_process_and_cancel_stops_every_rank(
        model_dir, reference, requests, tmp_path):
    launch = Launch(["serve", "--port", "0", "--parallel", "tp", "--model", str(model_dir)], tmp_path / "serve.log",
                    **{faults.FAULT_ENV: "slow:0.5"})
    try:
        url = launch.wait_for(r"ws://(\S+)/ws")[1]
        rank0 = launch.pid(0)

        async def talk():
            async with connect(f"ws://{url}/ws") as ws:
                # four requests at once: rank 0's scheduler batches their steps; every rank applies its plans
                for i, (prefix, suffix, n, seed) in enumerate(requests):
                    budget = {"max_new_tokens": n} if n is not None else {}
                    await ws.send(json.dumps({"type": "infill", "id": f"i{i}", "prefix": prefix, "suffix": suffix,
                                              "seed": seed, **budget}))
                prefix, selection, suffix, seed = REWRITE
                await ws.send(json.dumps({"type": "rewrite", "id": "rw", "prefix": prefix, "selection": selection,
                                          "suffix": suffix, "seed": seed}))
                finals = await _frames(ws, {"i0", "i1", "i2", "rw"})
                # next-edit: the history and prompt are rank 0's, the rewrite runs on every rank
                await ws.send(json.dumps({"type": "edit", "id": "e", "session": "m.py", **NEXT_EDIT_DONE}))
                await ws.send(json.dumps({"type": "next_edit", "id": "ne", "text": NEXT_EDIT_TEXT,
                                          "cursor": NEXT_EDIT_DONE["start"] + 5, "session": "m.py"}))
                finals.update(await _frames(ws, {"ne"}))
                # a slow request (0.5 s a step, every rank), cancelled after its second step
                await ws.send(json.dumps({"type": "infill", "id": "slow", "prefix": faults.MARKER + "\n" + PREFIX,
                                          "max_new_tokens": 64, "seed": 5}))
                seen = 0
                while seen < 2:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    assert frame["type"] == "step", frame
                    seen += 1
                await ws.send(json.dumps({"type": "cancel", "id": "slow"}))
                while (frame := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] == "step":
                    seen += 1
                assert frame == {"type": "cancelled", "id": "slow"}
                return finals, seen

        finals, seen = asyncio.run(talk())
        metrics = _step_metrics(f"http://{url}/metrics")
        os.kill(rank0, signal.SIGINT)  # stopping rank 0 stops the launch, cleanly
        assert launch.proc.wait(LAUNCH_TIMEOUT_S) == 0, launch.log()
    finally:
        launch.stop()
    passes_before = reference.decoder_passes["n"]
    for i, (prefix, suffix, n, seed) in enumerate(requests):
        assert finals[f"i{i}"].get("text") == reference.infill(prefix, suffix, max_new_tokens=n, seed=seed).text, \
            finals[f"i{i}"]
    prefix, selection, suffix, seed = REWRITE
    assert finals["rw"].get("text") == reference.rewrite(prefix, selection, suffix, seed=seed).text, finals["rw"]
    from dg_edit.edits import TextEdit

    expected = reference.next_edit(NEXT_EDIT_TEXT, NEXT_EDIT_DONE["start"] + 5, session="ne-reference",
                                   edits=[TextEdit(**NEXT_EDIT_DONE)])
    assert finals["ne"]["type"] == "done" and finals["ne"]["steps"] > 0, finals["ne"]
    assert (finals["ne"]["text"], finals["ne"]["window"]) == (expected.text, list(expected.window)), finals["ne"]
    expected_passes = reference.decoder_passes["n"] - passes_before
    counts = rank_counts(launch.log())
    assert set(counts) == {0, 1} and counts[0] == counts[1], launch.log()  # every rank ran the same passes
    _, _, passes, request_steps, most_batched, _ = counts[0]
    # The requests sent together shared decoder passes, on every rank: fewer passes than their steps.
    assert most_batched >= 2 and passes < request_steps, counts
    # Rank 0's /metrics saw the same batched steps: requests per decoder forward, summed and counted.
    # (Each rewrite, rw and the next edit's, scores its selection in one more decoder pass, outside the batch.)
    assert metrics == {"requests": request_steps, "forwards": passes - 2}, (metrics, counts)
    slow_steps = request_steps - expected_passes
    # The cancelled request ran on every rank until rank 0 stopped it: the steps the client saw, plus at
    # most the one running when the cancel arrived and one already under way on the model thread.
    assert seen <= slow_steps <= seen + 2, (counts, expected_passes, seen)


def _step_metrics(url: str) -> dict[str, float]:
    """The service's `dg_edit_step_requests` histogram: requests carried by its decoder forwards, and forwards."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    readings: list[dict[str, float]] = []
    for _ in range(120):  # the cancelled request's step under way (0.5 s, slowed) when the cancel came ends later
        response = httpx.get(url, timeout=30)
        assert response.status_code == 200, response.text
        samples = {s.name: s.value for family in text_string_to_metric_families(response.text)
                   for s in family.samples}
        readings.append({"requests": samples["dg_edit_step_requests_sum"],
                         "forwards": samples["dg_edit_step_requests_count"]})
        if len(readings) >= 8 and all(r == readings[-1] for r in readings[-8:]):  # unchanged for 1.4 s
            return readings[-1]
        time.sleep(0.2)
    raise AssertionError(f"the service's steps did not settle: {readings[-8:]}")


# ---------------------------------------------------------------------------------------------- failures
def _slow_request_then(model_dir, tmp_path, action, extra_args=()):
    """Start a slow marked request on a `serve --parallel tp` launch, apply `action(launch)` after its first
    step, and return (the request's final frame, seconds from the action to it, the launch)."""
    launch = Launch(["serve", "--port", "0", "--parallel", "tp", "--model", str(model_dir), *extra_args],
                    tmp_path / "serve.log", **{faults.FAULT_ENV: "slow:0.5"})
    url = launch.wait_for(r"ws://(\S+)/ws")[1]

    async def talk():
        async with connect(f"ws://{url}/ws") as ws:
            await ws.send(json.dumps({"type": "infill", "id": "r", "prefix": faults.MARKER + "\n" + PREFIX,
                                      "seed": 1}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert frame["type"] == "step", frame
            t0 = time.monotonic()
            action(launch)
            while (frame := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] == "step":
                pass
            return frame, time.monotonic() - t0

    frame, seconds = asyncio.run(talk())
    return frame, seconds, launch


def test_a_worker_that_dies_gets_requests_answered_and_the_launch_stopped(model_dir, tmp_path):
    frame, seconds, launch = _slow_request_then(model_dir, tmp_path,
                                                lambda launch: os.kill(launch.pid(1), signal.SIGKILL))
    try:
        assert frame["type"] == "error" and frame["id"] == "r", frame
        assert "parallel launch has failed" in frame["message"] and "ParallelFailure" in frame["message"]
        assert seconds < 10, seconds
        code = launch.proc.wait(60)  # torchrun: rank 1 died, rank 0 answered and exited 1
        assert code != 0
        log = launch.log()
        assert re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: 1 ", log), log
    finally:
        launch.stop()


def test_a_worker_that_hangs_times_out_and_rank_0_exits(model_dir, tmp_path):
    timeout_s = 4
    frame, seconds, launch = _slow_request_then(
        model_dir, tmp_path, lambda launch: os.kill(launch.pid(1), signal.SIGSTOP),
        ["--parallel-timeout", str(timeout_s)])
    try:
        assert frame["type"] == "error", frame
        assert "Timed out" in frame["message"], frame
        assert timeout_s - 1 < seconds < timeout_s + 10, seconds
        rank0 = launch.pid(0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(rank0):
            time.sleep(0.1)
        assert not _alive(rank0), launch.log()  # rank 0 left on its own; torchrun ends the frozen rank
        assert "dg-edit serve: stopped" in launch.log()
    finally:
        launch.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by torchrun) counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_rank_that_cannot_load_its_shard_stops_the_launch_with_its_message(model_dir, tmp_path):
    broken = tmp_path / "broken-copy"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # node 1's copy of the weights is truncated
    port = _free_port()
    nodes = []
    for node, path in ((0, model_dir), (1, broken)):
        cmd = torchrun(["infill", "--json", "--parallel", "tp", "--model", str(path)], nnodes=2, node_rank=node,
                       master_port=port, nproc=1)
        nodes.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True))
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode != 0 for p in nodes)
    node0_err, node1_err = outputs[0][1], outputs[1][1]
    assert re.search(r"dg-edit: rank 1 of 2 cannot load its shard: \S*Error: .*header", node0_err), node0_err
    assert "rank 0 of 2" not in node0_err  # the rank that loaded is not blamed
    assert "rank 1/2: cannot load its shard" in node1_err, node1_err


# ---------------------------------------------------------------------------------------------- language server
async def _inline_texts(client, documents: list[tuple[str, int, int]]) -> list[list[str]]:
    """initialize, then one inline completion per (text, line, character) document; the items' texts."""
    from lsprotocol import types as t

    await asyncio.wait_for(client.initialize_async(t.InitializeParams(
        capabilities=t.ClientCapabilities(), initialization_options={"max_new_tokens": 12})), 120)
    client.initialized(t.InitializedParams())
    results = []
    for n, (text, line, character) in enumerate(documents):
        uri = f"file:///tmp/dg-edit-parallel/doc{n}.py"
        client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        out = await asyncio.wait_for(client.text_document_inline_completion_async(t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked),
            text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line=line, character=character))),
            120)
        items = out.items if hasattr(out, "items") else (out or [])
        results.append([item.insert_text for item in items])
        client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=uri)))
    return results


def test_lsp_over_tcp_gives_the_same_completions_as_one_process(model_dir, tmp_path):
    from pygls.lsp.client import LanguageClient

    from dg_edit.testing import stop_language_client

    documents = [(PREFIX + "\n\nprint(add(1, 2))\n", 1, 11), ("import os\n\n", 1, 0)]
    port = _free_port()
    launch = Launch(["lsp", "--tcp", f"127.0.0.1:{port}", "--parallel", "tp", "--model", str(model_dir)],
                    tmp_path / "lsp.log")
    try:
        launch.pid(1)
        rank0 = launch.pid(0)

        async def over_tcp():
            client = LanguageClient("dg-edit-parallel", "0")
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while True:
                try:
                    await client.start_tcp("127.0.0.1", port)
                    break
                except OSError:
                    assert time.monotonic() < deadline, launch.log()
                    await asyncio.sleep(0.2)
            texts = await _inline_texts(client, documents)
            await asyncio.wait_for(client.shutdown_async(None), 30)
            client.exit(None)
            await client.stop()
            return texts

        parallel = asyncio.run(over_tcp())
        deadline = time.monotonic() + 30
        while _alive(rank0) and time.monotonic() < deadline:  # `exit` ends rank 0, which stops the others
            time.sleep(0.1)
        assert launch.proc.wait(LAUNCH_TIMEOUT_S) == 0, launch.log()
    finally:
        launch.stop()
    counts = rank_counts(launch.log())
    assert set(counts) == {0, 1} and counts[0] == counts[1] and counts[0][2] > 0, launch.log()

    async def one_process():
        client = LanguageClient("dg-edit-parallel", "0")
        await client.start_io(sys.executable, "-m", "dg_edit.lsp.server", "--model", str(model_dir), env=env())
        try:
            return await _inline_texts(client, documents)
        finally:
            await stop_language_client(client, 20)

    assert any(parallel), parallel  # something to compare
    assert parallel == asyncio.run(one_process())
