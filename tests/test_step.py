"""The step's tensor work (dg_edit/step.py): chunked, exact, and the same compiled as eager."""

from __future__ import annotations

import pytest
import torch

from dg_edit import Engine, step
from dg_edit.config import SamplingConfig, Settings
from dg_edit.testing import tiny_pair


def test_multinomial_is_argmax_of_probs_over_exponential_draws_drawn_in_any_row_chunks():
    """What makes the chunked reference draw exact: torch draws one Exp(1) per element, in order."""
    probs = torch.softmax(torch.randn(40, 3000) * 3, dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    g = torch.Generator().manual_seed(3)
    q = torch.cat([torch.empty(n, 3000).exponential_(generator=g) for n in (7, 13, 20)])
    assert torch.equal((probs / q).argmax(-1), expected)


@pytest.mark.parametrize("noise, draw, fixed", [("uniform", "multinomial", False), ("uniform", "inverse_cdf", True),
                                                ("mask", "inverse_cdf", True)])
def test_the_vocabulary_pass_in_row_chunks_equals_one_pass(noise, draw, fixed):
    b, width, vocab = 3, 11, 500
    cfg = SamplingConfig(noise=noise, mask_token_id=3 if noise == "mask" else None)
    logits = torch.randn(b, width, vocab) * 2
    canvas = torch.randint(4, vocab, (b, width))
    if noise == "mask":
        canvas[:, ::2] = 3
    candidates = torch.ones(b, width, dtype=torch.bool)
    candidates[:, -3:] = False
    results = []
    for chunk in (0, 4, 5):
        spec = step.StepSpec(cfg=cfg, vocab_size=vocab, draw=draw, fixed=fixed, single_line=False, chunk_rows=chunk)
        need = step.need_mask(spec, canvas, candidates if fixed else None)
        results.append(step.vocab_pass(logits.clone(), canvas, need, spec, torch.Generator().manual_seed(1)))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.timeout(900)
def test_compiled_and_eager_steps_give_the_same_tokens():
    model, tokenizer = tiny_pair(seed=4, canvas_length=16)
    eager = Engine(model, tokenizer)
    compiled = Engine(model, tokenizer, settings=Settings(compile_step=True))
    prefix = "def add(a, b):\n    return "
    for suffix, kwargs in (("", {}), ("\n\nprint(add(1, 2))\n", {}), ("\n", {"max_new_tokens": 8})):
        a = eager.infill(prefix, suffix, seed=5, max_denoising_steps=6, **kwargs)
        c = compiled.infill(prefix, suffix, seed=5, max_denoising_steps=6, **kwargs)
        assert a.ids == c.ids and a.steps == c.steps
