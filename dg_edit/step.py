"""One denoising step after the decoder forward (1.c.ii–iv), as functions of tensors.

Two parts, so that each can be captured by `torch.compile` per layout bucket (and by CUDA graphs on
a GPU, `mode="reduce-overhead"`):

- `vocab_pass`: the only vocabulary-wide work. Over the positions that need it (every position of a
  plain canvas; the candidate slots of a clamped or batched one; the masked slots with absorbing
  noise), it draws the denoiser token, takes the argmax and the entropy. Eagerly it walks the
  [B*L, V] logits in row chunks, so no [B, L, V] temporary beyond the logits themselves is ever
  live; the random draws happen chunk by chunk in the reference's order (on a CPU, chunked
  `exponential_` draws are the same stream as one call, checked in tests/test_step.py).
  `torch.multinomial(probs, 1)` is `argmax(probs / q)` with `q ~ Exp(1)` drawn over the whole
  [N, V] (that is how torch implements it), which is what makes chunking it exact.
- `update`: acceptance, renoising, the finished rows, the stop test and the step's flags, on
  [B, L] tensors only. Its one host sync is the caller's `flags.tolist()`.

The compiled path (`CompiledStep`) draws its noise before the step as tensors (`draw_noise`), so
that the compiled functions are pure; eager and compiled steps give the same tokens (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import sampler
from .config import SamplingConfig

CHUNK_BYTES = 16 << 20  # one float32 [rows, V] temporary of the vocabulary pass: 16 rows at V = 262,144


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per chunk so that each temporary stays near CHUNK_BYTES (the entropy alone makes four)."""
    return max(2, CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class StepSpec:
    """What specializes a step (static for torch.compile): the sampler settings and the layout kind."""

    cfg: SamplingConfig  # entropy bound, stop test, noise kind
    vocab_size: int
    draw: str  # "multinomial" | "inverse_cdf"
    fixed: bool  # the layout has clamped or pad positions
    single_line: bool  # a line-end table stops rows early (absorbing noise only)
    chunk_rows: int | None = None  # None: chunk_rows_for(vocab_size); 0: the whole pass at once

    @property
    def absorbing(self) -> bool:
        return self.cfg.noise == "mask"


class VocabResult(NamedTuple):
    denoiser_canvas: torch.Tensor  # [B, L] drawn tokens (the current token where nothing was drawn)
    argmax_canvas: torch.Tensor  # [B, L]
    entropy: torch.Tensor  # [B, L] float32, 0 where nothing was drawn
    denoiser_logp: torch.Tensor | None  # [B, L] absorbing noise only: log-probability of the drawn token
    argmax_logp: torch.Tensor | None  # [B, L] absorbing noise only: log-probability of the argmax token


class Noise(NamedTuple):
    """Random draws made before a compiled step, in the reference's order."""

    exponential: torch.Tensor | None  # [B*L, V] float32 Exp(1), multinomial draws
    uniform: torch.Tensor | None  # [B*L, 1] float32 U(0, 1), inverse-CDF draws


def need_mask(spec: StepSpec, current_canvas: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor | None:
    """[B, L] bool: positions whose vocabulary work is needed (None: all of them)."""
    if spec.absorbing:
        masked = current_canvas == spec.cfg.mask_token_id
        return masked if candidates is None else masked & candidates
    return candidates


def vocab_pass(processed_logits: torch.Tensor,  # [B, L, V] temperature-scaled
               current_canvas: torch.Tensor,  # [B, L]
               need: torch.Tensor | None,  # [B, L] bool, None = every position
               spec: StepSpec,
               generator: torch.Generator | None = None,
               noise: Noise | None = None) -> VocabResult:
    """1.c.ii: denoiser draw, argmax and entropy where needed, in row chunks (see module docstring).

    Draws come from `noise` when given (compiled path), else from `generator` chunk by chunk. Every
    row's exponential draws are consumed, needed or not, so the stream does not depend on `need`.
    """
    b, width, vocab = processed_logits.shape
    n = b * width
    logits = processed_logits.reshape(n, vocab)
    flat_need = None if need is None else need.reshape(n)
    denoiser = current_canvas.reshape(n).clone()
    entropy = torch.zeros(n, dtype=torch.float32, device=logits.device)
    denoiser_logp = torch.zeros_like(entropy) if spec.absorbing else None
    argmax_logp = torch.zeros_like(entropy) if spec.absorbing else None
    if spec.absorbing:
        argmax = current_canvas.reshape(n).clone()
    else:
        argmax = torch.argmax(logits, dim=-1)  # every position, as the reference (no [N, V] temporary)
    if noise is None and spec.draw == "multinomial" and logits.device.type != "cpu":
        # Chunked exponential_ draws equal one call's only on a CPU (elementwise from one stream); a CUDA
        # generator advances by a rounded offset per call, so there the draws are made in one call, as
        # torch.multinomial makes them (one more [B*L, V] buffer, and parity with generate kept).
        noise = draw_noise(spec, b, width, generator, logits.device)
    uniform = None
    if spec.draw == "inverse_cdf":
        uniform = noise.uniform if noise is not None else torch.rand((n, 1), generator=generator, device=logits.device)
    rows_per_chunk = chunk_rows_for(vocab) if spec.chunk_rows is None else spec.chunk_rows
    for start, end in _chunks(n, rows_per_chunk):
        rows = logits[start:end]
        sel = None if flat_need is None else flat_need[start:end]
        q = None
        if spec.draw == "multinomial":
            q = (noise.exponential[start:end] if noise is not None
                 else torch.empty((end - start, vocab), dtype=torch.float32, device=rows.device).exponential_(
                     generator=generator))
        if sel is not None:
            rows = rows[sel]
            q = q[sel] if q is not None else None
        ent, log_probs = sampler.token_entropy_and_log_probs(rows if not spec.absorbing else rows.float())
        if spec.draw == "multinomial":
            probs = torch.softmax(rows, dim=-1, dtype=torch.float32)
            drawn = probs.div_(q).argmax(dim=-1)  # == torch.multinomial(probs, 1) with the same draws
            del probs
        else:
            u = uniform[start:end] if sel is None else uniform[start:end][sel]
            cdf = torch.softmax(rows, dim=-1, dtype=torch.float32).cumsum_(dim=-1)
            drawn = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=vocab - 1)
            del cdf
        _put(denoiser, start, end, sel, drawn)
        _put(entropy, start, end, sel, ent)
        if spec.absorbing:
            best_logp, best = log_probs.max(dim=-1)
            _put(argmax, start, end, sel, best)
            _put(argmax_logp, start, end, sel, best_logp)
            _put(denoiser_logp, start, end, sel, log_probs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
        del log_probs, rows, q
    shape = (b, width)
    return VocabResult(denoiser.view(shape), argmax.view(shape), entropy.view(shape),
                       None if denoiser_logp is None else denoiser_logp.view(shape),
                       None if argmax_logp is None else argmax_logp.view(shape))


def vocab_pass_dense(processed_logits: torch.Tensor, current_canvas: torch.Tensor, need: torch.Tensor | None,
                     spec: StepSpec, noise: Noise) -> VocabResult:
    """`vocab_pass` over every position at once, masked by `need`: static shapes for torch.compile
    (inductor fuses the softmax, the draw and the entropy without materializing them)."""
    b, width, vocab = processed_logits.shape
    logits = processed_logits.reshape(b * width, vocab).float()
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = log_probs.exp()
    ent = -(log_probs.clamp(min=torch.finfo(log_probs.dtype).min) * probs).sum(-1)
    if spec.draw == "multinomial":
        drawn = (probs / noise.exponential).argmax(dim=-1)
    else:
        cdf = probs.cumsum(dim=-1)
        drawn = torch.searchsorted(cdf, noise.uniform * cdf[:, -1:]).squeeze(-1).clamp(max=vocab - 1)
    flat_current = current_canvas.reshape(-1)
    sel = torch.ones_like(flat_current, dtype=torch.bool) if need is None else need.reshape(-1)
    denoiser = torch.where(sel, drawn, flat_current)
    entropy = torch.where(sel, ent, torch.zeros_like(ent))
    if spec.absorbing:
        best_logp, best = log_probs.max(dim=-1)
        argmax = torch.where(sel, best, flat_current)
        zeros = torch.zeros_like(ent)
        argmax_logp = torch.where(sel, best_logp, zeros)
        denoiser_logp = torch.where(sel, log_probs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1), zeros)
    else:
        argmax = logits.argmax(dim=-1)
        argmax_logp = denoiser_logp = None
    shape = (b, width)
    return VocabResult(denoiser.view(shape), argmax.view(shape), entropy.view(shape),
                       None if denoiser_logp is None else denoiser_logp.view(shape),
                       None if argmax_logp is None else argmax_logp.view(shape))


def draw_noise(spec: StepSpec, b: int, width: int, generator: torch.Generator | None, device) -> Noise:
    """The vocabulary pass's random draws, made up front for a compiled step (same order as eager)."""
    n = b * width
    if spec.draw == "multinomial":
        return Noise(torch.empty((n, spec.vocab_size), dtype=torch.float32, device=device).exponential_(
            generator=generator), None)
    return Noise(None, torch.rand((n, 1), generator=generator, device=device))


class StepState(NamedTuple):
    """What one block's denoising carries from one step to the next (one object, not five arguments)."""

    current_canvas: torch.Tensor  # [B, L] what the decoder reads next step
    argmax_canvas: torch.Tensor  # [B, L] the draft
    finished: torch.Tensor  # [B] bool
    history: torch.Tensor | None  # [K, B, L] drafts of the last steps (stop test)
    token_logp: torch.Tensor | None  # [B, L] absorbing noise only


class StepMasks(NamedTuple):
    """What the layout fixes for every step of a block: None where it does not apply."""

    candidates: torch.Tensor | None = None  # [B, L] bool, fixed layouts only
    keep: torch.Tensor | None = None  # [B, L] bool: never renoised (clamped, pad), fixed layouts only
    clamped: torch.Tensor | None = None  # [B, L] bool, fixed layouts only
    clamped_ids: torch.Tensor | None = None  # [B, L], fixed layouts only
    middle: torch.Tensor | None = None  # [B, L] bool, single-line only
    line_ends: torch.Tensor | None = None  # [V] bool, single-line only


class StepOut(NamedTuple):
    state: StepState  # the state after this step
    accepted: torch.Tensor  # [B, L] bool: taken from the denoiser this step
    stop: torch.Tensor  # [B] bool: rows that met the stop test this step
    flags: torch.Tensor  # [3] bool: non-finite entropy, any row finished, every row finished (the host sync)


def update(spec: StepSpec,
           vocab: VocabResult,
           state: StepState,
           noise_canvas: torch.Tensor,  # [B, L] renoising draws (uniform tokens or all <mask>)
           was_masked: torch.Tensor | None,  # [B, L] absorbing noise only
           masks: StepMasks,
           ) -> StepOut:
    """1.c.iii–iv on [B, L] tensors: accept by entropy bound, renoise the rest, stop test per row."""
    current_canvas, argmax_canvas, finished, history, token_logp = state
    candidates, keep, clamped, clamped_ids, middle, line_ends = masks
    accepted_canvas, accepted = sampler.entropy_bound_accept(current_canvas, vocab.denoiser_canvas, vocab.entropy,
                                                             spec.cfg.entropy_bound, candidates)
    renoise_mask = ~accepted if keep is None else ~accepted & ~keep
    new_current = torch.where(renoise_mask, noise_canvas, accepted_canvas)
    new_argmax = vocab.argmax_canvas
    new_token_logp = token_logp
    if spec.absorbing:
        new_token_logp = sampler.commit_logp(token_logp, was_masked, accepted, vocab.denoiser_logp, vocab.argmax_logp)
        new_argmax = torch.where(accepted, vocab.denoiser_canvas, new_argmax)  # committed tokens are final
    if clamped is not None:
        new_argmax = torch.where(clamped, clamped_ids, new_argmax)
    # finished rows keep their last state
    new_argmax = torch.where(finished[:, None], argmax_canvas, new_argmax)
    new_current = torch.where(finished[:, None], current_canvas, new_current)
    if spec.absorbing:
        new_token_logp = torch.where(finished[:, None], token_logp, new_token_logp)
    stop, history = sampler.stable_and_confident(history, new_argmax, vocab.entropy, spec.cfg, candidates)
    if line_ends is not None:  # the line is unmasked through its end: no later step changes it
        stop = stop | sampler.line_decided(new_current, line_ends, spec.cfg.mask_token_id, middle)
    finished = finished | stop
    flags = torch.stack((vocab.entropy.isnan().any(), finished.any(), finished.all()))
    return StepOut(StepState(new_current, new_argmax, finished, history, new_token_logp), accepted, stop, flags)


class CompiledStep:
    """`vocab_pass_dense` and `update` under torch.compile, one graph per spec and shape (layout bucket).

    Inductor's random numbers differ from eager's, so the noise is drawn eagerly (`draw_noise`) and
    passed in. On CUDA, mode "reduce-overhead" also records CUDA graphs.
    """

    def __init__(self, device: torch.device | str):
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        self.vocab_pass = torch.compile(vocab_pass_dense, dynamic=False, mode=mode)
        self.update = torch.compile(update, dynamic=False, mode=mode)


def _chunks(n: int, size: int | None) -> list[tuple[int, int]]:
    """Row ranges of at most `size` rows, never a 1-row range after the first (a one-row reduction
    may be split across threads and round differently from the same row in a bigger batch)."""
    if not size or size >= n:
        return [(0, n)]
    size = max(size, 2)
    bounds = list(range(0, n, size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    return list(zip(bounds[:-1], bounds[1:]))


def _put(out: torch.Tensor, start: int, end: int, sel: torch.Tensor | None, values: torch.Tensor) -> None:
    if sel is None:
        out[start:end] = values
    else:
        out[start:end][sel] = values.to(out.dtype)
