"""Test-only fault injection: make a loaded model misbehave for chosen requests, in a real server process.

Why: the fault tests (tests/test_faults.py) and the soak bench run the front ends exactly as a user
starts them (`dg-edit serve`, `dg-edit lsp` in their own processes), where monkeypatching is not an
option. Setting `DG_EDIT_FAULT=KIND[:ARG]` in a server's environment makes `Engine.load` (the one
place this is read) call `install`, which puts forward hooks on the model. Only requests whose
prefix contains `MARKER` are affected, so a test can show that a failing request costs that request
only while every other request on the same server is served.

Kinds (per affected request, counting its decoder forward passes = denoising steps):
    raise[:N]   RuntimeError at step N (default 2): "the model raises mid-canvas"
    nan[:N]     the logits of step N onwards are NaN (default 1)
    slow:S      every step sleeps S seconds first (a slow model; holds the engine lock, as a slow
                forward would)
    oom[:N]     torch.OutOfMemoryError at step N (default 2): "the GPU ran out of memory mid-canvas"

Never set it outside tests: the server prints a warning on stderr when a fault is installed.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from . import hf_adapter as hf

FAULT_ENV = "DG_EDIT_FAULT"
MARKER = "DG_EDIT_FAULT_HERE"
KINDS = ("raise", "nan", "slow", "oom")


@dataclass(frozen=True)
class Fault:
    kind: str
    arg: float

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        kind, _, arg = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f"{FAULT_ENV}={spec!r}: kind must be one of {', '.join(KINDS)}")
        default = {"raise": 2, "nan": 1, "slow": 0.1, "oom": 2}[kind]
        try:
            value = float(arg) if arg else float(default)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r}: the argument after ':' must be a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{FAULT_ENV}={spec!r}: the argument must be a finite number >= 0")
        return cls(kind, value)


def install(model, tokenizer, spec: str) -> Fault:
    """Hook `model` so that requests whose prefix contains `MARKER` get the fault `spec`."""
    fault = Fault.parse(spec)
    # Encoder KV caches of marked requests -> decoder steps run so far. The decoder passes the same
    # cache object it was given by the encoder, which is how a step is tied to its request.
    marked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def on_encode(module, args, kwargs):
        cache = hf.hook_cache(kwargs)
        ids = kwargs.get("input_ids")
        if cache is None or ids is None:
            return
        if MARKER in tokenizer.decode(ids[0].tolist()):
            with lock:
                marked.setdefault(cache, 0)

    def marked_rows(kwargs) -> list[tuple[object, int, int | None]]:
        """(cache, first row, end row) of the marked requests in this decoder forward: a request alone, or
        the members of a batched forward (dg_edit/scheduler.py), each with its own cache."""
        cache = hf.hook_cache(kwargs)
        if kwargs.get("decoder_input_ids") is None or cache is None:
            return []
        members = hf.batch_members(cache) or ((cache, 0, None),)
        return [m for m in members if m[0] in marked]

    def on_decode(module, args, kwargs):
        hits = marked_rows(kwargs)
        if not hits:
            return
        with lock:
            steps = []
            for cache, _, _ in hits:
                marked[cache] += 1
                steps.append(marked[cache])
        step = max(steps)
        if fault.kind == "raise" and step >= fault.arg:
            raise RuntimeError(f"injected fault ({FAULT_ENV}=raise): the model failed at denoising step {step}")
        if fault.kind == "oom" and step >= fault.arg:
            raise torch.OutOfMemoryError(f"injected fault ({FAULT_ENV}=oom): CUDA out of memory at denoising "
                                         f"step {step}")
        if fault.kind == "slow":
            time.sleep(fault.arg)

    def after_decode(module, args, kwargs, output):
        if fault.kind != "nan":
            return None
        for cache, start, end in marked_rows(kwargs):
            with lock:
                step = marked.get(cache, 0)
            if step >= max(fault.arg, 1):
                output.last_hidden_state[start:end] = float("nan")  # that request's rows only: NaN logits
        return output

    hf.encoder_module(model).register_forward_pre_hook(on_encode, with_kwargs=True)
    # On the decoder itself: a batched step (dg_edit/scheduler.py) runs it without the model's own forward.
    hf.decoder_module(model).register_forward_pre_hook(on_decode, with_kwargs=True)
    hf.decoder_module(model).register_forward_hook(after_decode, with_kwargs=True)
    print(f"dg-edit: WARNING: test fault injection is on ({FAULT_ENV}={spec}): requests containing "
          f"{MARKER} will fail", file=sys.stderr, flush=True)
    return fault
