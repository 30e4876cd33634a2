"""`dg-edit tui --connect ws://...`: drive a running `dg-edit serve` instead of an in-process model.

`RemoteEngine` looks like an `Engine` to the TUI (`stream`, `stream_rewrite`, `record_edit`,
`stream_next_edit`) and yields the core's
own `Step`/`Done` events, rebuilt from the documented websocket frames (`dg_edit.serve.protocol`), so the
app cannot tell the difference. It runs in the app's model worker thread, hence the synchronous
websockets client. Closing a stream early (the user pressed escape) sends `cancel` for its id and
reads up to the request's last frame, so the connection stays in step for the next request; the
next request waits for that (one request at a time per connection).

What the wire does not carry: the token ids of the canvas (`Step.canvas`), so the canvas panel shows
only the middle's tokens when connected.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import uuid
from typing import Any, Iterator
from urllib.parse import quote

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from dg_edit.config import DOCUMENT_HEADER, Settings
from dg_edit.edits import TextEdit
from dg_edit.events import Done, Step, Token

FINAL_TYPES = ("done", "error", "cancelled")
CANCEL_DRAIN_S = 10.0  # how long to wait for a cancelled request's last frame before dropping the connection


class RemoteError(RuntimeError):
    """The service answered with an `error` frame, or the connection failed; `code` says which."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{message} ({code})")
        self.code = code


def step_from_frame(frame: dict[str, Any]) -> Step:
    tokens = tuple(Token(text=t["text"], accepted=bool(t["accepted"]), confidence=float(t["confidence"]))
                   for t in frame.get("tokens", ()))
    return Step(index=int(frame["step"]), total=int(frame["total"]), text=frame["text"], tokens=tokens,
                ms=float(frame.get("ms", 0.0)))


def done_from_frame(frame: dict[str, Any]) -> Done:
    window = frame.get("window")
    return Done(text=frame["text"], ids=(), steps=int(frame["steps"]),
                tokens_per_forward=float(frame["tokens_per_forward"]), ms=float(frame.get("ms", 0.0)),
                typed_ahead=bool(frame.get("typed_ahead", False)),
                edits=tuple(TextEdit.from_json(e) for e in frame.get("edits", ())),
                window=tuple(window) if window is not None else None, prepared=bool(frame.get("prepared", False)))


