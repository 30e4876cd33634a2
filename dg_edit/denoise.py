"""One request's denoising loop: DiffusionGemma block diffusion with masked-span conditioning.

Algorithm, numbered as in `generation_diffusion_gemma.py` so the two read side by side:

1. Block loop (one canvas per block; infill requests usually need one), `generate`:
   a. Encode the prefix with the encoder into a KV cache (reusing the document's cached strips,
      `dg_edit.prefix_cache`; idle prefill, `dg_edit.prefill`, fills them between requests).
   b. Lay out the canvas: middle slots, then the clamped suffix head on the last block; several
      candidate middle lengths as one batch when the middle length is unknown.
   c. For each denoising step (steps_remaining = N..1), `denoise_block`:
      i.   decoder forward over the canvas with self-conditioning on the previous step's logits;
      ii.  temperature-scale, sample the denoiser canvas, take the argmax canvas;
      iii. entropy-bound acceptance, renoise what was not accepted (clamped positions untouched);
      iv.  stable-and-confident stopping per row;
      v.   the processed logits become next step's self-conditioning.
   d. Pick the candidate row by the model's own evidence (`choose_row`), cut the middle at EOS/pad.
   e. Stop at EOS or at the token budget; otherwise encode the block and go on.

With an empty suffix and one row this calls the same random functions in the same order as the
reference, so `Engine.infill_ids` equals `model.generate` token for token.

Why a module of its own: the engine (dg_edit/engine.py) prepares requests (tokens, windows, typed-ahead)
and owns the model, caches and lock; these functions run one prepared request over them. The loop is a
coroutine: it yields `Forward`/`Sync` asks instead of calling the decoder, so that the scheduler
(dg_edit/scheduler.py) runs every active request's step in one forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from . import hf_adapter as hf, sampler, step as step_fn
from .canvas import Layout, candidate_lengths, infill_layout, middle_end
from .events import Done, Step, Token
from .prefix_cache import encode_chunk, encode_prefix
from .scheduler import PAUSE, Forward, Sync

if TYPE_CHECKING:
    from .engine import Engine, _Request as Request


class ModelOutOfMemory(RuntimeError):
    """The device ran out of memory during one request; that request fails, the engine goes on."""


@dataclass
class BlockResult:
    ids: list[int]  # middle tokens of the chosen row, cut at EOS/pad
    ended: bool  # EOS/pad inside the slots ended the middle
    forwards: int  # decoder passes the block ran: rows stop independently, but a pass runs the whole batch
    row: int
    scores: tuple[float, ...]


def request_steps(engine: Engine, request: Request, with_steps: bool):
    """`run` as a coroutine of `Forward`/`Sync` asks and `Step`/`Done` events, with running out of
    memory turned into `ModelOutOfMemory` for this request only.

    The request's own tensors go when its generator unwinds; the document's prefix cache may be
    half-written and is dropped too, and a GPU's cached blocks go back to the driver, so the next
    request starts from the memory the plan counted.
    """
    try:
        yield from run(engine, request, with_steps)
    except torch.OutOfMemoryError as e:
        if request.session is not None:
            engine.forget(request.session)
        device = engine.model.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        raise ModelOutOfMemory(
            f"out of memory on {device} while denoising this request ({first_line}); its caches were "
            "released. Ask for fewer tokens or candidates, or see `dg-edit plan` for a setting that "
            "fits") from None


def run(engine: Engine, request: Request, with_steps: bool) -> Iterator[Step | Done]:
    """`generate`, holding idle prefill off from its first step to its end."""
    cursor = len(request.prefix_text) if request.prefix_text is not None else None
    with engine._prefill.request(request.session, cursor):
        yield from generate(engine, request, with_steps)


def generate(engine: Engine, request: Request, with_steps: bool) -> Iterator[Step | Done]:
    """Steps 1.a–1.e for one request: its `Step`s (asked for: `with_steps`), then its `Done`."""
    t0 = time.perf_counter()
    model = engine.model
    stop_ids = set(engine.eos_ids)  # as the reference: EOS ends the output, pad only follows it
    # 1.a Encode the prefix. Sessions reuse their document's cached strip, encoding in
    # position-aligned chunks (warm == cold, bitwise); one-off requests encode in one pass, as
    # generate does.
    if request.session is not None:
        # no prefix in this window is longer than a window (plus an instruction before it); one chunk
        # at a time, so that other requests' steps run in between (a cold prefix delays them a chunk)
        limit = max(len(request.prefix_ids), engine.window_tokens)
        cache, n_encoded = yield from in_pieces(
            engine, engine.caches.encode_steps(model, request.session, request.window, request.prefix_ids, limit=limit))
    else:
        with engine.lock, engine.no_autograd():
            cache, n_encoded = encode_prefix(model, request.prefix_ids)
    engine.last_encoded, engine.last_prefix_len = n_encoded, len(request.prefix_ids)
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
        elif s and remaining + s <= max(engine.canvas_length, 8 + s):
            slots, final = candidate_lengths(remaining), True  # unknown middle length: candidates
        elif s:
            slots, final = [engine.canvas_length], False  # long middle: plain blocks first
        else:
            slots, final = [engine.canvas_length], remaining <= engine.canvas_length
        head = request.suffix_head if final else []
        layout = infill_layout(cur_len, slots, head, engine.pad_id if engine.pad_id is not None else 0, model.device)
        # 1.b–c Denoise this block.
        block = yield from denoise_block(engine, cache, layout, request, stop_ids, middle, with_steps,
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
            with engine.lock, engine.no_autograd():
                encode_chunk(model, cache, take, cur_len)
            cur_len += len(take)
    text_ids = middle
    text = ""
    # Tokens per forward counts the answer and the token that ended it (EOS), not canvas slots the
    # answer drops.
    n_tokens = len(middle) + (1 if ended and len(middle) < request.max_new_tokens else 0)
    if engine.tokenizer is not None:
        text = engine.tokenizer.decode(text_ids, skip_special_tokens=True)
        if request.single_line and "\n" in text:
            text = text.split("\n", 1)[0]
            text_ids = engine.tokenizer.encode(text, add_special_tokens=False)
            n_tokens = len(text_ids) + 1  # the line, then the newline that ends it
    ms = (time.perf_counter() - t0) * 1000.0
    done = Done(text=text, ids=tuple(text_ids), steps=steps_total,
                tokens_per_forward=(n_tokens / steps_total) if steps_total else 0.0, ms=ms, length=chosen_len,
                scores=scores, encoded=n_encoded, prefix_tokens=len(request.prefix_ids))
    engine._remember(request, done)  # before the yield: a consumer may stop at the Done
    yield done


def in_pieces(engine: Engine, pieces):
    """Run a generator of model work one piece at a time, each under the lock, giving way (`PAUSE`) to
    the other requests' steps between pieces; its return value."""
    while True:
        with engine.lock, engine.no_autograd():
            try:
                next(pieces)
            except StopIteration as stop:
                return stop.value
        yield PAUSE


