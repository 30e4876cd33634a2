"""The dg-edit engine: DiffusionGemma block diffusion with masked-span conditioning, for editors.

It prepares requests (tokens, prefix windows, chunks of other files, typed-ahead answers) and owns the
model, its lock and the document caches; the denoising loop itself, numbered as in
`generation_diffusion_gemma.py`, is dg_edit/denoise.py, run for every request by one scheduler
(dg_edit/scheduler.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields, replace as replace_fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import denoise, hf_adapter as hf, next_edit as next_edit_fn, step as step_fn
from .denoise import ModelOutOfMemory  # noqa: F401 - raised by the denoising loop; callers import it from here
from .scheduler import Scheduler, client_key
from .canvas import candidate_lengths
from .config import SamplingConfig, Settings
from .edits import TextEdit
from .events import Done, Step
from .faults import FAULT_ENV, install as install_fault
from .loading import LoadOptions, load_model
from .prefill import Prefiller
from .plan import MAX_AUTO_ROWS, device_budget, kv_bytes_per_token, rows_that_fit
from .prefix_cache import CacheStore
from .typed_ahead import Answer, rest_after_typing
from .windows import Window, char_start, document_windows, token_drop

DG_EDIT_JSON = "dg_edit.json"  # per-model overrides of SamplingConfig (+ canvas hints) next to config.json
_MAX_ANSWERS = 256  # typed-ahead memory: last answer per (session, seed)
MAX_NEW_TOKENS = 8192  # a request for more is a mistake (or an attack), not a long edit


def default_model_dir() -> Path:
    """Where the embedded default model is installed (package data of `dg_edit.model`)."""
    return Path(str(resources.files("dg_edit.model"))) / "default"


def check_model_dir(path: str | Path) -> Path:
    """Raise a clear `FileNotFoundError` unless `path` looks like a loadable model directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not p.is_dir():
        raise FileNotFoundError(f"model path is not a directory: {p}")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any(p.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()):
        missing.append("tokenizer.json")
    if missing:
        raise FileNotFoundError(f"model directory {p} is missing {', '.join(missing)}")
    return p


@dataclass
class _Request:
    """Everything one request needs, already tokenized and windowed."""

    prefix_ids: list[int]
    suffix_head: list[int]
    max_new_tokens: int
    cfg: SamplingConfig
    generator: torch.Generator | None
    session: str | None
    single_line: bool = False
    window: Any = None  # which cached strip of the session serves this prefix (`_prefix_window`)
    prefix_text: str | None = None  # for typed-ahead and for ordering idle prefill (text requests)
    suffix_text: str | None = None
    options: Any = None  # typed-ahead: what besides the text shaped the answer
    # rewrite only: the starting middle and how strongly to renoise it
    init_middle: list[int] | None = None
    strength: float = 1.0
    lengths: list[int] | None = None  # explicit candidate middle lengths


