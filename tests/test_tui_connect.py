"""`dg-edit tui --connect`: the TUI driving a real `dg-edit serve` process over its websocket protocol."""

from __future__ import annotations

import socket

import pytest

from dg_edit.serve_process import ServeProcess
from dg_edit.tui.app import DgEditApp, build_parser, engine_loader
from dg_edit.tui.remote import RemoteEngine, RemoteError

from tui_pilot import SIZE, SOURCE, infill_at, split, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(model_dir):
    with ServeProcess(["--model", str(model_dir)]) as proc:
        yield proc


@pytest.fixture
def source_file(tmp_path):
    p = tmp_path / "example.py"
    p.write_text(SOURCE)
    return p


def connected_app(path, server) -> DgEditApp:
    args = build_parser().parse_args([str(path), "--connect", server.ws_url])
    return DgEditApp(path, load_engine=engine_loader(args))


async def test_infill_and_accept_through_the_service(source_file, server):
    app = connected_app(source_file, server)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "ready", what="the connection")
        assert isinstance(app.engine, RemoteEngine)
        await pilot.press("f3")
        await infill_at(pilot, app, (8, 4))
        final = app.editor.proposal.final
        assert app.canvas_panel.step is not None  # steps arrived over the websocket
        assert "tok/fwd" in app.status.progress
        await pilot.press("tab")
        await pilot.pause()
        prefix, suffix = split(SOURCE, 8, 4)
        assert app.editor.text == prefix + final + suffix


async def test_rewrite_through_the_service_and_reject(source_file, server):
    app = connected_app(source_file, server)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "ready", what="the connection")
        app.editor.selection = ((3, 0), (4, 16))
        await pilot.press("ctrl+r")
        await pilot.pause()
        app.screen.query_one("#strength").value = "1"
        app.screen.query_one("#strength").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.editor.proposal is not None and app.editor.proposal.final is not None,
                       what="the rewrite")
        await pilot.press("escape")
        await pilot.pause()
        assert app.editor.text == SOURCE


async def test_cancel_then_a_new_request_on_the_same_connection(source_file, server):
    app = connected_app(source_file, server)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "ready", what="the connection")
        app.editor.move_cursor((8, 4))
        await pilot.press("ctrl+space")
        await wait_for(pilot, lambda: app.status.progress.startswith("step") or app.request is None,
                       what="the first step")
        await pilot.press("escape")
        await pilot.pause()
        assert app.editor.text == SOURCE
        await infill_at(pilot, app, (8, 4))  # the connection is still usable
        assert app.editor.proposal.final


async def test_service_error_leaves_the_buffer_unchanged(tmp_path, server):
    empty = tmp_path / "empty.py"
    empty.write_text("")
    app = connected_app(empty, server)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "ready", what="the connection")
        await pilot.press("ctrl+space")
        await wait_for(pilot, lambda: "model error" in app.status.message, what="the error frame")
        assert "bad_request" in app.status.message
        assert app.editor.text == "" and app.editor.proposal is None


async def test_unreachable_service_is_reported_and_the_file_stays_editable(source_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    args = build_parser().parse_args([str(source_file), "--connect", f"ws://127.0.0.1:{port}/ws"])
    app = DgEditApp(source_file, load_engine=engine_loader(args))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "no model", what="the connection failure")
        assert "cannot connect" in app.status.message and str(port) in app.status.message
        await pilot.press("x", "ctrl+s")
        await pilot.pause()
    assert source_file.read_text() == "x" + SOURCE


def test_remote_engine_raises_service_errors(server):
    engine = RemoteEngine(server.ws_url).connect()
    try:
        with pytest.raises(RemoteError, match="bad_request"):
            list(engine.stream("", ""))
        events = list(engine.stream("def f(x):\n    return ", "\n"))  # still usable after an error
        assert events[-1].steps >= 1 and all(e.index >= 1 for e in events[:-1])
    finally:
        engine.close()


