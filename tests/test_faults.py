"""Fault injection: a model that raises mid-canvas, runs out of memory, returns NaN logits or is slow; a cancel after done;
a disk that is full or a file that is read-only when the TUI saves.

The servers are real processes; the model misbehaves through the test-only switch
`DG_EDIT_FAULT` (dg_edit/faults.py), and only for requests containing `faults.MARKER`, so each test
shows the failing request gets a clear error while every other request on the same server is
served. (A client disconnecting mid-stream is covered in test_service.py.)
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient
from websockets.asyncio.client import connect

from dg_edit import faults
from dg_edit.serve_process import ServeGroup, ServeProcess
from dg_edit.testing import stop_language_client

pytestmark = pytest.mark.timeout(300)
module_loop = pytest.mark.asyncio(loop_scope="module")

MARK = f"# {faults.MARKER}\n"
PREFIX = "def add(a, b):\n    return "
TERMINAL = {"done", "cancelled", "error"}


# ---------------------------------------------------------------------------------------------- the core
def test_nan_logits_stop_the_request_before_any_draft_is_shown(tiny_model_dir):
    from dg_edit import Engine
    from dg_edit.sampler import NonFiniteLogits

    engine = Engine.load(str(tiny_model_dir))
    faults.install(engine.model, engine.tokenizer, "nan")
    for suffix in ("", "\nprint(add(1, 2))\n"):  # plain canvas (multinomial) and clamped (inverse-CDF draws)
        events = engine.stream(MARK + PREFIX, suffix, seed=1)
        with pytest.raises(NonFiniteLogits, match="non-finite logits"):
            next(events)  # not even the first draft: it would be garbage
    assert engine.infill(PREFIX, "\n", seed=1).steps >= 1  # the engine itself is fine afterwards


def test_a_model_raising_mid_canvas_ends_that_stream_after_its_drafts(tiny_model_dir):
    from dg_edit import Engine, Step

    engine = Engine.load(str(tiny_model_dir))
    faults.install(engine.model, engine.tokenizer, "raise:3")
    seen = []
    with pytest.raises(RuntimeError, match="injected fault"):
        for event in engine.stream(MARK + PREFIX, "\n", seed=1):
            seen.append(event)
    assert len(seen) == 2 and all(isinstance(e, Step) for e in seen)
    assert engine.infill(PREFIX, "\n", seed=1).steps >= 1


# ---------------------------------------------------------------------------------------------- websocket service
SLOW_STEP_S, SLOW_TIMEOUT_S = 0.5, 5


@pytest.fixture(scope="module")
def faulty_services(model_dir, tiny_model_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("faults") / "slow.json"
    config.write_text(json.dumps({"request_timeout_s": SLOW_TIMEOUT_S}))
    model = ["--model", str(model_dir)]
    # The slow server runs the tiny random model: it never stops early, so a request of 64 tokens is
    # sure to take 16 steps (8 s at 0.5 s a step) and outlive its 5 s limit, whatever the embedded
    # model's weights are.
    slow = ["--model", str(tiny_model_dir), "--config", str(config)]
    with ServeGroup({
        "raise": ServeProcess(model, env={faults.FAULT_ENV: "raise:2"}),
        "nan": ServeProcess(model, env={faults.FAULT_ENV: "nan:2"}),
        "oom": ServeProcess(model, env={faults.FAULT_ENV: "oom:2"}),
        "slow": ServeProcess(slow, env={faults.FAULT_ENV: f"slow:{SLOW_STEP_S}"}),
    }) as procs:
        yield procs


async def collect(ws, ids, timeout: float = 120) -> dict[str, list[dict]]:
    frames: dict[str, list[dict]] = {i: [] for i in ids}
    pending = set(ids)
    while pending:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        frames.setdefault(frame["id"], []).append(frame)
        if frame["type"] in TERMINAL:
            pending.discard(frame["id"])
    return frames


def infill(rid: str, prefix: str, **extra) -> str:
    return json.dumps({"type": "infill", "id": rid, "prefix": prefix, "suffix": "\n", "seed": 1, **extra})


@module_loop
@pytest.mark.parametrize("kind, words", [("raise", "injected fault"), ("nan", "non-finite logits"),
                                         ("oom", "out of memory on cpu while denoising this request")])
async def test_a_failing_model_errors_that_request_only(faulty_services, kind, words):
    server = faulty_services[kind]
    async with connect(server.ws_url) as ws, connect(server.ws_url) as other:
        # The failing request and a healthy one on the same connection, another on a second one.
        await ws.send(infill("bad", MARK + PREFIX, max_new_tokens=64))
        await ws.send(infill("good", PREFIX, max_new_tokens=64))
        await other.send(infill("other", "import os\n", max_new_tokens=64))
        frames = await collect(ws, ["bad", "good"])
        other_frames = await collect(other, ["other"])
        bad = frames["bad"][-1]
        assert (bad["type"], bad["code"]) == ("error", "model_error"), bad
        assert words in bad["message"]
        assert frames["bad"][0]["type"] == "step", "it failed mid-canvas, after its first draft"
        if kind == "nan":
            assert all(f["type"] != "step" or f["step"] < 2 for f in frames["bad"]), "no NaN draft is shown"
        assert frames["good"][-1]["type"] == "done"
        assert other_frames["other"][-1]["type"] == "done"
        # The failing connection goes on serving.
        await ws.send(infill("after", PREFIX))
        assert (await collect(ws, ["after"]))["after"][-1]["type"] == "done"
    assert "request bad on connection" in server.log()  # the traceback is in the service log, for people


@module_loop
async def test_a_slow_model_times_out_that_request_and_others_are_served_meanwhile(faulty_services):
    server = faulty_services["slow"]
    arrivals: list[tuple[str, dict]] = []  # (connection, frame), in the order the client received them

    async def read_until_final(name: str, ws) -> dict:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            arrivals.append((name, frame))
            if frame["type"] in TERMINAL:
                return frame

    async with connect(server.ws_url) as slow, connect(server.ws_url) as fast:
        await slow.send(infill("slow", MARK + PREFIX, max_new_tokens=64))
        first = json.loads(await asyncio.wait_for(slow.recv(), 60))
        assert (first["id"], first["type"]) == ("slow", "step")
        slow_reader = asyncio.create_task(read_until_final("slow", slow))
        # The slow request holds the model for 0.5 s a step, with 15 steps to go and 5 s to live (room for the other request to start on a loaded machine).
        await fast.send(infill("fast", PREFIX, max_new_tokens=64))
        first_fast = json.loads(await asyncio.wait_for(fast.recv(), 60))
        arrivals.append(("fast", first_fast))
        assert (first_fast["id"], first_fast["type"]) == ("fast", "step"), first_fast
        await fast.send(json.dumps({"type": "cancel", "id": "fast"}))
        assert (await collect(fast, ["fast"]))["fast"][-1]["type"] == "cancelled"
        final = await slow_reader
    assert (final["type"], final["code"]) == ("error", "timeout"), final
    assert f"request_timeout_s={SLOW_TIMEOUT_S}" in final["message"]
    # Served meanwhile: the other client's first draft came while the slow request was still running,
    # with slow drafts after it. A service that ran one request at a time could only have answered it
    # after the slow request's timeout error.
    order = [(name, frame["type"]) for name, frame in arrivals]
    after_fast = order[order.index(("fast", "step")) + 1:]
    assert ("slow", "step") in after_fast, order
    assert after_fast[-1] == ("slow", "error"), order


@module_loop
async def test_a_cancel_after_done_is_an_unknown_id_and_changes_nothing(faulty_services):
    server = faulty_services["raise"]
    async with connect(server.ws_url) as ws:
        await ws.send(infill("r1", PREFIX, max_new_tokens=8))
        done = (await collect(ws, ["r1"]))["r1"][-1]
        assert done["type"] == "done"
        await ws.send(json.dumps({"type": "cancel", "id": "r1"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert (reply["type"], reply["id"], reply["code"]) == ("error", "r1", "unknown_id")
        await ws.send(infill("r2", PREFIX, max_new_tokens=8))
        frames = (await collect(ws, ["r2"]))["r2"]
        assert frames[-1]["type"] == "done" and frames[-1]["text"] == done["text"]  # same input, same seed


# ---------------------------------------------------------------------------------------------- language server
class Lsp:
    def __init__(self):
        self.client = LanguageClient("dg-edit-faults", "0")
        self.edits: list = []
        self.logs: list = []
        self.client.feature(t.WORKSPACE_APPLY_EDIT)(
            lambda ls, p: self.edits.append(p) or t.ApplyWorkspaceEditResult(applied=True))
        self.client.feature(t.WINDOW_LOG_MESSAGE)(lambda ls, p: self.logs.append(p.message))

    async def start(self, model_dir, log_file, fault: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", faults.FAULT_ENV: fault}
        await self.client.start_io(sys.executable, "-m", "dg_edit.lsp.server", "--model", str(model_dir),
                                   "--log-file", str(log_file), env=env)
        caps = t.ClientCapabilities(workspace=t.WorkspaceClientCapabilities(apply_edit=True))
        # No context from other open documents (max_extra_tokens 0): with it, the marked document's
        # text would be in every request's prompt, and the fault marks requests by their prompt.
        await asyncio.wait_for(self.client.initialize_async(t.InitializeParams(
            capabilities=caps, initialization_options={"max_new_tokens": 16, "max_extra_tokens": 0})), 60)
        self.client.initialized(t.InitializedParams())

    def open(self, text: str) -> str:
        uri = f"file:///tmp/dg-edit-faults/{uuid.uuid4().hex}.py"
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        return uri

    async def inline(self, uri: str, line: int, character: int):
        return await asyncio.wait_for(self.client.text_document_inline_completion_async(t.InlineCompletionParams(
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
            text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line=line, character=character))),
            120)

    async def stop(self):
        await stop_language_client(self.client, 20)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def faulty_lsp(model_dir, tmp_path_factory):
    lsp = Lsp()
    await lsp.start(model_dir, tmp_path_factory.mktemp("faults-lsp") / "server.log", "raise:2")
    yield lsp
    await lsp.stop()


@module_loop
async def test_lsp_model_failure_is_an_error_and_no_edit_is_sent(faulty_lsp):
    lsp = faulty_lsp
    text = MARK + PREFIX + "\n"
    bad = lsp.open(text)
    with pytest.raises(JsonRpcException) as info:
        await lsp.inline(bad, 1, len(PREFIX.split("\n")[1]))
    assert info.value.code == -32603 and "injected fault" in info.value.message
    # The rewrite command fails the same way and never asks the editor to change the buffer.
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(lsp.client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="dg-edit.rewrite", arguments=[{"uri": bad, "range": {
                "start": {"line": 1, "character": 0}, "end": {"line": 2, "character": 0}}, "strength": 1}])), 120)
    assert info.value.code == -32603
    assert lsp.edits == []
    assert any("injected fault" in m for m in lsp.logs)
    # Everyone else is served.
    good = lsp.open(PREFIX + "\n")
    result = await lsp.inline(good, 1, 11)
    assert isinstance(result.items, (list, tuple))


@module_loop
async def test_lsp_cancel_after_the_answer_is_harmless(faulty_lsp):
    lsp = faulty_lsp
    uri = lsp.open(PREFIX + "\n")
    params = t.InlineCompletionParams(
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic),
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line=1, character=11))
    msg_id = f"late-{uuid.uuid4().hex}"
    first = await asyncio.wait_for(lsp.client.protocol.send_request_async(
        t.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id), 120)
    lsp.client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=msg_id))  # after the answer
    second = await lsp.inline(uri, 1, 11)
    assert [i.insert_text for i in second.items] == [i.insert_text for i in first.items]  # same seed, same text


# ---------------------------------------------------------------------------------------------- TUI saves
SOURCE = "def add(a, b):\n    return a + b\n"


def _typed_and_saved(path: Path, engine) -> tuple[str, object]:
    """Open `path` in the TUI, type a character, press ctrl+s; returns (status message, app)."""
    from dg_edit.tui.app import DgEditApp

    async def run():
        app = DgEditApp(path, engine=engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("x", "ctrl+s")
            await pilot.pause()
            for _ in range(40):
                if "save" in app.status.message:
                    break
                await pilot.pause(0.05)
            return app.status.message, app.status.error, app.dirty, app.editor.text

    return asyncio.run(run())


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (real ENOSPC) when this process may mount one (root), else None."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_tui_save_on_a_full_disk_keeps_the_file_and_the_buffer(tiny_fs, tmp_path, engine):
    if tiny_fs is not None:  # a real full filesystem
        path = tiny_fs / "example.py"
        path.write_text(SOURCE)
        with pytest.raises(OSError) as full:  # fill the filesystem up
            (tiny_fs / "filler").write_bytes(b"\0" * (64 * 1024))
        assert full.value.errno == errno.ENOSPC
    else:  # not root: the kernel's file size limit fails the write (EFBIG) just the same
        path = tmp_path / "example.py"
        path.write_text(SOURCE)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        if tiny_fs is None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(SOURCE), old_limit[1]))
        message, error, dirty, text = _typed_and_saved(path, engine)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "save failed" in message and error, message
    assert dirty and text == "x" + SOURCE  # nothing typed is lost
    assert path.read_text() == SOURCE  # the file on disk is untouched
    assert sorted(p.name for p in path.parent.iterdir() if p.name != "filler") == ["example.py"]  # no temp left


def test_tui_save_of_a_read_only_file_is_refused_and_changes_nothing(tmp_path, engine):
    path = tmp_path / "example.py"
    path.write_text(SOURCE)
    path.chmod(0o444)
    message, error, dirty, text = _typed_and_saved(path, engine)
    assert "save failed" in message and error and "read-only" in message, message
    assert dirty and text == "x" + SOURCE
    assert path.read_text() == SOURCE and (path.stat().st_mode & 0o777) == 0o444
    assert sorted(os.listdir(tmp_path)) == ["example.py"]
