"""Sampler and step functions that the parity tests do not reach: the absorbing-noise (`noise="mask"`) additions."""

from __future__ import annotations

import torch

from dg_edit import sampler, step
from dg_edit.config import SamplingConfig

MASK = 3


def test_the_masked_vocabulary_pass_fills_masks_only_and_keeps_visible_tokens_with_zero_entropy():
    vocab = 10
    logits = torch.randn(1, 4, vocab, generator=torch.Generator().manual_seed(0))  # [B, L, V]
    logits[0, 1, 6] = 50.0  # position 1 is sure of token 6
    current_canvas = torch.tensor([[7, MASK, MASK, MASK]])  # [B, L]
    need = torch.tensor([[False, True, True, False]])  # position 3: masked but clamped or pad
    for draw in ("inverse_cdf", "multinomial"):
        spec = step.StepSpec(cfg=SamplingConfig(noise="mask", mask_token_id=MASK), vocab_size=vocab, draw=draw,
                             fixed=True, single_line=False)
        denoised, argmax, ent, denoiser_logp, argmax_logp = step.vocab_pass(
            logits.clone(), current_canvas, need, spec, torch.Generator().manual_seed(1))
        logp = logits.log_softmax(-1)
        # outside `need` nothing changes and nothing is computed
        assert denoised[0, [0, 3]].tolist() == [7, MASK] and argmax[0, [0, 3]].tolist() == [7, MASK]
        assert ent[0, [0, 3]].tolist() == [0.0, 0.0] and argmax_logp[0, [0, 3]].tolist() == [0.0, 0.0]
        # inside: the reference's argmax, entropy and log-probabilities at those positions
        assert argmax[0, 1:3].tolist() == logits[0, 1:3].argmax(-1).tolist() and denoised[0, 1] == 6
        expected_entropy = torch.distributions.Categorical(logits=logits[0, 1:3]).entropy()
        assert torch.allclose(ent[0, 1:3], expected_entropy, atol=1e-5)
        assert torch.allclose(argmax_logp[0, 1:3], logp[0, 1:3].max(-1).values, atol=1e-5)
        assert torch.isclose(denoiser_logp[0, 2], logp[0, 2, denoised[0, 2]], atol=1e-5)


def test_commit_logp_records_masked_positions_only():
    before = torch.tensor([[-0.5, -0.25, 0.0, 0.0]])
    was_masked = torch.tensor([[False, False, True, True]])
    accepted = torch.tensor([[True, True, True, False]])
    denoiser_logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    argmax_logp = torch.tensor([[-0.1, -0.2, -0.3, -0.4]])
    out = sampler.commit_logp(before, was_masked, accepted, denoiser_logp, argmax_logp)
    # visible positions keep what was recorded when they were unmasked;
    # accepted this step: the denoiser's token; still masked: the argmax draft's
    assert torch.equal(out, torch.tensor([[-0.5, -0.25, -3.0, -0.4]]))