class RemoteEngine:
    """One websocket connection to `dg-edit serve`, one request at a time (the TUI's model worker)."""

    tokenizer = None  # the service does not send token ids; see the module docstring

    def __init__(self, url: str, token: str | None = None, settings: Settings | None = None,
                 document: str | None = None):
        self.url = url
        self.token = token
        # Sent as X-DG-Edit-Document: a load balancer in front of several replicas keeps this file on
        # the one that holds its warm caches (dg_edit/serve/deploy/dg-edit-nginx.conf).
        self.document = document
        self.settings = settings or Settings()
        self._ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()  # holds the connection's context open between requests
        # One request at a time on the connection, its cancel drain included: a new request (a new
        # worker thread) waits until the previous one has read its last frame.
        self._busy = threading.Lock()
        # the last edit frames sent: the service answers one only to refuse it
        self._edit_ids: collections.deque[str] = collections.deque(maxlen=512)
        self.name = url

    def connect(self) -> "RemoteEngine":
        """Open the connection now, so a wrong address or token is reported when the TUI starts."""
        self._connection()
        return self

    def close(self) -> None:
        self._ws = None
        self._stack.close()

    def _connection(self) -> ClientConnection:
        if self._ws is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            if self.document:  # percent-encoded: a header value is ASCII, a file name may not be
                headers[DOCUMENT_HEADER] = quote(self.document, safe="/")
            try:
                self._ws = self._stack.enter_context(connect(
                    self.url, additional_headers=headers or None, open_timeout=10,
                    max_size=self.settings.max_message_bytes * 4))
            except InvalidURI as e:
                raise RemoteError("bad_url", f"{self.url} is not a websocket URL (ws://HOST:PORT/ws): {e}") from None
            except InvalidHandshake as e:
                raise RemoteError("refused", f"{self.url} refused the connection: {e}") from None
            except (OSError, TimeoutError) as e:
                raise RemoteError("unreachable", f"cannot connect to {self.url}: {e}") from None
        return self._ws

    # ------------------------------------------------------------------ the Engine-like surface
    def stream(self, prefix: str, suffix: str = "", *, session: str | None = None, max_new_tokens: int | None = None,
               seed: int | None = None, single_line: bool | None = None) -> Iterator[Step | Done]:
        body: dict[str, Any] = {"type": "infill", "prefix": prefix, "suffix": suffix}
        for key, value in (("session", session), ("max_new_tokens", max_new_tokens), ("seed", seed),
                           ("single_line", single_line)):
            if value is not None:
                body[key] = value
        return self._run(body)

    def stream_rewrite(self, prefix: str, selection: str, suffix: str, *, instruction: str | None = None,
                       strength: float = 0.6, seed: int | None = None,
                       session: str | None = None) -> Iterator[Step | Done]:
        body: dict[str, Any] = {"type": "rewrite", "prefix": prefix, "selection": selection, "suffix": suffix,
                                "strength": strength}
        for key, value in (("instruction", instruction), ("seed", seed), ("session", session)):
            if value is not None:
                body[key] = value
        return self._run(body)

    def stream_next_edit(self, text: str, cursor: int, *, session: str | None = None,
                         seed: int | None = None) -> Iterator[Step | Done]:
        body: dict[str, Any] = {"type": "next_edit", "text": text, "cursor": cursor}
        for key, value in (("session", session), ("seed", seed)):
            if value is not None:
                body[key] = value
        return self._run(body)

    def record_edit(self, session: str, edit: TextEdit) -> None:
        """An `edit` frame: the service keeps the connection's edit history of `session`. Sent at once
        (websockets serialises sends), never waiting for a request in flight; a refusal comes back as
        an `error` frame with this id, which the next request's reader raises (it is shown)."""
        frame = {"type": "edit", "id": uuid.uuid4().hex, "session": session, "start": edit.start, "end": edit.end,
                 "text": edit.text, "old_text": edit.old_text}
        self._edit_ids.append(frame["id"])
        try:
            self._connection().send(json.dumps(frame))
        except (ConnectionClosed, OSError) as e:
            self.close()
            raise RemoteError("disconnected", f"the connection to {self.url} closed: {e}") from None

    # ------------------------------------------------------------------ one request
    def _run(self, body: dict[str, Any]) -> Iterator[Step | Done]:
        with self._busy:
            yield from self._request(body)

    def _request(self, body: dict[str, Any]) -> Iterator[Step | Done]:
        ws = self._connection()
        rid = uuid.uuid4().hex
        finished = False
        try:
            ws.send(json.dumps({"id": rid, **body}))
            while True:
                frame = self._receive(ws)
                if frame.get("id") in self._edit_ids and frame.get("type") == "error":
                    self._edit_ids.remove(frame["id"])
                    raise RemoteError(frame.get("code", "error"),
                                      f"the service refused an edit: {frame.get('message', '')}")
                if frame.get("id") != rid:
                    continue  # a late frame of an earlier request
                kind = frame.get("type")
                if kind == "step":
                    yield step_from_frame(frame)
                elif kind == "done":
                    finished = True
                    yield done_from_frame(frame)
                    return
                elif kind == "error":
                    finished = True
                    raise RemoteError(frame.get("code", "error"), frame.get("message", "the service failed"))
                elif kind == "cancelled":
                    finished = True
                    return
        except ConnectionClosed as e:
            finished = True
            self.close()
            raise RemoteError("disconnected", f"the connection to {self.url} closed: {e}") from None
        finally:
            if not finished:  # the consumer stopped early: cancel on the server too
                self._cancel(ws, rid)

    def _receive(self, ws: ClientConnection) -> dict[str, Any]:
        timeout = self.settings.request_timeout_s + 10.0  # the server times a request out before this
        try:
            return json.loads(ws.recv(timeout=timeout))
        except TimeoutError:
            self.close()
            raise RemoteError("timeout", f"no answer from {self.url} in {timeout:.0f} s") from None

    def _cancel(self, ws: ClientConnection, rid: str) -> None:
        try:
            ws.send(json.dumps({"type": "cancel", "id": rid}))
            while True:
                frame = json.loads(ws.recv(timeout=CANCEL_DRAIN_S))
                if frame.get("id") == rid and frame.get("type") in FINAL_TYPES:
                    return  # cancelled, or it had finished (done, or an unknown_id error) before the cancel
        except (ConnectionClosed, TimeoutError, OSError):
            self.close()  # out of step with the server: the next request opens a fresh connection
