"""Sampler functions that the parity tests do not reach: the absorbing-noise (`noise="mask"`) additions."""

from __future__ import annotations

import torch

from dg_edit import sampler

MASK = 3


def test_carry_over_unmasked_keeps_visible_tokens_with_zero_entropy():
    current_canvas = torch.tensor([[7, MASK, 9, MASK]])  # [B, L]
    denoiser_canvas = torch.tensor([[1, 2, 1, 4]])
    argmax_canvas = torch.tensor([[5, 6, 5, 8]])
    entropy = torch.tensor([[0.7, 0.2, 0.9, 1.5]])
    denoised, argmax, ent = sampler.carry_over_unmasked(current_canvas, denoiser_canvas, argmax_canvas, entropy, MASK)
    assert denoised.tolist() == [[7, 2, 9, 4]]
    assert argmax.tolist() == [[7, 6, 9, 8]]
    assert torch.equal(ent, torch.tensor([[0.0, 0.2, 0.0, 1.5]]))


def test_commit_logp_records_masked_positions_only():
    vocab = 10
    logits = torch.randn(1, 4, vocab, generator=torch.Generator().manual_seed(0))  # [B, L, V]
    logp = logits.log_softmax(-1)
    before = torch.tensor([[-0.5, -0.25, 0.0, 0.0]])
    was_masked = torch.tensor([[False, False, True, True]])
    accepted = torch.tensor([[True, True, True, False]])
    denoiser_canvas = torch.tensor([[1, 2, 3, 4]])
    argmax_canvas = torch.tensor([[5, 6, 7, 8]])
    out = sampler.commit_logp(before, logp, was_masked, accepted, denoiser_canvas, argmax_canvas)
    # visible positions keep what was recorded when they were unmasked
    assert out[0, :2].tolist() == [-0.5, -0.25]
    # accepted this step: the denoiser's token; still masked: the argmax draft's
    assert torch.isclose(out[0, 2], logp[0, 2, 3]) and torch.isclose(out[0, 3], logp[0, 3, 8])