async def test_service_going_away_is_reported_and_the_buffer_kept(source_file, model_dir):
    proc = ServeProcess(["--model", str(model_dir)]).start().wait_ready()
    try:
        app = connected_app(source_file, proc)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", what="the connection")
            proc.stop()
            app.editor.move_cursor((8, 4))
            await pilot.press("ctrl+space")
            await wait_for(pilot, lambda: "model error" in app.status.message, what="the failure")
            assert "closed" in app.status.message or "connect" in app.status.message
            assert app.editor.text == SOURCE and app.editor.proposal is None
            await pilot.press("ctrl+space")  # tries a new connection, which fails clearly
            await wait_for(pilot, lambda: "cannot connect" in app.status.message, what="the reconnection failure")
            assert app.editor.text == SOURCE
    finally:
        proc.stop()


def test_remote_engine_serialises_a_new_request_behind_a_cancelled_one(server):
    """The TUI starts the next request in a new worker thread while the cancelled one may still be
    draining its frames: both must work on the one connection."""
    import threading

    engine = RemoteEngine(server.ws_url).connect()
    try:
        first = engine.stream("def f(x):\n    return ", "\n")
        assert next(first).index >= 1  # the request is running
        closer = threading.Thread(target=first.close)  # cancel + drain, in its own thread
        closer.start()
        events = list(engine.stream("import os\n", ""))  # meanwhile, from this thread
        closer.join(30)
        assert not closer.is_alive()
        assert events[-1].steps >= 1
    finally:
        engine.close()


def test_the_tui_names_its_file_for_a_load_balancer(tmp_path):
    """Behind replicas (dg_edit/serve/deploy/dg-edit-nginx.conf) the file must reach the replica that
    holds its cache: `--connect` sends X-DG-Edit-Document with the file's absolute path."""
    import threading

    from websockets.sync.server import serve

    from dg_edit.config import DOCUMENT_HEADER

    seen: list[str | None] = []

    def handler(ws):
        seen.append(ws.request.headers.get(DOCUMENT_HEADER))

    path = tmp_path / "naïve module.py"
    path.write_text(SOURCE)
    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        args = build_parser().parse_args([str(path), "--connect", f"ws://127.0.0.1:{port}/ws"])
        engine = engine_loader(args)()
        engine.close()
        server.shutdown()
    from urllib.parse import unquote

    assert len(seen) == 1 and seen[0] is not None and seen[0].isascii(), seen
    assert unquote(seen[0]) == str(path.resolve())


async def test_next_edit_through_the_service(tmp_path, server):
    """The TUI's edits travel as `edit` frames and f4 as a `next_edit` request; the suggestion's edits
    come back in the `done` frame, are shown as a diff and applied with tab."""
    from test_tui_next_edit import RENAME, RENAMED, rename, suggestion_after

    path = tmp_path / "prices.py"
    path.write_text(RENAME)
    app = connected_app(path, server)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "ready", what="the connection")
        await rename(pilot, app)
        assert not app.status.error, app.status.message  # every edit frame was accepted
        suggestion = await suggestion_after(pilot, app, "f4")
        edit = suggestion.edit
        assert suggestion.text == RENAMED and RENAMED[edit.start: edit.end] == edit.old_text
        await pilot.press("tab")
        await pilot.pause()
        assert app.editor.text == RENAMED[: edit.start] + edit.text + RENAMED[edit.end:]


def test_a_refused_edit_is_raised_by_the_next_request(server):
    """The service refuses an edit whose offsets do not fit (end before start); the refusal is not
    lost: the next request on the connection raises it, and the TUI shows that error."""
    from dg_edit.edits import TextEdit

    engine = RemoteEngine(server.ws_url).connect()
    try:
        bad = TextEdit(0, 0, "x")
        # TextEdit refuses end < start itself; forged past that check, as a buggy client might send it
        object.__setattr__(bad, "start", 7)
        object.__setattr__(bad, "end", 5)
        engine.record_edit("doc", bad)
        with pytest.raises(RemoteError) as info:
            list(engine.stream_next_edit("x = 1\n", 0, session="doc"))
        assert "refused an edit" in str(info.value)
        done = list(engine.stream_next_edit("x = 1\ny = 2\n", 0, session="doc"))[-1]  # the connection goes on
        assert done.edits is not None
    finally:
        engine.close()
