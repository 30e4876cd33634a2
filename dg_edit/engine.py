"""The dg-edit engine: DiffusionGemma block diffusion with masked-span conditioning.

Algorithm, numbered as in `generation_diffusion_gemma.py` so the two read side by side:

1. Block loop (one canvas per block; infill requests usually need one):
   a. Encode the prefix with the encoder into a KV cache (reusing the document's cached strips,
      `dg_edit.prefix_cache`; idle prefill, `dg_edit.prefill`, fills them between requests).
   b. Lay out the canvas: middle slots, then the clamped suffix head on the last block; several
      candidate middle lengths as one batch when the middle length is unknown.
   c. For each denoising step (steps_remaining = N..1):
      i.   decoder forward over the canvas with self-conditioning on the previous step's logits;
      ii.  temperature-scale, sample the denoiser canvas, take the argmax canvas;
      iii. entropy-bound acceptance, renoise what was not accepted (clamped positions untouched);
      iv.  stable-and-confident stopping per row;
      v.   the processed logits become next step's self-conditioning.
   d. Pick the candidate row by the model's own evidence, cut the middle at EOS/pad.
   e. Stop at EOS or at the token budget; otherwise encode the block and go on.

With an empty suffix and one row this calls the same random functions in the same order as the
reference, so `infill_ids` equals `model.generate` token for token.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import hf_adapter as hf, sampler
from .canvas import Layout, candidate_lengths, infill_layout, middle_end
from .config import SamplingConfig, Settings
from .events import Done, Step, Token
from .faults import FAULT_ENV, install as install_fault
from .prefill import Prefiller
from .prefix_cache import CacheStore, encode_chunk, encode_prefix, kv_bytes_per_token
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


@dataclass
class _BlockResult:
    ids: list[int]  # middle tokens of the chosen row, cut at EOS/pad
    ended: bool  # EOS/pad inside the slots ended the middle
    forwards: int  # decoder passes the block ran: rows stop independently, but a pass runs the whole batch
    row: int
    scores: tuple[float, ...]


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
        self._lock = threading.RLock()
        self.caches = CacheStore(self.settings.cache_budget_mb << 20, self.settings.prefix_chunk,
                                 kv_bytes_per_token(hf.text_config(model), model.dtype))
        self._prefill = Prefiller(self)
        self._answers: OrderedDict[tuple, Answer] = OrderedDict()  # typed-ahead, guarded by _answers_lock
        self._answers_lock = threading.Lock()
        self._newline_tokens: torch.Tensor | None = None  # [V] bool, built on first use (see _line_ends)
        self.last_encoded = 0  # tokens the encoder processed for the last request (prefix-cache metric)
        self.last_prefix_len = 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | Path | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
             settings: Settings | None = None) -> "Engine":
        """Load a local Hugging Face directory (or the embedded default model when `model` is None)."""
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
        torch_dtype = _parse_dtype(dtype) or torch.float32
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            net = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch_dtype,
                                                                               local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot load model from {path}: {e}") from None
        net.to(device)
        fault = os.environ.get(FAULT_ENV)
        if fault:  # test-only (dg_edit/faults.py): the one place the fault switch is read
            install_fault(net, tokenizer, fault)
        overrides: dict[str, Any] = {}
        extra = path / DG_EDIT_JSON
        if extra.is_file():
            data = json.loads(extra.read_text(encoding="utf-8"))
            data.pop("canvas_length", None)
            overrides = data
        sampling = _sampling_from_generation_config(net).replace(**overrides)
        return cls(net, tokenizer, sampling=sampling, settings=settings, name=str(path))

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
               **sampling) -> Done:
        """Fill the middle between `prefix` and `suffix`; `Done.text` is the middle only.

        `lengths` overrides the candidate middle lengths (in tokens) tried when there is a suffix.
        """
        return _last(self.stream(prefix, suffix, max_new_tokens=max_new_tokens, seed=seed, session=session,
                                 single_line=single_line, lengths=lengths, _with_steps=False, **sampling))

    def infill_ids(self, prefix_ids: Sequence[int], suffix_ids: Sequence[int] = (), *,
                   max_new_tokens: int | None = None, seed: int | None = None, session: str | None = None,
                   **sampling) -> Done:
        """Token-level infill; with empty `suffix_ids` this is `model.generate` (same seed, same tokens)."""
        request = self._request_from_ids(list(prefix_ids), list(suffix_ids), max_new_tokens, seed, session, sampling)
        return _last(self._run(request, with_steps=False))

    def stream(self, prefix: str, suffix: str = "", *, max_new_tokens: int | None = None, seed: int | None = None,
               session: str | None = None, single_line: bool | None = None, lengths: Sequence[int] | None = None,
               _with_steps: bool = True, **sampling) -> Iterator[Step | Done]:
        """Yield one `Step` per denoising step, then a `Done` equal to `infill`'s result.

        Stop iterating (or `close()` the generator) to cancel: no further step runs.
        """
        request = self._request_from_text(prefix, suffix, max_new_tokens, seed, session, single_line, sampling)
        if lengths is not None:
            lengths = sorted(set(lengths))
            if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
                raise ValueError(f"lengths must be positive integers, got {lengths!r}")
            request.lengths = lengths
            request.max_new_tokens = max(lengths)
        if session is not None and self.settings.typed_ahead:
            request.options = (seed, max_new_tokens, single_line, tuple(sorted(sampling.items())),
                               tuple(lengths or ()))
            done = self._typed_ahead(request)
            if done is not None:
                return iter([done])
        return self._run(request, with_steps=_with_steps)

    def rewrite(self, prefix: str, selection: str, suffix: str, *, instruction: str | None = None,
                strength: float = 0.6, seed: int | None = None, session: str | None = None, **sampling) -> Done:
        """Re-denoise `selection` in place; strength 0 returns it unchanged."""
        return _last(self.stream_rewrite(prefix, selection, suffix, instruction=instruction, strength=strength,
                                         seed=seed, session=session, _with_steps=False, **sampling))

    def stream_rewrite(self, prefix: str, selection: str, suffix: str, *, instruction: str | None = None,
                       strength: float = 0.6, seed: int | None = None, session: str | None = None,
                       _with_steps: bool = True, **sampling) -> Iterator[Step | Done]:
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
                                          sampling, instruction=instruction)
        request.init_middle = sel_ids
        request.strength = float(strength)
        return self._run(request, with_steps=_with_steps)

    def forget(self, session: str) -> None:
        """Drop a document's caches, its pending prefill and its typed-ahead answers (the editor closed it)."""
        self._prefill.cancel(session)
        with self._answers_lock:
            for key in [k for k in self._answers if k[0] == session]:
                del self._answers[key]
        with self._lock:
            self.caches.forget(session)

    def prefill(self, session: str, text: str) -> None:
        """The document `session` now reads `text`: encode its missing windows in the background.

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
        self._prefill.schedule(session, text)

    def prefill_now(self, session: str, text: str) -> int:
        """Prefill `text` for `session` in this thread, now; returns the tokens encoded (tests, benchmarks)."""
        _check_text("text", text)
        self._need_tokenizer()
        return self._prefill.run_now(session, text)

    def wait_prefilled(self, timeout: float | None = None) -> bool:
        """Block until scheduled idle prefill has finished; False on timeout."""
        return self._prefill.wait_idle(timeout)

    def cache_info(self) -> dict[str, Any]:
        """Encoder caches for `dgEdit/stats` and benchmarks: bytes per token, budget, documents (least
        recently used first) and prefill. Never waits for the engine's lock."""
        docs = [{"session": session, **info} for session, info in self.caches.summary.items()]
        return {"bytes_per_token": self.caches.bytes_per_token, "budget_bytes": self.caches.budget_bytes,
                "bytes": sum(d["bytes"] for d in docs), "window_tokens": self.window_tokens,
                "documents": docs, "prefill": self._prefill.info()}

    def close(self) -> None:
        """Stop idle prefill and drop every cache (the engine is being replaced; requests in flight keep
        what they hold)."""
        self._prefill.shutdown()
        with self._lock:
            for session in self.caches.sessions():
                self.caches.forget(session)

    @property
    def lock(self) -> threading.RLock:
        """Held for every model call (a denoising step, an encoder chunk)."""
        return self._lock

    @property
    def window_tokens(self) -> int:
        """Most prefix tokens a request conditions on: `max_prefix_tokens`, within the model's positions
        (a canvas must still fit after the prefix)."""
        positions = getattr(hf.text_config(self.model), "max_position_embeddings", None) or 1 << 30
        return max(1, min(self.settings.max_prefix_tokens, positions - self.canvas_length))

    def document_windows(self, text: str, near: int | None = None) -> Iterator[Window]:
        """Every prefix window a cursor in `text` uses (what idle prefill encodes), nearest `near` first."""
        return document_windows(self._need_tokenizer(), text, self.window_tokens, self.bos_id,
                                self.settings.prefix_chunk, near)

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
                           instruction: str | None = None) -> _Request:
        _check_text("prefix", prefix)
        _check_text("suffix", suffix)
        if not prefix and not suffix and not instruction:
            raise ValueError("prefix and suffix are both empty: nothing to condition the infill on")
        if single_line is not None and not isinstance(single_line, bool):
            raise ValueError(f"single_line must be true, false or None (decided by the cursor's line), "
                             f"got {single_line!r}")
        tok = self._need_tokenizer()
        max_new_tokens, cfg, generator = self._resolve(max_new_tokens, seed, sampling)
        window, prefix_ids = self._prefix_window(prefix)
        if instruction:
            lead = self._instruction_ids(instruction)
            prefix_ids = lead + prefix_ids
            window = (hash(tuple(lead)), *window[1:])  # its own strip: the document's stays as it is
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
    def _typed_ahead(self, request: _Request) -> Done | None:
        """The rest of this session's previous answer when the user has typed its beginning, else None."""
        t0 = time.perf_counter()
        key = (request.session, request.options[0])
        with self._answers_lock:
            rest = rest_after_typing(self._answers.get(key), request.prefix_text, request.suffix_text,
                                     request.options)
            if rest is None:
                return None
            self._answers[key] = Answer(request.prefix_text, request.suffix_text, rest, request.options)
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
    def _run(self, request: _Request, with_steps: bool) -> Iterator[Step | Done]:
        """`_generate`, holding idle prefill off from its first step to its end."""
        cursor = len(request.prefix_text) if request.prefix_text is not None else None
        with self._prefill.request(request.session, cursor):
            yield from self._generate(request, with_steps)

    def _generate(self, request: _Request, with_steps: bool) -> Iterator[Step | Done]:
        t0 = time.perf_counter()
        model = self.model
        stop_ids = set(self.eos_ids)  # as the reference: EOS ends the output, pad only follows it
        # 1.a Encode the prefix. Sessions reuse their document's cached strip, encoding in
        # position-aligned chunks (warm == cold, bitwise); one-off requests encode in one pass, as
        # generate does.
        with self._lock, torch.inference_mode():
            if request.session is not None:
                # no prefix in this window is longer than a window (plus an instruction before it)
                limit = max(len(request.prefix_ids), self.window_tokens)
                cache, n_encoded = self.caches.encode(model, request.session, request.window, request.prefix_ids,
                                                      limit=limit)
            else:
                cache, n_encoded = encode_prefix(model, request.prefix_ids)
            self.last_encoded, self.last_prefix_len = n_encoded, len(request.prefix_ids)
        cur_len = len(request.prefix_ids)
        middle: list[int] = []
        steps_total = 0
        ended = False
        chosen_len = 0
        scores: tuple[float, ...] = ()
        step_index = 0
        while len(middle) < request.max_new_tokens and not ended:
            remaining = request.max_new_tokens - len(middle)
            s = len(request.suffix_head)
            if request.init_middle is not None:
                slots, final = [remaining], True
            elif request.lengths is not None and not middle:
                slots, final = request.lengths, True
            elif s and remaining + s <= max(self.canvas_length, 8 + s):
                slots, final = candidate_lengths(remaining), True  # unknown middle length: candidates
            elif s:
                slots, final = [self.canvas_length], False  # long middle: plain blocks first
            else:
                slots, final = [self.canvas_length], remaining <= self.canvas_length
            head = request.suffix_head if final else []
            layout = infill_layout(cur_len, slots, head, self.pad_id if self.pad_id is not None else 0, model.device)
            # 1.b–c Denoise this block.
            block = yield from self._denoise_block(cache, layout, request, stop_ids, middle, with_steps,
                                                   step_index, t0)
            step_index += block.forwards
            steps_total += block.forwards
            chosen_len = layout.slot_lengths[block.row]
            scores = block.scores
            # 1.d Append the middle; 1.e stop at EOS or budget.
            take = block.ids[: remaining]
            middle.extend(take)
            ended = block.ended or final
            if not ended and len(middle) < request.max_new_tokens:
                # 1.f Encode this block so the next canvas continues after it.
                with self._lock, torch.inference_mode():
                    encode_chunk(model, cache, take, cur_len)
                cur_len += len(take)
        text_ids = middle
        text = ""
        # Tokens per forward counts the answer and the token that ended it (EOS), not canvas slots the
        # answer drops.
        n_tokens = len(middle) + (1 if ended and len(middle) < request.max_new_tokens else 0)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            if request.single_line and "\n" in text:
                text = text.split("\n", 1)[0]
                text_ids = self.tokenizer.encode(text, add_special_tokens=False)
                n_tokens = len(text_ids) + 1  # the line, then the newline that ends it
        ms = (time.perf_counter() - t0) * 1000.0
        done = Done(text=text, ids=tuple(text_ids), steps=steps_total,
                    tokens_per_forward=(n_tokens / steps_total) if steps_total else 0.0, ms=ms, length=chosen_len,
                    scores=scores, encoded=n_encoded, prefix_tokens=len(request.prefix_ids))
        self._remember(request, done)  # before the yield: a consumer may stop at the Done
        yield done

    def _denoise_block(self, cache, layout: Layout, request: _Request, stop_ids: set[int], middle_so_far: list[int],
                       with_steps: bool, step_offset: int, t0: float):
        """Steps 1.b–1.d for one canvas. Yields `Step`s; returns a `_BlockResult`."""
        model = self.model
        cfg = request.cfg
        generator = request.generator
        device = model.device
        b, width = layout.clamped.shape
        fixed = layout.any_fixed
        if fixed and self.pad_id is not None:
            # A candidate row is [middle, <eos>, <pad> * k, suffix head]: pad only ever follows the end of
            # the middle, so a pad where no EOS was drawn shows that the middle ended there too. (Plain
            # canvases keep the reference's rule, EOS only, for token parity with generate.)
            stop_ids = stop_ids | {self.pad_id}
        # Reference draws for plain canvases (token parity with generate), fast exact draws otherwise.
        draw = cfg.draw if cfg.draw != "auto" else ("inverse_cdf" if fixed else "multinomial")
        candidates = layout.candidates if fixed else None
        keep = (layout.clamped | ~layout.valid) if fixed else None
        batch_cache = cache
        if b > 1:
            hf.batch_repeat(batch_cache, b)  # the final block is this cache's last use
        with self._lock:
            mask_mapping = hf.decoder_masks(model, batch_cache, b, width, layout.attention_mask)
        # 1.b Prepare the canvas.
        steps_remaining_start = cfg.max_denoising_steps
        if request.init_middle is not None:
            current_canvas = self._rewrite_start(batch_cache, layout, request, mask_mapping)
            steps_remaining_start = max(1, round(request.strength * cfg.max_denoising_steps))
        else:
            current_canvas = sampler.initial_canvas(b, width, self.vocab_size, cfg, generator, device)
        if fixed:
            current_canvas = torch.where(layout.clamped, layout.clamped_ids, current_canvas)
        argmax_canvas = current_canvas
        self_conditioning_logits = None
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        any_finished = False  # host copy of finished.any(), from the previous step's one sync
        forwards = 0  # decoder passes run, counting up; each runs every row, finished or not
        history = None
        embeddings_dtype = hf.embedding_dtype(model)
        # Absorbing noise: token log-probabilities recorded as positions are unmasked (for the row choice).
        absorbing = cfg.noise == "mask"
        token_logp = torch.zeros((b, width), dtype=torch.float32, device=device) if absorbing else None
        line_ends = self._line_ends(stop_ids) if absorbing and request.single_line else None  # [V] bool
        # 1.c Denoising steps; steps_remaining counts down N..1 like the reference's cur_step.
        for steps_remaining in reversed(range(1, steps_remaining_start + 1)):
            forwards += 1
            with self._lock, torch.inference_mode():
                # 1.c.i Decoder forward with self-conditioning.
                raw_logits = hf.decoder_forward(  # [B, L, V]
                    model, batch_cache, current_canvas,
                    layout.position_ids[:1] if not fixed else layout.position_ids,
                    mask_mapping, self_conditioning_logits)
                # 1.c.ii Temperature, denoiser sample, argmax draft.
                processed_logits = sampler.temperature_scale(raw_logits, steps_remaining, cfg)
                if absorbing:  # only masked positions are sampled; unmasked tokens are final (entropy 0)
                    was_masked = current_canvas == cfg.mask_token_id  # [B, L]
                    need = was_masked if candidates is None else was_masked & candidates
                    denoiser_canvas, new_argmax_canvas, entropy, denoiser_logp, argmax_logp = (
                        sampler.denoise_masked_positions(processed_logits, current_canvas, need, generator, draw))
                else:
                    denoiser_canvas = sampler.sample_denoiser_canvas(processed_logits, generator, draw)
                    new_argmax_canvas = torch.argmax(processed_logits, dim=-1)
                    entropy, _ = sampler.token_entropy_and_log_probs(processed_logits)  # [B, L] (also 1.c.iv)
                # 1.c.iii Accept by entropy bound, renoise the rest.
                accepted_canvas, accepted = sampler.entropy_bound_accept(
                    current_canvas, denoiser_canvas, entropy, cfg.entropy_bound, candidates)
                new_current_canvas = sampler.renoise(accepted_canvas, accepted, self.vocab_size, cfg, generator, keep)
                if absorbing:
                    new_token_logp = sampler.commit_logp(token_logp, was_masked, accepted, denoiser_logp, argmax_logp)
                    # the draft shows the tokens committed this step: they are final
                    new_argmax_canvas = torch.where(accepted, denoiser_canvas, new_argmax_canvas)
                if fixed:
                    new_argmax_canvas = torch.where(layout.clamped, layout.clamped_ids, new_argmax_canvas)
                # 1.c.iv Stopping per row; finished rows keep their last state.
                if any_finished:
                    new_argmax_canvas = torch.where(finished[:, None], argmax_canvas, new_argmax_canvas)
                    new_current_canvas = torch.where(finished[:, None], current_canvas, new_current_canvas)
                    processed_logits = torch.where(finished[:, None, None], self_conditioning_logits,
                                                   processed_logits)
                    if absorbing:
                        new_token_logp = torch.where(finished[:, None], token_logp, new_token_logp)
                # (Rows that stopped earlier keep stale logits; their entropy no longer matters.)
                stop, history = sampler.stable_and_confident(
                    history, new_argmax_canvas, entropy, cfg, layout.candidates if fixed else None)
                if line_ends is not None:  # the line is unmasked through its end: no later step changes it
                    stop = stop | sampler.line_decided(new_current_canvas, line_ends, cfg.mask_token_id,
                                                       layout.middle)
                finished = finished | stop
                # 1.c.v Self-conditioning for the next step.
                self_conditioning_logits = processed_logits.to(embeddings_dtype)
                current_canvas, argmax_canvas = new_current_canvas, new_argmax_canvas
                if absorbing:
                    token_logp = new_token_logp
                # The step's one host sync. NaN/inf logits make NaN entropy: raised here, before a garbage
                # draft can be shown.
                nonfinite, any_finished, all_finished = torch.stack(
                    (entropy.isnan().any(), finished.any(), finished.all())).tolist()
                if nonfinite:
                    raise sampler.NonFiniteLogits()
            if with_steps:
                step_no = step_offset + forwards
                yield self._step_event(layout, current_canvas, argmax_canvas, accepted, processed_logits, stop_ids,
                                       middle_so_far, step_no, step_offset + steps_remaining_start, t0, request,
                                       token_logp, line_ends)
            if all_finished:
                break
        # 1.d Choose the row.
        row, scores = self._choose_row(layout, argmax_canvas, self_conditioning_logits, stop_ids, token_logp,
                                       line_ends)
        row_ids = argmax_canvas[row, : layout.slot_lengths[row]].tolist()
        end, ended = middle_end(row_ids, stop_ids)
        return _BlockResult(ids=row_ids[:end], ended=ended, forwards=forwards, row=row,
                            scores=tuple(scores))

    def _line_ends(self, stop_ids: set[int]) -> torch.Tensor | None:
        """[V] bool: tokens that end a line (their text has a newline) or the middle (`stop_ids`).

        The newline part is built once per engine (one batch decode of the vocabulary) and kept with its
        other caches; the stop ids differ by layout, so they are added per call.
        """
        if self.tokenizer is None:
            return None
        if self._newline_tokens is None:
            n = min(self.vocab_size, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in range(n)])
            newline = torch.zeros(self.vocab_size, dtype=torch.bool)
            newline[:n] = torch.tensor(["\n" in text for text in texts], dtype=torch.bool)
            self._newline_tokens = newline.to(self.model.device)
        table = self._newline_tokens.clone()
        table[[i for i in stop_ids if 0 <= i < self.vocab_size]] = True
        return table

    def _choose_row(self, layout: Layout, argmax_canvas, logits, stop_ids,
                    token_logp: torch.Tensor | None = None,
                    line_ends: torch.Tensor | None = None) -> tuple[int, list[float]]:
        """Score each candidate: mean log-probability of its middle (through EOS) and of the clamped suffix head.

        With absorbing noise (`token_logp` given) the model's output at visible positions, the clamped head
        included, was never trained: a middle is scored by the log-probabilities its tokens had when they
        were unmasked, and the head does not count. For a single-line request (`line_ends` given, [V]
        bool) only the line is scored, through its first line end: the rest of the row is cut anyway.
        """
        b = argmax_canvas.shape[0]
        if b == 1:
            return 0, [0.0]
        if token_logp is None:
            logp = torch.log_softmax(logits.float(), dim=-1)  # [B, L, V]
            ids = torch.where(layout.clamped, layout.clamped_ids, argmax_canvas)
            token_logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, L]
            with_head = True
        else:
            with_head = False
        rows = argmax_canvas.tolist()
        if line_ends is not None:
            ends = line_ends[argmax_canvas].tolist()  # [B, L]; line_ends holds the stop ids too

            def row_end(r: int, m: int) -> int:
                return next((i for i in range(m) if ends[r][i]), m)
        else:
            def row_end(r: int, m: int) -> int:
                return middle_end(rows[r][:m], stop_ids)[0]
        scores = []
        for r in range(b):
            m = layout.slot_lengths[r]
            end = row_end(r, m)
            upto = min(m, end + 1)
            mid = token_logp[r, :upto].mean() if upto > 0 else torch.tensor(0.0)
            clamp_mask = layout.clamped[r]
            head = token_logp[r][clamp_mask].mean() if with_head and bool(clamp_mask.any()) else torch.tensor(0.0)
            scores.append(float(mid + head))
        # A mean log-probability favours the shortest middles, and an immediate EOS is the most
        # confident of all: prefer candidates that propose something, when any does.
        nonempty = [r for r in range(b) if row_end(r, layout.slot_lengths[r]) > 0]
        best = max(nonempty or range(b), key=lambda r: scores[r])
        return best, scores

    def _rewrite_start(self, batch_cache, layout: Layout, request: _Request, mask_mapping) -> torch.Tensor:
        """Starting canvas for a rewrite: the selection, then EOS and pad, with the least sure `strength` renoised."""
        model = self.model
        cfg = request.cfg
        device = model.device
        width = layout.width
        slots = layout.slot_lengths[0]
        eos = min(self.eos_ids) if self.eos_ids else (self.pad_id or 0)
        pad = self.pad_id if self.pad_id is not None else eos
        start = list(request.init_middle[:slots])
        if len(start) < slots:
            start = start + [eos] + [pad] * (slots - len(start) - 1)
        canvas = torch.tensor([start + [0] * (width - slots)], dtype=torch.long, device=device)
        canvas = torch.where(layout.clamped, layout.clamped_ids, canvas)
        n_sel = min(len(request.init_middle), slots)
        k = max(1, math.ceil(request.strength * n_sel))
        with self._lock, torch.inference_mode():
            logits = hf.decoder_forward(model, batch_cache, canvas, layout.position_ids, mask_mapping)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, canvas.unsqueeze(-1)).squeeze(-1)
        # Least sure selection tokens first; the slack after the selection is always open to change.
        sure = logp[0, :n_sel]
        order = torch.argsort(sure)[:k]
        renoise_mask = torch.zeros((1, width), dtype=torch.bool, device=device)
        renoise_mask[0, order] = True
        renoise_mask[0, n_sel:slots] = True
        noise = sampler.initial_canvas(1, width, self.vocab_size, cfg, request.generator, device)
        return torch.where(renoise_mask, noise, canvas)

    def _step_event(self, layout: Layout, current_canvas, argmax_canvas, accepted, processed_logits, stop_ids, middle_so_far,
                    index: int, total: int, t0: float, request: _Request, token_logp=None,
                    line_ends=None) -> Step:
        """A `Step` for people: the best-looking row's draft, each token with its state and confidence."""
        if argmax_canvas.shape[0] > 1:
            row, _ = self._choose_row(layout, argmax_canvas, processed_logits, stop_ids, token_logp, line_ends)
        else:
            row = 0
        m = layout.slot_lengths[row]
        row_ids = argmax_canvas[row, :m].tolist()
        end, _ = middle_end(row_ids, stop_ids)
        if token_logp is not None:  # absorbing noise: each token's probability when it was unmasked
            confidence = token_logp[row, :end].exp().tolist()
        else:
            confidence = torch.softmax(processed_logits[row, :end].float(), dim=-1).max(dim=-1).values.tolist()
        acc = accepted[row, :end].tolist()
        tokens: tuple[Token, ...] = ()
        text = ""
        if self.tokenizer is not None:
            tokens = tuple(
                Token(text=self.tokenizer.decode([t]), accepted=bool(a), confidence=float(c))
                for t, a, c in zip(row_ids[:end], acc, confidence)
            )
            text = self.tokenizer.decode(middle_so_far + row_ids[:end], skip_special_tokens=True)
            if request.single_line and "\n" in text:
                text = text.split("\n", 1)[0]
        canvas = current_canvas[row][layout.valid[row]].tolist()
        return Step(index=index, total=total, text=text, tokens=tokens, ids=tuple(row_ids[:end]),
                    ms=(time.perf_counter() - t0) * 1000.0, canvas=tuple(canvas))


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


def _last(events: Iterator[Step | Done]) -> Done:
    result = None
    for result in events:
        pass
    assert isinstance(result, Done)
    return result


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


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