class Engine:
    """Runs a `DiffusionGemmaForBlockDiffusion` for editor requests; owns its caches and lock."""

    def __init__(self, model, tokenizer=None, *, sampling: SamplingConfig | None = None,
                 settings: Settings | None = None, name: str = "in-memory"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or Settings()
        self.name = name
        text_config = model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        gen = getattr(model, "generation_config", None)
        base = sampling if sampling is not None else _sampling_from_generation_config(model)
        self.sampling = base.replace(**dict(self.settings.sampling))
        self.canvas_length = int(model.config.canvas_length)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_id: int | None = pad
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        positions = getattr(hf.text_config(model), "max_position_embeddings", None) or 1 << 30
        # Most prefix tokens a request conditions on: `max_prefix_tokens`, within the model's positions (a
        # canvas must still fit after the prefix); chunks of other files get what a full window leaves.
        self.window_tokens = max(1, min(self.settings.max_prefix_tokens, positions - self.canvas_length))
        self._extra_budget = min(self.settings.max_extra_tokens, positions - self.canvas_length - self.window_tokens)
        # Quantized weights (torchao, bitsandbytes tensor subclasses) fail under inference_mode.
        self._inference = torch.no_grad if hf.is_quantized(model) else torch.inference_mode
        self._compiled: step_fn.CompiledStep | None = None  # built on first use (Settings.compile_step)
        self._lock = threading.RLock()
        self.caches = CacheStore(self.settings.cache_budget_mb << 20, self.settings.prefix_chunk,
                                 kv_bytes_per_token(hf.text_config(model), model.dtype))
        self._prefill = Prefiller(self)
        self._histories = next_edit_fn.Histories(self.settings.edit_history_sessions,
                                                 self.settings.edit_history_edits, self.settings.edit_history_chars)
        self._next_edits = next_edit_fn.NextEditPreparer(self)
        self._answers: OrderedDict[tuple, Answer] = OrderedDict()  # typed-ahead, guarded by _answers_lock
        self._answers_lock = threading.Lock()
        self._newline_tokens: torch.Tensor | None = None  # [V] bool, built on first use (see _line_ends)
        self.last_encoded = 0  # tokens the encoder processed for the last request (prefix-cache metric)
        self.last_prefix_len = 0
        # One thread runs every request's steps, one decoder forward per step for all (dg_edit/scheduler.py);
        # under --parallel the ranks' schedulers run in lockstep (`Scheduler.lockstep`).
        self.scheduler = Scheduler(self, self._batch_rows(), self.settings.batching)
        # Told about every batched step and admission: `dg-edit serve` sets its metrics here
        # (dg_edit.serve.metrics): .on_step(rows, requests, seconds, queue_depth), .on_admit(waited_seconds).
        self.observer = None

    def _batch_rows(self) -> int:
        """Canvas rows the scheduler admits at once: `Settings.batch_rows`, or (0) as many as fit in the memory
        free now, beside the weights already loaded and the document caches' budget (`dg_edit.plan`)."""
        if self.settings.batch_rows:
            return self.settings.batch_rows
        device = str(self.model.device)
        free, _ = device_budget(device)
        free -= self.caches.budget_bytes  # the document caches may grow to their budget
        rows = rows_that_fit(self.model.config, self.model.dtype, self.canvas_length, self.window_tokens, free, device)
        return max(1, min(MAX_AUTO_ROWS, rows))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | Path | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
             settings: Settings | None = None, *, options: LoadOptions | None = None) -> "Engine":
        """Load a local Hugging Face directory (or the embedded default model when `model` is None).

        `options` (dg_edit.loading) add quantization, a device map and the memory check; `device` and
        `dtype`, when given, override theirs. A model the memory plan says cannot fit is refused
        before its weights are read (`dg_edit.plan.ModelDoesNotFit`, a ValueError).
        """
        hf.check_transformers()  # before transformers is imported: one line naming the fix, not a traceback
        transformers = hf.api()
        transformers.utils.logging.disable_progress_bar()  # a CLI's stderr is for its own messages

        settings = settings or Settings()
        if model is None and settings.model:
            model = settings.model
        if model is None or model == "":
            path = default_model_dir()
            if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
                raise FileNotFoundError(
                    f"no embedded default model is installed at {path}; pass --model DIR with a local "
                    "DiffusionGemma directory (config.json, *.safetensors, tokenizer.json)"
                )
        path = check_model_dir(model if model not in (None, "") else default_model_dir())
        hf.check_model_type(path)
        options = options or LoadOptions()
        overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if overrides:
            options = replace_fields(options, **overrides)
        net, tokenizer = load_model(path, options, prefix_tokens=settings.max_prefix_tokens,
                                       cache_bytes=settings.cache_budget_mb << 20)
        fault = os.environ.get(FAULT_ENV)
        if fault:  # test-only (dg_edit/faults.py): the one place the fault switch is read
            install_fault(net, tokenizer, fault)
        extra: dict[str, Any] = {}
        extra_file = path / DG_EDIT_JSON
        if extra_file.is_file():
            extra = json.loads(extra_file.read_text(encoding="utf-8"))
            extra.pop("canvas_length", None)
        sampling = _sampling_from_generation_config(net).replace(**extra)
        return cls(net, tokenizer, sampling=sampling, settings=settings, name=str(path))

    def with_settings(self, settings: Settings) -> "Engine":
        """An engine over the same loaded model with other settings (window sizes, sampling); fresh caches."""
        engine = Engine(self.model, self.tokenizer, sampling=self.sampling, settings=settings, name=self.name)
        engine.observer = self.observer
        return engine

    def info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "model": self.name,
            "parameters": n_params,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "canvas_length": self.canvas_length,
            "vocab_size": self.vocab_size,
            "sampling": {f.name: getattr(self.sampling, f.name) for f in fields(SamplingConfig)},
        }

    # ------------------------------------------------------------------ public API
    def infill(self, prefix: str, suffix: str = "", *, max_new_tokens: int | None = None, seed: int | None = None,
               session: str | None = None, single_line: bool | None = None, lengths: Sequence[int] | None = None,
               extra: Sequence[str] = (), **sampling) -> Done:
        """Fill the middle between `prefix` and `suffix`; `Done.text` is the middle only.

        `lengths` overrides the candidate middle lengths (in tokens) tried when there is a suffix.
        `extra`: chunks of other files (see `dg_edit.extra`), encoded ahead of the prefix within
        `Settings.max_extra_tokens`; unchanged chunks are reused from the session's prefix cache.
        """
        return _last(self.stream(prefix, suffix, max_new_tokens=max_new_tokens, seed=seed, session=session,
                                 single_line=single_line, lengths=lengths, extra=extra, _with_steps=False,
                                 **sampling))

    def infill_ids(self, prefix_ids: Sequence[int], suffix_ids: Sequence[int] = (), *,
                   max_new_tokens: int | None = None, seed: int | None = None, session: str | None = None,
                   **sampling) -> Done:
        """Token-level infill; with empty `suffix_ids` this is `model.generate` (same seed, same tokens)."""
        return _last(self.stream_ids(prefix_ids, suffix_ids, max_new_tokens=max_new_tokens, seed=seed,
                                     session=session, _with_steps=False, **sampling))

    def stream_ids(self, prefix_ids: Sequence[int], suffix_ids: Sequence[int] = (), *,
                   max_new_tokens: int | None = None, seed: int | None = None, session: str | None = None,
                   _with_steps: bool = True, **sampling) -> Iterator[Step | Done]:
        """`infill_ids` as a stream of `Step` events and a final `Done`."""
        request = self._request_from_ids(list(prefix_ids), list(suffix_ids), max_new_tokens, seed, session, sampling)
        return self._guarded(request, with_steps=_with_steps)

    def stream(self, prefix: str, suffix: str = "", *, max_new_tokens: int | None = None, seed: int | None = None,
               session: str | None = None, single_line: bool | None = None, lengths: Sequence[int] | None = None,
               extra: Sequence[str] = (), _with_steps: bool = True, **sampling) -> Iterator[Step | Done]:
        """Yield one `Step` per denoising step, then a `Done` equal to `infill`'s result.

        Stop iterating (or `close()` the generator) to cancel: no further step runs.
        """
        if lengths is not None:
            lengths = sorted(set(lengths))
            if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
                raise ValueError(f"lengths must be positive integers, got {lengths!r}")
        options = None
        if session is not None and self.settings.typed_ahead:
            # Before tokenizing the prefix window: a typed-ahead answer needs none of that work. Options equal
            # to the previous (checked) request's are valid; the texts are checked here.
            _check_text("prefix", prefix)
            _check_text("suffix", suffix)
            _check_extra(extra)
            options = (seed, max_new_tokens, single_line, tuple(sorted(sampling.items())),
                       tuple(lengths or ()), hash(tuple(extra)))
            done = self._typed_ahead(session, prefix, suffix, options)
            if done is not None:
                return iter([done])
        request = self._request_from_text(prefix, suffix, max_new_tokens, seed, session, single_line, sampling,
                                          extra=extra)
        request.options = options
        if lengths is not None:
            request.lengths = lengths
            request.max_new_tokens = max(lengths)
        return self._guarded(request, with_steps=_with_steps)

    def rewrite(self, prefix: str, selection: str, suffix: str, *, instruction: str | None = None,
                strength: float = 0.6, seed: int | None = None, session: str | None = None,
                extra: Sequence[str] = (), **sampling) -> Done:
        """Re-denoise `selection` in place; strength 0 returns it unchanged. `extra` as for `infill`."""
        return _last(self.stream_rewrite(prefix, selection, suffix, instruction=instruction, strength=strength,
                                         seed=seed, session=session, extra=extra, _with_steps=False, **sampling))

    def stream_rewrite(self, prefix: str, selection: str, suffix: str, *, instruction: str | None = None,
                       strength: float = 0.6, seed: int | None = None, session: str | None = None,
                       extra: Sequence[str] = (), _with_steps: bool = True, **sampling) -> Iterator[Step | Done]:
        """`rewrite` as a stream of `Step` events and a final `Done`.

        The result is at most `rewrite_bound(len(selection tokens))` tokens long.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        for name, value in (("prefix", prefix), ("selection", selection), ("suffix", suffix)):
            _check_text(name, value)
        if instruction is not None:
            _check_text("instruction", instruction)
        tok = self._need_tokenizer()
        sel_ids = tok.encode(selection, add_special_tokens=False) if selection else []
        if strength == 0.0 or not sel_ids:
            return iter([Done(text=selection, ids=tuple(sel_ids), steps=0, tokens_per_forward=0.0, ms=0.0,
                              length=len(sel_ids))])
        request = self._request_from_text(prefix, suffix, rewrite_bound(len(sel_ids)), seed, session, False,
                                          sampling, instruction=instruction, extra=extra)
        request.init_middle = sel_ids
        request.strength = float(strength)
        return self._guarded(request, with_steps=_with_steps)

    # ------------------------------------------------------------------ next-edit prediction
    def record_edit(self, session: str, edit: TextEdit) -> None:
        """The user made `edit` to document `session` (offsets into its text before the edit): it joins
        the document's edit history, which aims next-edit requests, and drops a prepared suggestion."""
        if not isinstance(session, str):
            raise ValueError(f"session must be text (str), got {type(session).__name__}")
        self._histories.record(session, edit)
        self._next_edits.forget(session)

    def recent_edits(self, session: str) -> tuple[TextEdit, ...]:
        """The document's edit history, oldest first, as next-edit requests see it."""
        return self._histories.recent(session)[0]

    def next_edit(self, text: str, cursor: int, *, session: str | None = None, seed: int | None = None,
                  sampling: dict | None = None, extra: Sequence[str] = (),
                  edits: Sequence[TextEdit] | None = None) -> Done:
        """The edit the user will make next near `cursor` (a character offset into `text`): `Done.edits`,
        empty when the model keeps the window. Details in `dg_edit.next_edit`."""
        return _last(self.stream_next_edit(text, cursor, session=session, seed=seed, sampling=sampling, extra=extra,
                                           edits=edits))

    def stream_next_edit(self, text: str, cursor: int, *, session: str | None = None, seed: int | None = None,
                         sampling: dict | None = None, extra: Sequence[str] = (),
                         edits: Sequence[TextEdit] | None = None) -> Iterator[Step | Done]:
        """`next_edit` as `Step` events (the window's draft) and a final `Done` carrying the edits.

        With a `session`, conditions on its edit history (`record_edit`) and warm caches, and answers at
        once from a suggestion `prepare_next_edit` made for the same text, cursor and history. `seed`
        None means 0: a suggestion is reproducible, and the prepared one equals the one asked for.
        `edits` (oldest first, each indexing the text before it) replace the session's history for this
        request: for callers that keep no session (stateless HTTP, evaluation).
        """
        key = self._next_edit_key(session, text, cursor, seed, sampling, extra)
        if edits is not None:
            edits = tuple(edits)
            if not all(isinstance(e, TextEdit) for e in edits):
                raise ValueError("edits must be TextEdit objects")
            return self._next_edit_events(text, cursor, session, key[4], dict(key[5]), extra, history=edits)
        if session is not None:
            t0 = time.perf_counter()
            done = self._next_edits.take(key)
            if done is not None:
                self._prefill.touch()
                return iter([replace_fields(done, ms=(time.perf_counter() - t0) * 1000.0, prepared=True)])
        return self._next_edit_events(text, cursor, session, key[4], dict(key[5]), extra)

    def prepare_next_edit(self, session: str, text: str, cursor: int, *, seed: int | None = None,
                          sampling: dict | None = None, extra: Sequence[str] = ()) -> None:
        """Prepare `session`'s next-edit answer in the background once the editor is quiet (after
        `Settings.idle_prefill_ms`, no request running); returns at once. A later `stream_next_edit`
        with the same text, cursor, history and options answers from it; anything else replaces it."""
        if session is None:
            raise ValueError("prepare_next_edit needs a session (the document the answer is kept for)")
        key = self._next_edit_key(session, text, cursor, seed, sampling, extra)
        self._need_tokenizer()
        self._next_edits.schedule(key)

    def wait_next_edit_prepared(self, timeout: float | None = None) -> bool:
        """Block until background next-edit preparation is done; False on timeout (tests, benchmarks)."""
        return self._next_edits.wait_idle(timeout)

    def active_requests(self) -> int:
        """Requests running now (background next-edit preparation gives way to them)."""
        return self._prefill.active

    def _next_edit_key(self, session, text, cursor, seed, sampling, extra) -> tuple:
        """Everything that shapes a next-edit answer, checked: what a prepared answer is kept under."""
        _check_text("text", text)
        _check_extra(extra)
        if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= len(text):
            raise ValueError(f"cursor must be a character offset in [0, {len(text)}], got {cursor!r}")
        if sampling is not None and not isinstance(sampling, dict):
            raise ValueError(f"sampling must be an object, got {type(sampling).__name__}")
        seed = 0 if seed is None else seed
        self._resolve(None, seed, dict(sampling or {}))  # unknown sampling names, a bad seed: raised now
        version = self._histories.recent(session)[1] if session is not None else 0
        return (session, text, cursor, version, seed, tuple(sorted((sampling or {}).items())), tuple(extra))

    def _next_edit_events(self, text: str, cursor: int, session: str | None, seed: int, sampling: dict,
                          extra: Sequence[str] = (), history: tuple[TextEdit, ...] | None = None
                          ) -> Iterator[Step | Done]:
        self._need_tokenizer()
        if history is None:
            history = self._histories.recent(session)[0] if session is not None else ()
        return next_edit_fn.run(self, text, cursor, session, seed, sampling, extra, history)

    def forget(self, session: str) -> None:
        """Drop a document's caches, its pending prefill, its typed-ahead answers, its edit history and
        prepared next edit (the editor closed it)."""
        self._histories.forget(session)
        self._next_edits.forget(session)
        self._prefill.cancel(session)
        with self._answers_lock:
            for key in [k for k in self._answers if k[0] == session]:
                del self._answers[key]
        with self._lock:
            self.caches.forget(session)

    def prefill(self, session: str, text: str, extra: Sequence[str] = ()) -> None:
        """The document `session` now reads `text`: encode its missing windows in the background.

        `extra`: the chunks of other files the front end sends with this document's requests (as for
        `infill`), so that the windows prefilled are the ones those requests use.

        Returns at once. The work waits until the editor has been quiet for
        `Settings.idle_prefill_ms` (no `prefill` call, no request), runs at low priority one chunk at a
        time, and pauses whenever a request runs, so it never delays one. Afterwards a request at any
        cursor in the document encodes at most the chunk holding its cursor. Off with
        `Settings.idle_prefill = false` (and a no-op for engines without a tokenizer).
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be text (str), got {type(text).__name__}")
        if not self.settings.idle_prefill or self.tokenizer is None:
            return
        self._prefill.schedule(session, text, tuple(extra))

    def prefill_now(self, session: str, text: str, extra: Sequence[str] = ()) -> int:
        """Prefill `text` for `session` in this thread, now; returns the tokens encoded (tests, benchmarks)."""
        _check_text("text", text)
        self._need_tokenizer()
        return self._prefill.run_now(session, text, tuple(extra))

    def wait_prefilled(self, timeout: float | None = None) -> bool:
        """Block until scheduled idle prefill has finished; False on timeout."""
        return self._prefill.wait_idle(timeout)

    def cache_info(self) -> dict[str, Any]:
        """Encoder caches for `dgEdit/stats` and benchmarks: bytes per token, budget, documents (least
        recently used first) and prefill. Never waits for the engine's lock."""
        docs = [{"session": session, **info} for session, info in self.caches.summary.items()]
        return {"bytes_per_token": self.caches.bytes_per_token, "budget_bytes": self.caches.budget_bytes,
                "bytes": sum(d["bytes"] for d in docs), "window_tokens": self.window_tokens,
                "documents": docs, "prefill": self._prefill.info(), "next_edit": self._next_edits.info()}

    def close(self) -> None:
        """Stop idle prefill and drop every cache (the engine is being replaced; requests in flight keep
        what they hold)."""
        self._prefill.shutdown()
        self._next_edits.shutdown()
        self.scheduler.stop()
        with self._lock:
            for session in self.caches.sessions():
                self.caches.forget(session)

    def no_autograd(self):
        """The context every model call runs in: inference mode, or no_grad for quantized weights
        (torchao and bitsandbytes tensor subclasses fail under inference mode)."""
        return self._inference()

    @property
    def lock(self) -> threading.RLock:
        """Held for every model call (a denoising step, an encoder chunk)."""
        return self._lock

    def document_windows(self, text: str, near: int | None = None, extra: Sequence[str] = ()) -> Iterator[Window]:
        """Every prefix window a cursor in `text` uses (what idle prefill encodes), nearest `near` first;
        with `extra`, as a request carrying those chunks of other files sees it."""
        extra_ids = self._extra_ids(extra)
        for window in document_windows(self._need_tokenizer(), text, self.window_tokens, self.bos_id,
                                       self.settings.prefix_chunk, near):
            if extra_ids:
                key, ids = self._with_lead(window.key, window.ids, extra_ids, [])
                window = replace_fields(window, key=key, ids=ids)
            yield window

    # ------------------------------------------------------------------ request preparation
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; use infill_ids with token ids")
        return self.tokenizer

    def _resolve(self, max_new_tokens: int | None, seed: int | None, sampling: dict) -> tuple[int, SamplingConfig,
                                                                                              torch.Generator | None]:
        unknown = sorted(set(sampling) - {f.name for f in fields(SamplingConfig)})
        if unknown:
            raise ValueError(f"unknown sampling option(s): {', '.join(unknown)}; accepted: "
                             f"{', '.join(f.name for f in fields(SamplingConfig))}")
        cfg = self.sampling.replace(**sampling)
        if max_new_tokens is None:
            max_new_tokens = self.settings.max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if max_new_tokens > MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be at most {MAX_NEW_TOKENS}, got {max_new_tokens}")
        generator = None
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        return max_new_tokens, cfg, generator

    def _request_from_ids(self, prefix_ids, suffix_ids, max_new_tokens, seed, session, sampling) -> _Request:
        for name, ids in (("prefix_ids", prefix_ids), ("suffix_ids", suffix_ids)):
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"{name} must be token ids in [0, {self.vocab_size})")
        if not prefix_ids:
            raise ValueError("prefix_ids is empty: the encoder needs at least one token (e.g. BOS)")
        max_new_tokens, cfg, generator = self._resolve(max_new_tokens, seed, sampling)
        drop = token_drop(len(prefix_ids), self.window_tokens)
        head = list(suffix_ids)[: self.settings.suffix_head_tokens]
        return _Request(prefix_ids[drop:], head, max_new_tokens, cfg, generator, session, window=("ids", drop))

    def _request_from_text(self, prefix, suffix, max_new_tokens, seed, session, single_line, sampling,
                           instruction: str | None = None, extra: Sequence[str] = ()) -> _Request:
        _check_text("prefix", prefix)
        _check_text("suffix", suffix)
        _check_extra(extra)
        if not prefix and not suffix and not instruction and not any(extra):
            raise ValueError("prefix and suffix are both empty: nothing to condition the infill on")
        if single_line is not None and not isinstance(single_line, bool):
            raise ValueError(f"single_line must be true, false or None (decided by the cursor's line), "
                             f"got {single_line!r}")
        tok = self._need_tokenizer()
        max_new_tokens, cfg, generator = self._resolve(max_new_tokens, seed, sampling)
        window, prefix_ids = self._prefix_window(prefix)
        window, prefix_ids = self._with_lead(window, prefix_ids, self._extra_ids(extra),
                                             self._instruction_ids(instruction) if instruction else [])
        if not prefix_ids:
            raise ValueError("the prefix is empty and the tokenizer has no BOS token to start from")
        head_chars = max(self.settings.suffix_head_tokens, 1) * 16
        suffix_ids = tok.encode(suffix[:head_chars], add_special_tokens=False) if suffix else []
        head = suffix_ids[: self.settings.suffix_head_tokens]
        if single_line is None:
            current_line = prefix.rsplit("\n", 1)[-1]
            single_line = bool(current_line.strip())
        if single_line:
            # The answer is cut at the first newline anyway: a smaller canvas is the same answer, sooner.
            max_new_tokens = min(max_new_tokens, self.settings.single_line_tokens)
        return _Request(prefix_ids, head, max_new_tokens, cfg, generator, session, single_line=single_line,
                        window=window, prefix_text=prefix, suffix_text=suffix)

    def _extra_ids(self, extra: Sequence[str]) -> list[int]:
        """Token ids of the chunks of other files that fit `Settings.max_extra_tokens`.

        Whole chunks only, the last ones first (nearest to the prefix: the most recent in llama.vim's
        ring and llama.cpp's choice), kept in their order, so that an unchanged list of chunks always
        gives the same ids and stays in the prefix cache.
        """
        budget = self._extra_budget
        if not extra or budget <= 0:
            return []
        tok = self._need_tokenizer()
        taken: list[list[int]] = []
        used = 0
        for chunk in reversed(extra):
            # Bound tokenizer work on huge chunks: a chunk over ~16 chars per token of budget cannot fit.
            if not chunk or len(chunk) > (budget - used) * 16:
                break
            ids = tok.encode(chunk, add_special_tokens=False)
            if any(t >= self.vocab_size for t in ids):
                continue  # context is optional: a chunk the model cannot read (tokenizer past its table) is left out
            if used + len(ids) > budget:
                break
            taken.append(ids)
            used += len(ids)
        return [t for ids in reversed(taken) for t in ids]

    def _prefix_window(self, prefix: str) -> tuple[tuple, list[int]]:
        """(window key, token ids) the encoder sees for `prefix` (rules in `dg_edit.windows`).

        A function of the text alone, so a warm request and a cold one see the same tokens at the
        same positions. The key names the cached strip that serves it: (lead, char start, tokens cut).
        """
        window = self.window_tokens
        start = char_start(len(prefix), window)
        ids = self._need_tokenizer().encode(prefix[start:], add_special_tokens=False)
        if start == 0 and self.bos_id is not None:
            ids = [self.bos_id] + ids
        drop = token_drop(len(ids), window)
        return (0, start, drop), ids[drop:]

    def _with_lead(self, key: tuple, ids: list[int], extra_ids: list[int],
                   instruction_ids: list[int]) -> tuple[tuple, list[int]]:
        """A prefix window's (key, ids) with what goes ahead of the document: an instruction, then BOS and
        the other files' chunks (whose BOS replaces the window's own).

        Chunks first: they change least often (llama.vim sends the same ring of chunks on every
        keystroke), so the cache keeps them while the file's prefix changes after them. A lead gets its
        own cached strip (the key's first field), seeded from the document's best-matching one.
        """
        if extra_ids:
            bos = [self.bos_id] if self.bos_id is not None else []
            ids = bos + extra_ids + (ids[1:] if bos and ids[:1] == bos else ids)
        ids = instruction_ids + ids
        lead = (*instruction_ids, -1, *extra_ids)
        if instruction_ids or extra_ids:
            key = (hash(lead), *key[1:])
        return key, ids

    def _instruction_ids(self, instruction: str) -> list[int]:
        tok = self.tokenizer
        template = getattr(tok, "chat_template", None)
        if template:
            text = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                           add_generation_prompt=False)
            return tok.encode(text, add_special_tokens=False)
        vocab = tok.get_vocab()
        body = tok.encode(instruction, add_special_tokens=False)
        if "<instruction>" in vocab and "</instruction>" in vocab:
            return [vocab["<instruction>"], *body, vocab["</instruction>"]]
        comment = tok.encode(f"# {instruction}\n", add_special_tokens=False)
        return comment

    # ------------------------------------------------------------------ typed-ahead
    def _typed_ahead(self, session: str, prefix: str, suffix: str, options: tuple) -> Done | None:
        """The rest of this session's previous answer when the user has typed its beginning, else None."""
        t0 = time.perf_counter()
        key = (session, options[0])
        with self._answers_lock:
            rest = rest_after_typing(self._answers.get(key), prefix, suffix, options)
            if rest is None:
                return None
            self._answers[key] = Answer(prefix, suffix, rest, options)
            self._answers.move_to_end(key)
        self._prefill.touch()
        self.last_encoded, self.last_prefix_len = 0, 0
        ids = tuple(self.tokenizer.encode(rest, add_special_tokens=False))
        return Done(text=rest, ids=ids, steps=0, tokens_per_forward=0.0, ms=(time.perf_counter() - t0) * 1000.0,
                    typed_ahead=True)

    def _remember(self, request: _Request, done: Done) -> None:
        if request.options is None or request.init_middle is not None:
            return
        key = (request.session, request.options[0])
        with self._answers_lock:
            self._answers[key] = Answer(request.prefix_text, request.suffix_text, done.text, request.options)
            self._answers.move_to_end(key)
            while len(self._answers) > _MAX_ANSWERS:
                self._answers.popitem(last=False)

    # ------------------------------------------------------------------ the loop
    def _guarded(self, request: _Request, with_steps: bool) -> Iterator[Step | Done]:
        """The request's events: its steps run by the scheduler, batched with other requests'."""
        steps = self._request_steps(request, with_steps)
        return self.scheduler.events(steps, self._rows(request), client_key(request.session))

    def _rows(self, request: _Request) -> int:
        """Canvas rows the request's first block takes (its candidates), for admission by rows."""
        if request.init_middle is not None:
            return 1
        if request.lengths is not None:
            return len(request.lengths)
        s = len(request.suffix_head)
        if s and request.max_new_tokens + s <= max(self.canvas_length, 8 + s):
            return len(candidate_lengths(request.max_new_tokens))
        return 1

    def _request_steps(self, request: _Request, with_steps: bool):
        """The request's denoising loop as a coroutine for the scheduler (dg_edit/denoise.py)."""
        return denoise.request_steps(self, request, with_steps)


