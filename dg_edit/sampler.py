"""DiffusionGemma's sampler as plain functions over tensors.

Mirrors `transformers/models/diffusion_gemma/generation_diffusion_gemma.py` step 1.c (ii–iv) with the
same random calls in the same order, so that an unclamped single-row canvas reproduces
`model.generate` token for token. Additions for editing, all no-ops when unused:
- `clamped` positions (the suffix head) are never accepted from the denoiser, never renoised and
  never count towards the entropy budget;
- `valid` is False at batch padding (candidate canvases of different lengths share one batch);
- with absorbing noise (`noise="mask"`), unmasked tokens are carried over and only masked positions
  are sampled (the vocabulary-wide draw itself is `dg_edit.step.vocab_pass`).

Vocabulary: `current_canvas` is what the decoder reads this step; `denoiser_canvas` is sampled from
its logits; `accepted` marks positions taken from the denoiser; `argmax_canvas` is the draft shown to
people and, at the end, the result. Step counters run DOWN: `steps_remaining` is N at the first
step and 1 at the last, as `cur_step` in the reference.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig


class NonFiniteLogits(FloatingPointError):
    """The model's logits contain NaN or inf: a model failure, never the user's input."""

    def __init__(self, message: str = "the model produced non-finite logits (NaN or inf); the request was "
                                      "stopped: the model's weights or numerics are broken"):
        super().__init__(message)


def initial_canvas(
    batch_size: int, length: int, vocab_size: int, cfg: SamplingConfig, generator: torch.Generator | None, device
) -> torch.Tensor:
    """x_T: uniform over the vocabulary (the reference's `initialize_canvas`) or all `<mask>`.  # [B, L]"""
    if cfg.noise == "mask":
        return torch.full((batch_size, length), cfg.mask_token_id, dtype=torch.long, device=device)
    return torch.randint(0, vocab_size, (batch_size, length), device=device, generator=generator)


def temperature_scale_(logits: torch.Tensor, steps_remaining: int, cfg: SamplingConfig) -> torch.Tensor:
    """Linear schedule t_max (first step) → t_min (last step), in place: no second [B, L, V] buffer.

    The step counter is a 0-d int32 tensor as in the reference, so the temperature is computed in
    float32 exactly as there (a float64 temperature flips rare multinomial draws).  logits: [B, L, V]
    """
    steps = torch.tensor(steps_remaining, dtype=torch.int32, device=logits.device)
    temperature = cfg.t_min + ((cfg.t_max - cfg.t_min) * (steps / cfg.max_denoising_steps))
    return logits.div_(temperature)


CHUNK_ROWS = 64  # rows of [*, V] processed at once by the helpers below (64 MiB at V = 262,144)


def chosen_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] per position, a chunk of rows at a time.  [B, L, V], [B, L] -> [B, L] float32"""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_ids = ids.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], CHUNK_ROWS):
        rows = torch.log_softmax(flat[start:start + CHUNK_ROWS].float(), dim=-1)
        out[start:start + CHUNK_ROWS] = rows.gather(-1, flat_ids[start:start + CHUNK_ROWS]).squeeze(-1)
    return out.view(ids.shape)


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """max softmax(logits) per row, a chunk of rows at a time.  [N, V] -> [N] float32"""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        rows = logits[start:start + CHUNK_ROWS].float()
        # max p = exp(max - logsumexp): no [N, V] probabilities
        out[start:start + CHUNK_ROWS] = (rows.max(dim=-1).values - rows.logsumexp(dim=-1)).exp()
    return out


def token_entropy_and_log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of each position's categorical, computed exactly as the reference, and the normalized
    log-probabilities the same computation makes on the way (absorbing noise records them).

    [B, L, V] -> ([B, L], [B, L, V])
    """
    dist = torch.distributions.Categorical(logits=logits, validate_args=False)
    return dist.entropy(), dist.logits


def commit_logp(
    token_logp: torch.Tensor,  # [B, L] float32: log-probability of each position's token when it was unmasked
    was_masked: torch.Tensor,  # [B, L] bool: <mask> in the canvas the decoder read this step
    accepted: torch.Tensor,  # [B, L] bool
    denoiser_logp: torch.Tensor,  # [B, L] log-probability of this step's denoiser token
    argmax_logp: torch.Tensor,  # [B, L] log-probability of this step's argmax token
) -> torch.Tensor:
    """Absorbing noise: record, for every position still masked, the log-probability of the token it gets.

    Accepted positions get their denoiser token's, the rest their argmax draft's (overwritten later
    if they are still masked). Visible positions keep the value recorded when they were unmasked: the
    model's output there is untrained, so candidate rows are compared on these figures instead.  [B, L]
    """
    return torch.where(was_masked, torch.where(accepted, denoiser_logp, argmax_logp), token_logp)