def denoise_block(engine: Engine, cache, layout: Layout, request: Request, stop_ids: set[int],
                  middle_so_far: list[int], with_steps: bool, step_offset: int, t0: float):
    """Steps 1.b–1.d for one canvas. Yields `Step`s; returns a `BlockResult`."""
    model = engine.model
    cfg = request.cfg
    generator = request.generator
    device = model.device
    b, width = layout.clamped.shape
    fixed = layout.any_fixed
    if fixed and engine.pad_id is not None:
        # A candidate row is [middle, <eos>, <pad> * k, suffix head]: pad only ever follows the end of
        # the middle, so a pad where no EOS was drawn shows that the middle ended there too. (Plain
        # canvases keep the reference's rule, EOS only, for token parity with generate.)
        stop_ids = stop_ids | {engine.pad_id}
    # Reference draws for plain canvases (token parity with generate), fast exact draws otherwise.
    draw = cfg.draw if cfg.draw != "auto" else ("inverse_cdf" if fixed else "multinomial")
    candidates = layout.candidates if fixed else None
    keep = (layout.clamped | ~layout.valid) if fixed else None
    batch_cache = cache
    if b > 1:
        hf.batch_repeat(batch_cache, b)  # the final block is this cache's last use
    with engine.lock:
        mask_mapping = hf.decoder_masks(model, batch_cache, b, width, layout.attention_mask)
    # 1.b Prepare the canvas.
    steps_remaining_start = cfg.max_denoising_steps
    if request.init_middle is not None:
        current_canvas = rewrite_start(engine, batch_cache, layout, request, mask_mapping)
        steps_remaining_start = max(1, round(request.strength * cfg.max_denoising_steps))
    else:
        current_canvas = sampler.initial_canvas(b, width, engine.vocab_size, cfg, generator, device)
    if fixed:
        current_canvas = torch.where(layout.clamped, layout.clamped_ids, current_canvas)
    self_conditioning_logits = None
    any_finished = False  # host copy of finished.any(), from the previous step's one sync
    forwards = 0  # decoder passes run, counting up; each runs every row, finished or not
    embeddings_dtype = hf.embedding_dtype(model)
    # Absorbing noise: token log-probabilities recorded as positions are unmasked (for the row choice).
    absorbing = cfg.noise == "mask"
    token_logp = torch.zeros((b, width), dtype=torch.float32, device=device) if absorbing else None
    line_ends = line_end_tokens(engine, stop_ids) if absorbing and request.single_line else None  # [V] bool
    state = step_fn.StepState(current_canvas=current_canvas, argmax_canvas=current_canvas,
                              finished=torch.zeros(b, dtype=torch.bool, device=device), history=None,
                              token_logp=token_logp)
    masks = step_fn.StepMasks(candidates=candidates, keep=keep,
                              clamped=layout.clamped if fixed else None,
                              clamped_ids=layout.clamped_ids if fixed else None,
                              middle=layout.middle if line_ends is not None else None, line_ends=line_ends)
    spec = step_fn.StepSpec(cfg=cfg, vocab_size=engine.vocab_size, draw=draw, fixed=fixed,
                            single_line=line_ends is not None)
    compiled = compiled_step(engine) if engine.settings.compile_step else None
    position_ids = layout.position_ids[:1] if not fixed else layout.position_ids
    # 1.c Denoising steps; steps_remaining counts down N..1 like the reference's cur_step.
    for steps_remaining in reversed(range(1, steps_remaining_start + 1)):
        forwards += 1
        # 1.c.i Decoder forward with self-conditioning: the scheduler runs it, in one pass with the
        # canvases of every other request of this step.
        processed_logits = yield Forward(  # [B, L, V]
            hf.BatchPart(batch_cache, state.current_canvas, position_ids, layout.attention_mask,
                         self_conditioning_logits), mask_mapping)
        with engine.lock, engine.no_autograd():
            # 1.c.ii Temperature, in place: the raw logits are not needed again.
            sampler.temperature_scale_(processed_logits, steps_remaining, cfg)
            if any_finished:
                # Finished rows keep last step's logits (the reference's where(), done in place and
                # before sampling: their draws are discarded, and draws do not depend on the values).
                torch.where(state.finished[:, None, None], self_conditioning_logits, processed_logits,
                            out=processed_logits)
            self_conditioning_logits = None  # the one [B, L, V] buffer beyond this step's logits
            was_masked = state.current_canvas == cfg.mask_token_id if absorbing else None  # [B, L]
            need = step_fn.need_mask(spec, state.current_canvas, candidates)
            if compiled is not None:
                noise = step_fn.draw_noise(spec, b, width, generator, device)
                vocab = compiled.vocab_pass(processed_logits, state.current_canvas, need, spec, noise)
                update = compiled.update
            else:
                vocab = step_fn.vocab_pass(processed_logits, state.current_canvas, need, spec, generator)
                update = step_fn.update
            # 1.c.iii Accept by entropy bound, renoise the rest; 1.c.iv stop test per row.
            noise_canvas = sampler.initial_canvas(b, width, engine.vocab_size, cfg, generator, device)
            out = update(spec, vocab, state, noise_canvas, was_masked, masks)
            state, accepted = out.state, out.accepted
            # 1.c.v Self-conditioning for the next step (no copy when the embeddings are float32).
            self_conditioning_logits = processed_logits.to(embeddings_dtype)
        # The step's one host sync, taken with every other request's. NaN/inf logits make NaN entropy:
        # raised here, before a garbage draft can be shown.
        nonfinite, any_finished, all_finished = yield Sync(out.flags)
        if nonfinite:
            raise sampler.NonFiniteLogits()
        if with_steps:
            step_no = step_offset + forwards
            yield step_event(engine, layout, state.current_canvas, state.argmax_canvas, accepted, processed_logits,
                             stop_ids, middle_so_far, step_no, step_offset + steps_remaining_start, t0,
                             request, state.token_logp, line_ends)
        del processed_logits
        if all_finished:
            break
    argmax_canvas, token_logp = state.argmax_canvas, state.token_logp
    # 1.d Choose the row.
    row, scores = choose_row(layout, argmax_canvas, self_conditioning_logits, stop_ids, token_logp, line_ends)
    row_ids = argmax_canvas[row, : layout.slot_lengths[row]].tolist()
    end, ended = middle_end(row_ids, stop_ids)
    return BlockResult(ids=row_ids[:end], ended=ended, forwards=forwards, row=row,
                        scores=tuple(scores))