def rewrite_bound(n_selection_tokens: int) -> int:
    """Longest rewrite result, in tokens: the selection plus a quarter, at least 4 more."""
    return n_selection_tokens + max(4, n_selection_tokens // 4)


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text (str), got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid UTF-8 text ({e.reason} at position {e.start})") from None


def _check_extra(extra: Any) -> None:
    if isinstance(extra, str) or not all(isinstance(chunk, str) for chunk in extra):
        raise ValueError("extra must be a list of texts (chunks of other files), not "
                         f"{type(extra).__name__ if isinstance(extra, str) else 'a list with non-text items'}")
    for i, chunk in enumerate(extra):
        _check_text(f"extra[{i}]", chunk)


def _last(events: Iterator[Step | Done]) -> Done:
    result = None
    for result in events:
        pass
    assert isinstance(result, Done)
    return result


def _sampling_from_generation_config(model) -> SamplingConfig:
    gen = getattr(model, "generation_config", None)
    values: dict[str, Any] = {}
    for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
        v = getattr(gen, name, None) if gen is not None else None
        if v is not None:
            values[name] = v
    sc = getattr(gen, "sampler_config", None) if gen is not None else None
    if sc is not None:
        values["entropy_bound"] = sc["entropy_bound"] if isinstance(sc, dict) else sc.entropy_bound
    return SamplingConfig().replace(**values)