def line_decided(
    current_canvas: torch.Tensor,  # [B, L]
    ends_line: torch.Tensor,  # [V] bool: tokens that end a line (a newline in their text, EOS, pad)
    mask_token_id: int,
    middle: torch.Tensor,  # [B, L] bool: middle slots
) -> torch.Tensor:
    """Absorbing noise, single-line requests: is each row's answer already fixed?  [B] bool

    Unmasked tokens are final, and a single-line answer is cut at its first line end. So once every
    slot up to and including the first line-ending token is unmasked, no later step can change the
    answer, and denoising the rest of the row (the lines after it) is wasted work.
    """
    visible = (current_canvas != mask_token_id) & middle  # [B, L]
    prefix_visible = visible.long().cumprod(dim=-1).bool()  # [B, L]: slots 0..i all unmasked
    return (ends_line[current_canvas] & prefix_visible).any(dim=-1)


def entropy_bound_accept(
    current_canvas: torch.Tensor,  # [B, L]
    denoiser_canvas: torch.Tensor,  # [B, L]
    entropy: torch.Tensor,  # [B, L] token entropy of the processed logits
    entropy_bound: float,
    candidates: torch.Tensor | None = None,  # [B, L] bool: positions the sampler may accept (not clamped, not pad)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the lowest-entropy tokens while sum(H) - max(H) <= entropy_bound.

    Returns `(accepted_canvas, accepted)`: the canvas with accepted positions taken from the denoiser,
    and the boolean mask of those positions.  [B, L], [B, L]
    """
    if candidates is not None:
        entropy = entropy.masked_fill(~candidates, float("inf"))  # sorts last, never accepted (inf - inf = nan)
    sorted_entropy, sorted_indices = torch.sort(entropy, dim=-1, descending=False)
    cumulative_entropy = torch.cumsum(sorted_entropy, dim=-1)
    sorted_selection = cumulative_entropy - sorted_entropy <= entropy_bound
    accepted = torch.scatter(
        input=torch.zeros_like(sorted_selection), dim=-1, index=sorted_indices, src=sorted_selection
    )
    if candidates is not None:
        accepted = accepted & candidates
    accepted_canvas = torch.where(accepted, denoiser_canvas, current_canvas)
    return accepted_canvas, accepted


def renoise(
    accepted_canvas: torch.Tensor,  # [B, L]
    accepted: torch.Tensor,  # [B, L]
    vocab_size: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    keep: torch.Tensor | None = None,  # [B, L] bool: positions that are never renoised (clamped, pad)
) -> torch.Tensor:
    """x_{t-1}: every position not accepted this step goes back to noise.  [B, L]"""
    renoise_mask = ~accepted
    if keep is not None:
        renoise_mask = renoise_mask & ~keep
    noise_canvas = initial_canvas(
        accepted_canvas.shape[0], accepted_canvas.shape[1], vocab_size, cfg, generator, accepted_canvas.device
    )
    return torch.where(renoise_mask, noise_canvas, accepted_canvas)


def stable_and_confident(
    history: torch.Tensor | None,  # [K, B, L] argmax canvases of the last K steps, or None at the first step
    argmax_canvas: torch.Tensor,  # [B, L]
    entropy: torch.Tensor,  # [B, L] token entropy of the processed logits (rows already stopped: any value)
    cfg: SamplingConfig,
    valid: torch.Tensor | None = None,  # [B, L] bool: positions whose entropy counts
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stop when the argmax canvas is unchanged for `stability_threshold` steps and mean entropy is low.

    Returns `(stop, history)`: [B] bool and the rolled history to pass back next step.
    """
    if cfg.stability_threshold == 0:
        stable = torch.ones(argmax_canvas.shape[0], device=argmax_canvas.device, dtype=torch.bool)
    else:
        if history is None:
            history = torch.full(
                (cfg.stability_threshold, *argmax_canvas.shape), -1, dtype=argmax_canvas.dtype,
                device=argmax_canvas.device,
            )
        stable = (history == argmax_canvas[None, :, :]).all(dim=-1).all(dim=0)
        history = torch.roll(history, shifts=-1, dims=0)
        history[-1] = argmax_canvas
    if valid is None:
        mean_entropy = torch.mean(entropy, dim=-1)
    else:
        mean_entropy = (entropy * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    confident = mean_entropy < cfg.confidence_threshold
    return stable & confident, history
