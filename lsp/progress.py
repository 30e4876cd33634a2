"""Per-step reporting while a canvas refines: `$/progress` (work-done) and `dgEdit/canvas`.

`$/progress` is the standard channel: editors show "step i/N" in a status bar. It is sent when the
client gave a `workDoneToken` with the request, or, for commands, when it supports server-created
progress (`window.workDoneProgress`). `dgEdit/canvas` carries the draft text itself so editor
plug-ins can animate the refinement as ghost text:

    {"uri": str, "version": int, "requestId": <JSON-RPC id>, "step": int, "text": str, "done": bool}

plus `"kind": "next_edit"` for a next-edit request, whose draft is the rewritten window, not text
to draw at the cursor (plug-ins that animate infills skip those).

Steps count up from 1. Exactly one notification with `done: true` ends every request that sent
steps: its `text` is the final result, or "" when the request was cancelled, went stale or failed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from lsprotocol import types

from dg_edit.events import Done, Step

from .state import DgEditServer

logger = logging.getLogger(__name__)

CANVAS = "dgEdit/canvas"


class StepReporter:
    """Sends begin/report/end for one request; use as `with StepReporter(...) as r: r.step(ev)`."""

    def __init__(self, ls: DgEditServer, uri: str, version: int, request_id: Any, title: str,
                 token: types.ProgressToken | None = None, canvas: bool = True, kind: str | None = None):
        self.ls = ls
        self.uri = uri
        self.version = version
        self.request_id = request_id
        self.title = title
        self.token = token
        self.canvas = canvas
        self.kind = kind
        self.last_step = 0
        self._final: str = ""

    @classmethod
    async def for_command(cls, ls: DgEditServer, uri: str, version: int, title: str) -> "StepReporter":
        """A reporter with a server-created progress token when the client supports one."""
        token = None
        window = ls.client_capabilities.window
        if window is not None and window.work_done_progress:
            token = f"dg-edit/{uuid.uuid4()}"  # fresh each time: pygls never frees tokens
            try:
                await ls.work_done_progress.create_async(token)
            except Exception as e:  # the client refused: carry on without $/progress
                logger.info("window/workDoneProgress/create failed: %s", e)
                token = None
        return cls(ls, uri, version, ls.protocol.msg_id, title, token)

    def __enter__(self) -> "StepReporter":
        if self.token is not None:
            self.ls.work_done_progress.begin(
                self.token, types.WorkDoneProgressBegin(title=self.title, message="starting", percentage=0))
        return self

    def step(self, event: Step) -> None:
        self.last_step = event.index
        if self.token is not None:
            pct = min(100, round(100 * event.index / max(event.total, 1)))
            self.ls.work_done_progress.report(
                self.token, types.WorkDoneProgressReport(message=f"step {event.index}/{event.total}", percentage=pct))
        if self.canvas:
            self._notify(event.index, event.text, False)

    def done(self, result: Done | str) -> None:
        """Remember the final text (sent with `done: true` when the block exits normally)."""
        self._final = result.text if isinstance(result, Done) else result

    def __exit__(self, exc_type, exc, tb) -> None:
        ok = exc_type is None
        text = self._final if ok else ""
        if self.canvas and (self.last_step or ok):
            self._notify(self.last_step, text, True)
        if self.token is not None:
            message = "done" if ok else ("cancelled" if exc_type is not None and "Cancel" in exc_type.__name__
                                         else "stopped")
            self.ls.work_done_progress.end(self.token, types.WorkDoneProgressEnd(message=message))
            self.ls.work_done_progress.tokens.pop(self.token, None)

    def _notify(self, step: int, text: str, done: bool) -> None:
        params = {"uri": self.uri, "version": self.version, "requestId": self.request_id, "step": step,
                  "text": text, "done": done}
        if self.kind is not None:
            params["kind"] = self.kind
        self.ls.protocol.notify(CANVAS, params)
