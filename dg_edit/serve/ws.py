"""The websocket route `/ws`: one `Client` per connection, streaming every denoising step as a frame.

- Each request is an asyncio task reading `runner.run_job`, so the model runs in a worker thread and
  the event loop only moves frames; requests on one connection run concurrently and the engine
  interleaves their steps.
- Each connection has one sender task draining its `Outbox`; a lagging client makes only its own
  sender wait (the transport's write buffer is small, see `app.SEND_BUFFER_BYTES`), and its drafts
  are coalesced to the latest one meanwhile.
- Limits come from `Settings`: `max_message_bytes` (the websockets protocol closes with 1009),
  `max_inflight` per connection (`busy`), `request_timeout_s` (`timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..edits import TextEdit
from ..events import Step
from . import protocol
from .outbox import Outbox, OutboxFull
from .protocol import CancelRequest, EditMessage, InfillRequest, NextEditRequest, ProtocolError, RewriteRequest
from .runner import Job, record_edit, run_job

if TYPE_CHECKING:
    from .app import Service

log = logging.getLogger("dg_edit.serve")


class Client:
    """One websocket connection: its in-flight requests, its outbox and its sender task."""

    def __init__(self, service: "Service", websocket: WebSocket, number: int):
        self.service = service
        self.engine = service.engine
        self.settings = service.settings
        self.websocket = websocket
        self.number = number
        self.inflight: dict[str, asyncio.Task] = {}
        self._cancel_requested: set[str] = set()
        self._sessions: set[str] = set()
        self.outbox = Outbox()
        self._closing: asyncio.Task | None = None

    async def run(self) -> None:
        await self.websocket.accept()
        sender = asyncio.create_task(self._send_loop(), name=f"dg-edit-ws{self.number}-sender")
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    # The client went away mid-stream, or sent a frame over max_message_bytes (the
                    # protocol has already closed with 1009). Either way: stop its requests below,
                    # keep serving the others.
                    log.info("connection %d closed: %s", self.number, message.get("reason") or message.get("code"))
                    break
                text, data = message.get("text"), message.get("bytes")
                self._receive(text if text is not None else data)
        finally:
            tasks = self.stop_requests()
            await asyncio.gather(*tasks, return_exceptions=True)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            loop = asyncio.get_running_loop()
            for session in self._sessions:  # forget() waits for the engine's lock: not on the loop
                await loop.run_in_executor(self.service.executor, self.engine.forget, session)

    def stop_requests(self) -> list[asyncio.Task]:
        """Cancel every in-flight request (no `cancelled` frames: nobody is listening any more)."""
        tasks = list(self.inflight.values())
        for task in tasks:
            task.cancel()
        return tasks

    # ------------------------------------------------------------------ incoming frames
    def _receive(self, message: str | bytes | None) -> None:
        try:
            request = protocol.parse_request(message)
            if isinstance(request, CancelRequest):
                self._cancel(request.id)
            elif isinstance(request, EditMessage):
                self._record(request)
            else:
                self._start(request)
        except ProtocolError as e:
            self._put_final(protocol.error_frame(e.code, e.message, e.request_id))
        except Exception as e:  # a parser bug must cost one error frame, not the connection
            log.exception("frame on connection %d could not be handled", self.number)
            self._put_final(protocol.error_frame(protocol.BAD_REQUEST, f"frame not understood ({type(e).__name__}: "
                                                                       f"{e})"))

    def _record(self, message: EditMessage) -> None:
        """An `edit` frame: into the session's edit history now (in frame order, so a `next_edit` sent
        after it sees it); refused input is a `bad_request` error frame with the frame's id."""
        try:
            edit = TextEdit(message.start, message.end, message.text, message.old_text)
            record_edit(self.engine, self._session(message.session), edit, message.document, message.cursor)
        except ValueError as e:
            raise ProtocolError(protocol.BAD_REQUEST, str(e), message.id) from None

    def _session(self, name: str) -> str:
        session = f"ws{self.number}:{name}"  # connections never share a prefix cache entry or edit history
        self._sessions.add(session)
        return session

    def _start(self, request: InfillRequest | RewriteRequest | NextEditRequest) -> None:
        if request.id in self.inflight:
            raise ProtocolError(protocol.DUPLICATE_ID, f"request {request.id!r} is already running on this "
                                                       "connection (it goes on); give each request a new id",
                                request.id)
        if len(self.inflight) >= self.settings.max_inflight:
            raise ProtocolError(protocol.BUSY, f"{len(self.inflight)} requests are already running on this "
                                               f"connection (max_inflight={self.settings.max_inflight}); wait for "
                                               "one to finish or cancel one", request.id)
        refusal = self.service.service_busy()
        if refusal is not None:
            raise ProtocolError(protocol.BUSY, refusal, request.id)
        task = asyncio.create_task(self._serve(request), name=f"dg-edit-ws{self.number}-{request.id}")
        self.inflight[request.id] = task
        task.add_done_callback(lambda t, rid=request.id: self._finished(rid, t))

    def _cancel(self, request_id: str) -> None:
        task = self.inflight.get(request_id)
        # A task that is done has sent its final frame; its done callback just has not run yet. A
        # cancel now must get unknown_id, not silence (cancelling a done task does nothing).
        if task is None or task.done():
            raise ProtocolError(protocol.UNKNOWN_ID, f"no request {request_id!r} is running on this connection "
                                                     "(never sent, or already finished)", request_id)
        if request_id not in self._cancel_requested:
            self._cancel_requested.add(request_id)
            task.cancel()

    def _finished(self, request_id: str, task: asyncio.Task) -> None:
        # A done callback rather than `except CancelledError` in `_serve`: a task cancelled before its
        # first step never enters `_serve`'s body, and it still owes the client a `cancelled` frame.
        self.inflight.pop(request_id, None)
        if request_id in self._cancel_requested:
            self._cancel_requested.discard(request_id)
            if task.cancelled():
                self.outbox.drop_steps(request_id)
                self._put_final(protocol.cancelled_frame(request_id))

    # ------------------------------------------------------------------ running one request
    async def _serve(self, request: InfillRequest | RewriteRequest | NextEditRequest) -> None:
        """Stream one request's events into the outbox; every failure becomes an `error` frame."""
        rid = request.id
        cancel = threading.Event()
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                events = run_job(self.engine, self._job(request), cancel=cancel, executor=self.service.executor)
                async with contextlib.aclosing(events):
                    async for event in events:
                        frame = protocol.event_frame(event, rid)
                        if isinstance(event, Step):
                            self.outbox.put_step(rid, frame)
                        else:
                            self._put_final(frame)
                            break  # no await after the final frame: a cancel cannot add a second one
        except TimeoutError:
            self.outbox.drop_steps(rid)
            self._put_final(protocol.error_frame(
                protocol.TIMEOUT, f"request ran longer than request_timeout_s={self.settings.request_timeout_s:g} "
                                  "s and was stopped", rid))
        except ValueError as e:  # the engine refused the input (empty prefix and suffix, ...)
            self._put_final(protocol.error_frame(protocol.BAD_REQUEST, str(e), rid))
        except Exception as e:  # a model failure must reach the client, and must not end the connection
            log.exception("request %s on connection %d failed", rid, self.number)
            self._put_final(protocol.error_frame(protocol.MODEL_ERROR, f"{type(e).__name__}: {e}", rid))
        finally:
            cancel.set()

    def _job(self, request: InfillRequest | RewriteRequest | NextEditRequest) -> Job:
        session = self._session(request.session) if request.session is not None else None
        if isinstance(request, NextEditRequest):
            return Job("next_edit", request.text, cursor=request.cursor, seed=request.seed, session=session,
                       extra=request.extra)
        if isinstance(request, InfillRequest):
            return Job("infill", request.prefix, request.suffix, max_new_tokens=request.max_new_tokens,
                       seed=request.seed, session=session, single_line=request.single_line, extra=request.extra)
        return Job("rewrite", request.prefix, request.suffix, selection=request.selection,
                   instruction=request.instruction, strength=request.strength, seed=request.seed, session=session,
                   extra=request.extra)

    # ------------------------------------------------------------------ outgoing frames
    def _put_final(self, frame: str) -> None:
        try:
            self.outbox.put_final(frame)
        except OutboxFull as e:
            if self._closing is None:
                log.warning("closing connection %d: %s", self.number, e)
                self._closing = asyncio.create_task(self.websocket.close(1008, "client is not reading its frames"))

    async def _send_loop(self) -> None:
        while True:
            frame = await self.outbox.get()
            try:
                await self.websocket.send_text(frame)
            except (WebSocketDisconnect, OSError, RuntimeError):  # gone, or closed by us (1008)
                return