def compiled_step(engine: Engine) -> step_fn.CompiledStep:
    """The torch.compile'd step functions (Settings.compile_step), built once per engine."""
    if engine._compiled is None:
        engine._compiled = step_fn.CompiledStep(engine.model.device)
    return engine._compiled


def line_end_tokens(engine: Engine, stop_ids: set[int]) -> torch.Tensor | None:
    """[V] bool: tokens that end a line (their text has a newline) or the middle (`stop_ids`).

    The newline part is built once per engine (one batch decode of the vocabulary) and kept with its
    other caches; the stop ids differ by layout, so they are added per call.
    """
    if engine.tokenizer is None:
        return None
    if engine._newline_tokens is None:
        n = min(engine.vocab_size, len(engine.tokenizer))
        texts = engine.tokenizer.batch_decode([[i] for i in range(n)])
        newline = torch.zeros(engine.vocab_size, dtype=torch.bool)
        newline[:n] = torch.tensor(["\n" in text for text in texts], dtype=torch.bool)
        engine._newline_tokens = newline.to(engine.model.device)
    table = engine._newline_tokens.clone()
    table[[i for i in stop_ids if 0 <= i < engine.vocab_size]] = True
    return table


def choose_row(layout: Layout, argmax_canvas, logits, stop_ids,
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
        ids = torch.where(layout.clamped, layout.clamped_ids, argmax_canvas)
        token_logp = sampler.chosen_log_probs(logits, ids)  # [B, L], in row chunks
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


def rewrite_start(engine: Engine, batch_cache, layout: Layout, request: Request, mask_mapping) -> torch.Tensor:
    """Starting canvas for a rewrite: the selection, then EOS and pad, with the least sure `strength` renoised."""
    model = engine.model
    cfg = request.cfg
    device = model.device
    width = layout.width
    slots = layout.slot_lengths[0]
    eos = min(engine.eos_ids) if engine.eos_ids else (engine.pad_id or 0)
    pad = engine.pad_id if engine.pad_id is not None else eos
    start = list(request.init_middle[:slots])
    if len(start) < slots:
        start = start + [eos] + [pad] * (slots - len(start) - 1)
    canvas = torch.tensor([start + [0] * (width - slots)], dtype=torch.long, device=device)
    canvas = torch.where(layout.clamped, layout.clamped_ids, canvas)
    n_sel = min(len(request.init_middle), slots)
    k = max(1, math.ceil(request.strength * n_sel))
    with engine.lock, engine.no_autograd():
        logits = hf.decoder_forward(model, batch_cache, canvas, layout.position_ids, mask_mapping)
        logp = sampler.chosen_log_probs(logits, canvas)  # [1, L], in row chunks
    # Least sure selection tokens first; the slack after the selection is always open to change.
    sure = logp[0, :n_sel]
    order = torch.argsort(sure)[:k]
    renoise_mask = torch.zeros((1, width), dtype=torch.bool, device=device)
    renoise_mask[0, order] = True
    renoise_mask[0, n_sel:slots] = True
    noise = sampler.initial_canvas(1, width, engine.vocab_size, cfg, request.generator, device)
    return torch.where(renoise_mask, noise, canvas)


def step_event(engine: Engine, layout: Layout, current_canvas, argmax_canvas, accepted, processed_logits, stop_ids,
               middle_so_far, index: int, total: int, t0: float, request: Request, token_logp=None,
               line_ends=None) -> Step:
    """A `Step` for people: the best-looking row's draft, each token with its state and confidence."""
    if argmax_canvas.shape[0] > 1:
        row, _ = choose_row(layout, argmax_canvas, processed_logits, stop_ids, token_logp, line_ends)
    else:
        row = 0
    m = layout.slot_lengths[row]
    row_ids = argmax_canvas[row, :m].tolist()
    end, _ = middle_end(row_ids, stop_ids)
    if token_logp is not None:  # absorbing noise: each token's probability when it was unmasked
        confidence = token_logp[row, :end].exp().tolist()
    else:
        confidence = sampler.top_probability(processed_logits[row, :end]).tolist()
    acc = accepted[row, :end].tolist()
    tokens: tuple[Token, ...] = ()
    text = ""
    if engine.tokenizer is not None:
        tokens = tuple(
            Token(text=engine.tokenizer.decode([t]), accepted=bool(a), confidence=float(c))
            for t, a, c in zip(row_ids[:end], acc, confidence)
        )
        text = engine.tokenizer.decode(middle_so_far + row_ids[:end], skip_special_tokens=True)
        if request.single_line and "\n" in text:
            text = text.split("\n", 1)[0]
    canvas = current_canvas[row][layout.valid[row]].tolist()
    return Step(index=index, total=total, text=text, tokens=tokens, ids=tuple(row_ids[:end]),
                ms=(time.perf_counter() - t0) * 1000.0, canvas=tuple(canvas))
