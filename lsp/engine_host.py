"""Owns the language server's engine: loaded in the background, awaited by the first request.

Why background loading: importing torch + transformers and reading the weights takes seconds, and
an editor waits for the `initialize` answer before it shows the buffer. So `initialize` is answered
at once; the import starts when the process starts (`preload_imports`), the weights load as soon as
`initialize` has told us the settings (the model path may come from `initializationOptions`), and
a short warm-up run pays torch's first-call costs before the user's first keystroke. A completion
that arrives earlier simply awaits the load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from pygls.exceptions import JsonRpcException

from dg_edit.config import Settings

if TYPE_CHECKING:
    from dg_edit.engine import Engine

logger = logging.getLogger(__name__)

# Engine settings that change how a request is tokenized and windowed, how the engine keeps its caches
# or how it batches requests: changing them re-wraps the model (a new Engine, with empty caches).
_WINDOW_KEYS = ("max_prefix_tokens", "max_suffix_tokens", "suffix_head_tokens", "max_extra_tokens", "prefix_chunk",
                "cache_budget_mb", "idle_prefill", "idle_prefill_ms", "typed_ahead", "batching", "batch_rows")


class RequestFailed(JsonRpcException):
    """LSP RequestFailed: the request was valid but could not be served (no model, timed out)."""

    CODE = -32803
    MESSAGE = "dg-edit: request failed"


class EngineUnavailable(RequestFailed):
    """The model could not be loaded (bad path, broken weights): every model request gets this error."""

    MESSAGE = "dg-edit: the model is not available"


def preload_imports() -> threading.Thread:
    """Import torch and transformers in a daemon thread while the server answers `initialize`."""

    def work() -> None:
        import dg_edit.engine  # noqa: F401  (torch)
        from dg_edit import hf_adapter

        hf_adapter.api()  # transformers, under the adapter's import lock

    thread = threading.Thread(target=work, name="dg-edit-preload", daemon=True)
    thread.start()
    return thread


class EngineHost:
    """Loads, warms up and swaps the engine; `await host.get()` returns it or raises `EngineUnavailable`."""

    def __init__(self, device: str | None = None, dtype: str | None = None, threads: int | None = None,
                 warm_up: bool = True, options=None, engine: "Engine | None" = None):
        self.launched = engine  # --parallel: loaded on every rank at launch; the client picks settings, not the model
        self.device = device
        self.dtype = dtype
        self.options = options  # dg_edit.loading.LoadOptions (quantization, device map), None = defaults
        self.threads = threads  # torch CPU threads, set in the loading thread (importing torch takes seconds)
        self.warm_up = warm_up
        self._future: Future | None = None
        self._settings: Settings | None = None
        self.load_ms: float | None = None

    @property
    def started(self) -> bool:
        return self._future is not None

    @property
    def ready(self) -> bool:
        return self._future is not None and self._future.done() and self._future.exception() is None

    def start(self, settings: Settings) -> None:
        """Begin loading the model `settings` names (no-op if that model is already loaded or loading)."""
        if self._settings is not None and self._settings.model == settings.model and self._future is not None:
            self.reconfigure(settings)
            return
        self._settings = settings
        self._future = self._submit(self._load, settings)

    def reconfigure(self, settings: Settings) -> None:
        """Apply new settings: another model reloads; other window sizes re-wrap the loaded model."""
        old = self._settings
        if old is None or self._future is None or old.model != settings.model:
            self.start(settings)
            return
        self._settings = settings
        if any(getattr(old, k) != getattr(settings, k) for k in _WINDOW_KEYS):
            previous = self._future
            self._future = self._submit(self._rewrap, previous, settings)

    async def get(self) -> "Engine":
        if self._future is None:
            raise EngineUnavailable("dg-edit: the server has not been initialized")
        try:
            # shield: a cancelled completion must not cancel the load every later request needs
            return await asyncio.shield(asyncio.wrap_future(self._future))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any load failure (missing files, corrupt weights) is reported, every time
            raise EngineUnavailable(f"dg-edit: cannot load the model: {type(e).__name__}: {e}") from None

    def loaded(self) -> "Engine | None":
        """The engine if it is loaded now (no waiting)."""
        return self._future.result() if self.ready else None

    def error(self) -> str | None:
        """Why loading failed, or None (still loading, or loaded)."""
        if self._future is None or not self._future.done():
            return None
        exc = self._future.exception()
        return None if exc is None else str(exc)

    def info(self) -> dict:
        state = "idle" if self._future is None else ("loading" if not self._future.done() else
                                                     ("failed" if self._future.exception() else "ready"))
        out: dict = {"state": state, "load_ms": self.load_ms}
        if state == "ready":
            engine = self._future.result()
            out.update(model=engine.name, canvas_length=engine.canvas_length,
                       max_denoising_steps=engine.sampling.max_denoising_steps)
        elif state == "failed":
            out["error"] = str(self._future.exception())
        return out

    def close(self) -> None:
        """Nothing to wait for: loads run in daemon threads, so an editor quitting mid-load is not delayed."""

    # ------------------------------------------------------------------ worker thread
    def _submit(self, fn, *args) -> Future:
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # delivered to every awaiting request as EngineUnavailable
                future.set_exception(exc)

        threading.Thread(target=run, name="dg-edit-load", daemon=True).start()
        return future

    def _load(self, settings: Settings) -> "Engine":
        import torch

        from dg_edit.engine import Engine

        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        if self.launched is not None:
            engine = self._from_launched(settings)
        else:
            engine = Engine.load(settings.model or None, device=self.device, dtype=self.dtype, settings=settings,
                                 options=self.options)
        if self.warm_up:
            # One short request so the first real keystroke does not pay torch's first-call costs.
            engine.infill("def f(x):\n    return ", "\n", max_new_tokens=4, max_denoising_steps=1, seed=0)
        self.load_ms = (time.perf_counter() - t0) * 1000.0
        logger.info("model %s loaded in %.0f ms", engine.name, self.load_ms)
        return engine

    def _from_launched(self, settings: Settings) -> "Engine":
        launched = self.launched
        if settings.model and Path(settings.model).expanduser().resolve() != Path(launched.name).resolve():
            raise ValueError(f"this server was launched with --parallel on {launched.name}; it cannot switch to "
                             f"{settings.model} (restart the launch with that --model)")
        return launched if settings == launched.settings else launched.with_settings(settings)

    def _rewrap(self, previous: Future, settings: Settings) -> "Engine":
        old = previous.result()
        old.close()  # its idle prefill and caches: the new engine keeps its own
        return old.with_settings(settings)
