"""The dg-edit language server object: settings, the engine host, and requests keyed by (uri, version).

Every feature module receives this `DgEditServer` as `ls`. The only mutable state of the server
lives here: the current `Settings`, the in-flight requests per `(uri, version)` (so a `didChange`
can cancel what was computed for an older text), and counters for `dgEdit/stats`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from lsprotocol import types
from pygls.exceptions import JsonRpcContentModified
from pygls.lsp.server import LanguageServer

from dg_edit import __version__
from dg_edit.config import Settings

from .engine_host import EngineHost
from .protocol import DgEditProtocol

logger = logging.getLogger(__name__)

Key = tuple[str, int]  # (uri, version)
_MAX_RESULTS = 64  # remembered infill results (per uri, version and cursor)


@dataclass(eq=False)
class Inflight:
    """One model request running for a document version."""

    uri: str
    version: int
    request_id: Any
    kind: str
    task: asyncio.Task | None
    stale: bool = False  # set when the document moved on: the answer must not be sent


@dataclass
class Stats:
    """Counters and recent per-request records, served by `dgEdit/stats` (the benchmark reads them)."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    stale: int = 0
    errors: int = 0
    accepted: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "completed": self.completed, "cancelled": self.cancelled,
                "stale": self.stale, "errors": self.errors, "accepted": self.accepted, "recent": list(self.recent)}


class DgEditServer(LanguageServer):
    def __init__(self, settings: Settings, host: EngineHost):
        super().__init__("dg-edit", __version__, protocol_cls=DgEditProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.settings = settings  # current settings: CLI/--config, then initializationOptions, then changes
        self.base_settings = settings  # what initializationOptions and didChangeConfiguration apply on top of
        self.host = host
        self.inflight: dict[Key, list[Inflight]] = collections.defaultdict(list)
        self.stats = Stats()
        # (uri, version, cursor digest...) -> (distinct infills, seeds tried); dropped when the document moves on
        self.results: collections.OrderedDict[tuple, tuple[list[str], int]] = collections.OrderedDict()
        self.prefill_waiting: asyncio.Future | None = None  # prefill.schedule_all, until the engine is ready
        # next_edit: suggested edits per (uri, version, cursor offset), and where each document's last
        # edit ended (the cursor an editor most likely has when it goes quiet)
        self.next_edits: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self.edit_cursor: dict[str, int] = {}

    # ------------------------------------------------------------------ remembered results
    def recall(self, key: tuple) -> tuple[list[str], int]:
        texts, tried = self.results.get(key, ([], 0))
        return list(texts), tried

    def remember(self, key: tuple, texts: list[str], tried: int) -> None:
        if self.current_version(key[0]) != key[1]:
            return  # computed for a version that is already gone
        self.results[key] = (list(texts), tried)
        self.results.move_to_end(key)
        while len(self.results) > _MAX_RESULTS:
            self.results.popitem(last=False)

    def remember_next_edits(self, key: tuple, edits: tuple) -> None:
        self.next_edits[key] = edits
        self.next_edits.move_to_end(key)
        while len(self.next_edits) > _MAX_RESULTS:
            self.next_edits.popitem(last=False)

    def forget_results(self, uri: str | None = None) -> None:
        """Drop remembered results of `uri` (all documents when None, e.g. after a settings change)."""
        for key in [k for k in self.results if uri is None or k[0] == uri]:
            del self.results[key]
        for key in [k for k in self.next_edits if uri is None or k[0] == uri]:
            del self.next_edits[key]

    # ------------------------------------------------------------------ versions
    def current_version(self, uri: str) -> int | None:
        doc = self.workspace.text_documents.get(uri)
        return None if doc is None else doc.version

    def document_changed(self, uri: str, version: int | None) -> None:
        """Cancel in-flight requests computed for any other version of `uri` (they are stale now)."""
        self.forget_results(uri)
        for key in [k for k in self.inflight if k[0] == uri and k[1] != version]:
            for entry in self.inflight[key]:
                entry.stale = True
                if entry.task is not None:
                    entry.task.cancel()

    def check_current(self, uri: str, version: int) -> None:
        """Raise ContentModified unless `version` is still the document's version (never answer stale)."""
        if self.current_version(uri) != version:
            raise JsonRpcContentModified(
                f"{uri} changed (version {version} -> {self.current_version(uri)}); result dropped")

    @contextlib.asynccontextmanager
    async def tracked(self, uri: str, version: int, kind: str) -> AsyncIterator[Inflight]:
        """Register the running task under (uri, version); a stale cancel becomes ContentModified (-32801).

        A `$/cancelRequest` still surfaces as pygls's RequestCancelled (-32800).
        """
        entry = Inflight(uri, version, self.protocol.msg_id, kind, asyncio.current_task())
        self.inflight[(uri, version)].append(entry)
        # Commands run as a task inside pygls's executeCommand handler, whose own future is what a
        # $/cancelRequest cancels; forward that cancellation to the task doing the work.
        outer = self.protocol._request_futures.get(entry.request_id)
        if outer is not None and outer is not entry.task and entry.task is not None:
            outer.add_done_callback(lambda f: entry.task.cancel() if f.cancelled() else None)
        self.stats.requests += 1
        try:
            yield entry
            self.check_current(uri, version)
        except asyncio.CancelledError:
            if entry.stale and entry.task is not None and entry.task.cancelling() == 1:
                entry.task.uncancel()
                self.stats.stale += 1
                raise JsonRpcContentModified(f"{uri} changed while dg-edit was working; result dropped") from None
            self.stats.cancelled += 1
            raise
        except JsonRpcContentModified:
            self.stats.stale += 1
            raise
        except Exception:
            self.stats.errors += 1
            raise
        else:
            self.stats.completed += 1
        finally:
            entries = self.inflight.get((uri, version))
            if entries is not None:
                if entry in entries:
                    entries.remove(entry)
                if not entries:
                    del self.inflight[(uri, version)]

    # ------------------------------------------------------------------ messages
    def log(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        """window/logMessage (the editor's output panel), and our own log on stderr."""
        logger.log(logging.ERROR if kind == types.MessageType.Error else logging.INFO, "%s", message)
        self.window_log_message(types.LogMessageParams(type=kind, message=message))

    def report_server_error(self, error: Exception, source) -> None:
        """pygls's default shows a pop-up for every malformed message; a log line is enough."""
        from pygls.exceptions import FeatureRequestError

        if source is FeatureRequestError:
            return
        self.log(f"dg-edit: {error}", types.MessageType.Error)
