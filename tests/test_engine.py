"""The model core: parity with `model.generate`, masked-span conditioning, streaming, prefix cache, bad input."""

from __future__ import annotations

import pytest
import torch

from dg_edit import Done, Engine, SamplingConfig, Step
from dg_edit.canvas import candidate_lengths
from dg_edit.config import Settings
from dg_edit.extra import extra_chunk
from dg_edit.testing import tiny_model, tiny_pair


def reference_ids(model, prompt: torch.Tensor, max_new_tokens: int, seed: int, eos: int | None = None) -> list[int]:
    """What `model.generate` returns after `torch.manual_seed(seed)`: the new tokens, cut at EOS."""
    torch.manual_seed(seed)
    out = model.generate(prompt, max_new_tokens=max_new_tokens)
    new = out.sequences[0, prompt.shape[1]:prompt.shape[1] + max_new_tokens].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return new


@pytest.mark.parametrize(
    "canvas_length,prompt_len,max_new_tokens,seed",
    [(16, 5, 16, 0), (16, 40, 48, 1), (8, 3, 20, 2), (32, 70, 32, 3), (16, 100, 40, 4)],
)
def test_parity_with_generate(canvas_length, prompt_len, max_new_tokens, seed):
    """Empty suffix + same seed: token for token what DiffusionGemma's own generate returns.

    Prompts longer than the sliding window (32) and outputs spanning several canvases are included.
    """
    model = tiny_model(seed=seed, canvas_length=canvas_length, sliding_window=32)
    engine = Engine(model)
    prompt = torch.randint(3, 128, (1, prompt_len), generator=torch.Generator().manual_seed(100 + seed))
    expected = reference_ids(model, prompt, max_new_tokens, seed)
    got = engine.infill_ids(prompt[0].tolist(), max_new_tokens=max_new_tokens, seed=seed)
    assert list(got.ids) == expected
    assert got.steps > 0 and got.tokens_per_forward > 0


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_parity_with_eos(seed):
    """With an EOS id configured, generation stops at EOS exactly where generate pads."""
    model = tiny_model(seed=seed, canvas_length=8, vocab_size=16, eos_token_id=3, pad_token_id=0)
    model.generation_config.eos_token_id = 3
    model.generation_config.pad_token_id = 0
    engine = Engine(model)
    prompt = torch.randint(4, 16, (1, 6), generator=torch.Generator().manual_seed(seed))
    expected = reference_ids(model, prompt, 64, seed, eos=3)
    got = engine.infill_ids(prompt[0].tolist(), max_new_tokens=64, seed=seed)
    assert list(got.ids) == expected
    assert 3 not in got.ids


def test_parity_at_realistic_vocabulary():
    """A float32 temperature and the reference's random calls matter once the vocabulary is large."""
    model = tiny_model(seed=12, canvas_length=32, vocab_size=8192, hidden_size=64, head_dim=32, global_head_dim=32)
    engine = Engine(model)
    prompt = torch.randint(3, 8192, (1, 300), generator=torch.Generator().manual_seed(12))
    assert list(engine.infill_ids(prompt[0].tolist(), max_new_tokens=64, seed=12).ids) == \
        reference_ids(model, prompt, 64, 12)


def test_parity_with_custom_sampling():
    model = tiny_model(seed=3, canvas_length=16)
    engine = Engine(model)
    prompt = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_denoising_steps=10, t_min=0.2, t_max=1.0)
    torch.manual_seed(11)
    out = model.generate(prompt, max_new_tokens=16, **kwargs)
    got = engine.infill_ids(prompt[0].tolist(), max_new_tokens=16, seed=11, **kwargs)
    assert list(got.ids) == out.sequences[0, 9:].tolist()
    assert got.steps <= 10


def test_seed_means_manual_seed_then_run():
    """seed=s equals a run started right after torch.manual_seed(s) with no seed argument."""
    model = tiny_model(seed=1, canvas_length=16)
    engine = Engine(model)
    a = engine.infill_ids([5, 6, 7], max_new_tokens=16, seed=42)
    torch.manual_seed(42)
    b = engine.infill_ids([5, 6, 7], max_new_tokens=16)
    assert a.ids == b.ids
    c = engine.infill_ids([5, 6, 7], max_new_tokens=16, seed=43)
    assert c.ids != a.ids


def test_clamped_suffix_untouched_every_step():
    """The suffix head sits in the canvas after the middle slots and never changes, at any step."""
    model, tok = tiny_pair(seed=2, canvas_length=64)
    engine = Engine(model, tok)
    suffix = "\n    return total\n\nprint(add(1, 2))\n"
    head = tok.encode(suffix, add_special_tokens=False)[: engine.settings.suffix_head_tokens]
    events = list(engine.stream("def add(a, b):\n    total = ", suffix, max_new_tokens=24, seed=3))
    steps = [e for e in events if isinstance(e, Step)]
    assert steps and isinstance(events[-1], Done)
    for step in steps:
        # The shown row: middle slots then the clamped head, verbatim.
        assert list(step.canvas[-len(head):]) == head
    assert suffix not in events[-1].text


def test_candidate_lengths_run_as_one_batch_and_pick_one():
    model, tok = tiny_pair(seed=4, canvas_length=64)
    engine = Engine(model, tok)
    r = engine.infill("x = [", "]\nprint(x)\n", max_new_tokens=32, seed=1)
    assert r.length in (8, 16, 32)
    assert len(r.scores) == 3  # every candidate length was scored
    assert len(r.ids) <= r.length


def test_stream_done_equals_infill():
    model, tok = tiny_pair(seed=5, canvas_length=32)
    engine = Engine(model, tok)
    args = ("def f(x):\n    return ", "\n")
    events = list(engine.stream(*args, max_new_tokens=16, seed=9))
    done = engine.infill(*args, max_new_tokens=16, seed=9)
    assert events[-1] == done
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    assert all(0.0 <= t.confidence <= 1.0 for s in steps for t in s.tokens)


def test_stream_stops_when_consumer_stops():
    model, tok = tiny_pair(seed=5, canvas_length=32)
    engine = Engine(model, tok)
    calls = []
    original = model.forward

    def counting_forward(*a, **k):
        calls.append(1)
        return original(*a, **k)

    model.forward = counting_forward
    stream = engine.stream("import os\n", "", max_new_tokens=16, seed=1, max_denoising_steps=20)
    next(stream)
    next(stream)
    stream.close()
    assert len(calls) == 2  # no step ran after the consumer stopped


def test_single_line_stops_at_end_of_line():
    model, tok = tiny_pair(seed=6, canvas_length=64)
    engine = Engine(model, tok)
    cut = 0
    for seed in range(4):
        r = engine.infill("x = compute(", "\ny = 2\n", max_new_tokens=32, seed=seed)
        assert "\n" not in r.text
        raw = engine.infill("x = compute(", "\ny = 2\n", max_new_tokens=32, seed=seed, single_line=False)
        if "\n" in raw.text:  # the line was cut: tokens per forward counts the line and its newline only
            cut += 1
            assert r.tokens_per_forward * r.steps == pytest.approx(len(r.ids) + 1)
    assert cut  # the random model runs past the line end for some seed, so the count above was checked


def test_a_pad_in_a_candidate_row_ends_the_middle():
    # Infill rows are [middle, <eos>, <pad> * k, suffix head]: a pad drawn before any EOS still marks the end.
    model, tok = tiny_pair(seed=6, canvas_length=64)
    pad = Engine(model, tok).pad_id

    def pad_at_slot_5(module, args, output):
        output.logits[:, 5, :] = -1e4
        output.logits[:, 5, pad] = 1e4  # the canvas says: the middle is over at slot 5
        return output

    handle = model.register_forward_hook(pad_at_slot_5)
    try:
        engine = Engine(model, tok)
        for seed in range(3):
            r = engine.infill("x = compute(", "\ny = 2\n", lengths=[16], single_line=False, seed=seed)
            assert pad not in r.ids and len(r.ids) <= 5
    finally:
        handle.remove()


def test_mask_noise_single_line_stops_once_the_line_is_unmasked_through_its_end():
    # Unmasked tokens are final and the answer is cut at the line end: once "a\n" is unmasked, stop.
    model, tok = tiny_pair(seed=6, canvas_length=64)
    a, newline = tok.encode("a", add_special_tokens=False), tok.encode("\n", add_special_tokens=False)
    assert len(a) == 1 and len(newline) == 1

    def sure_of_a_newline(module, args, output):
        output.logits[:] = 0.0  # uniform everywhere: one unsure slot accepted per step
        output.logits[:, 0, a[0]] = 1e4
        output.logits[:, 1, newline[0]] = 1e4
        return output

    handle = model.register_forward_hook(sure_of_a_newline)
    try:
        engine = Engine(model, tok, sampling=SamplingConfig(noise="mask", mask_token_id=3))
        options = dict(seed=0, max_denoising_steps=12, entropy_bound=2.0)
        line = engine.infill("x = compute(", "\ny = 2\n", single_line=True, **options)
        block = engine.infill("x = compute(", "\ny = 2\n", single_line=False, max_new_tokens=32, **options)
    finally:
        handle.remove()
    assert line.text == "a" and line.steps == 1
    assert block.steps == 12  # the same canvas, asked for more than one line, runs every step


def test_mask_noise_single_line_rows_are_scored_on_their_line_only():
    # Row 0 is sure of its line "a" and unsure of what follows it; row 1 is fairly sure of "b", then EOS.
    # Only the line is kept, so only the line counts: "a" wins although row 1's whole middle is surer.
    model, tok = tiny_pair(seed=6, canvas_length=64)
    [a], [b], [newline] = (tok.encode(t, add_special_tokens=False) for t in ("a", "b", "\n"))
    eos = 1

    def rows(module, args, output):
        logits = output.logits  # [3 rows: 8, 16 and 32 slots, L, V]
        logits[:] = 0.0
        logits[0, 0, a] = logits[0, 1, newline] = 1e4
        logits[1, 0, b] = logits[1, 1, newline] = 6.0
        logits[1, 2, eos] = 1e4
        logits[2, 0, eos] = 1e4  # an empty middle never wins
        return output

    handle = model.register_forward_hook(rows)
    try:
        engine = Engine(model, tok, sampling=SamplingConfig(noise="mask", mask_token_id=3))
        got = [engine.infill("x = compute(", "\ny = 2\n", single_line=True, seed=seed, max_denoising_steps=4,
                             entropy_bound=2.0) for seed in range(3)]
    finally:
        handle.remove()
    assert [r.text for r in got] == ["a"] * 3 and all(r.length == 8 for r in got)


def test_single_line_budget_bounds_the_canvas_but_not_multi_line_requests():
    model, tok = tiny_pair(seed=6, canvas_length=64)
    engine = Engine(model, tok, settings=Settings(single_line_tokens=16))
    for seed in range(3):
        line = engine.infill("x = compute(", "\ny = 2\n", max_new_tokens=48, seed=seed)
        assert line.length <= 16 and len(line.ids) <= 16
        assert len(line.scores) == len(candidate_lengths(16))  # one row per candidate length
    # an empty current line asks for a block: every candidate length up to max_new_tokens is tried
    block = engine.infill("x = 1\n", "\ny = 2\n", max_new_tokens=48, seed=0)
    assert len(block.scores) == len(candidate_lengths(48)) and block.length in candidate_lengths(48)


def test_prefix_cache_identical_results_and_reencodes_only_the_tail():
    model, tok = tiny_pair(seed=7, canvas_length=32, sliding_window=32)
    engine = Engine(model, tok)
    base = "".join(f"value_{i} = compute({i}, 'x')\n" for i in range(60))
    cold = Engine(model, tok)  # "without the cache": a fresh engine, so a cold session
    engine.infill(base, "\n", max_new_tokens=8, seed=1, session="doc")
    first_len = engine.last_prefix_len
    typed = base + "result = val"
    warm = engine.infill(typed, "\n", max_new_tokens=8, seed=2, session="doc")
    assert engine.last_encoded < 0.1 * engine.last_prefix_len
    assert engine.last_prefix_len > first_len
    reference = cold.infill(typed, "\n", max_new_tokens=8, seed=2, session="doc")
    assert cold.last_encoded == cold.last_prefix_len
    assert warm == reference
    # Editing earlier in the file (not just appending) still gives the uncached answer.
    edited = typed.replace("value_50", "renamed_50")
    warm2 = engine.infill(edited, "\n", max_new_tokens=8, seed=3, session="doc")
    assert warm2 == Engine(model, tok).infill(edited, "\n", max_new_tokens=8, seed=3, session="doc")


def test_extra_chunks_go_ahead_of_the_prefix_within_their_budget():
    model, tok = tiny_pair(seed=7, canvas_length=32)
    chunk_ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    chunks = [extra_chunk(f"def helper_{i}(x):\n    return x * {i}\n", f"lib/h{i}.py") for i in range(3)]
    sizes = [len(chunk_ids(c)) for c in chunks]
    # A budget for the last two chunks only: whole chunks, the last ones kept, in their order.
    engine = Engine(model, tok, settings=Settings(max_extra_tokens=sizes[1] + sizes[2] + 1))
    engine.infill("x = ", "\n", max_new_tokens=4, seed=0)
    alone = engine.last_prefix_len
    engine.infill("x = ", "\n", max_new_tokens=4, seed=0, extra=chunks)
    assert engine.last_prefix_len == alone + sizes[1] + sizes[2]
    # Chunks alone condition an infill (llama.vim's warm-up requests send nothing else).
    assert isinstance(engine.infill("", "", max_new_tokens=2, seed=0, extra=chunks).text, str)
    # Without a budget, chunks change nothing at all.
    off = Engine(model, tok, settings=Settings(max_extra_tokens=0))
    assert off.infill("x = ", "\n", max_new_tokens=4, seed=3, extra=chunks) == \
        off.infill("x = ", "\n", max_new_tokens=4, seed=3)
    # The chunks condition the answer: the same seed with and without them differs somewhere.
    with_extra = [engine.infill("x = ", "\n", max_new_tokens=8, seed=s, extra=chunks).ids for s in range(4)]
    without = [engine.infill("x = ", "\n", max_new_tokens=8, seed=s).ids for s in range(4)]
    assert with_extra != without


def test_unchanged_extra_chunks_are_reused_from_the_prefix_cache():
    """llama.vim sends the same ring of chunks on every keystroke: only the typed tail is encoded again."""
    model, tok = tiny_pair(seed=7, canvas_length=32, sliding_window=32)
    engine = Engine(model, tok)
    chunks = [extra_chunk("".join(f"CONST_{i} = {i}\n" for i in range(40)), "consts.py")]
    base = "".join(f"value_{i} = compute({i})\n" for i in range(10))
    engine.infill(base, "\n", max_new_tokens=8, seed=1, session="doc", extra=chunks)
    typed = base + "result = val"
    warm = engine.infill(typed, "\n", max_new_tokens=8, seed=2, session="doc", extra=chunks)
    assert engine.last_encoded < 0.3 * engine.last_prefix_len
    assert warm == Engine(model, tok).infill(typed, "\n", max_new_tokens=8, seed=2, session="doc", extra=chunks)
    # A changed chunk is encoded again (and the answer is the uncached one).
    changed = [chunks[0].replace("CONST_3 ", "RENAMED_3 ")]
    again = engine.infill(typed, "\n", max_new_tokens=8, seed=2, session="doc", extra=changed)
    assert engine.last_encoded > 0.5 * engine.last_prefix_len
    assert again == Engine(model, tok).infill(typed, "\n", max_new_tokens=8, seed=2, session="doc", extra=changed)


def test_long_prefix_is_windowed_on_the_left():
    model, tok = tiny_pair(seed=8, canvas_length=32)
    engine = Engine(model, tok)
    prefix = "a = 1\n" * 5000
    r = engine.infill(prefix, "\n", max_new_tokens=8, seed=1)
    assert engine.last_prefix_len <= engine.settings.max_prefix_tokens
    assert isinstance(r.text, str)


def test_rewrite_strength_zero_is_identity_and_bounded():
    model, tok = tiny_pair(seed=9, canvas_length=64)
    engine = Engine(model, tok)
    selection = "    total = a + b\n"
    same = engine.rewrite("def add(a, b):\n", selection, "    return total\n", strength=0.0)
    assert same.text == selection and same.steps == 0
    n_sel = len(tok.encode(selection, add_special_tokens=False))
    changed = engine.rewrite("def add(a, b):\n", selection, "    return total\n", strength=0.8, seed=2,
                             instruction="use sum")
    assert changed.steps > 0
    assert len(changed.ids) <= n_sel + max(4, n_sel // 4)


def test_mask_noise_option():
    model, tok = tiny_pair(seed=10, canvas_length=32)
    engine = Engine(model, tok, sampling=SamplingConfig(noise="mask", mask_token_id=3))
    events = list(engine.stream("def f():\n", "", max_new_tokens=16, seed=1, max_denoising_steps=6))
    first = next(e for e in events if isinstance(e, Step))
    # After the first step, what was not accepted is <mask> again.
    assert 3 in first.canvas
    assert isinstance(events[-1], Done)


def test_mask_noise_never_changes_an_unmasked_token():
    # Absorbing noise: the model is trained on <mask> positions only, so a token, once unmasked, is final.
    model, tok = tiny_pair(seed=10, canvas_length=32)
    engine = Engine(model, tok, sampling=SamplingConfig(noise="mask", mask_token_id=3))
    for seed in range(3):
        events = list(engine.stream("def f():\n", "", max_new_tokens=32, seed=seed, max_denoising_steps=8,
                                    entropy_bound=2.0))
        steps = [e for e in events if isinstance(e, Step)]
        assert len(steps) >= 3
        for before, after in zip(steps, steps[1:]):
            visible = [i for i, t in enumerate(before.canvas) if t != 3]
            assert visible and all(after.canvas[i] == before.canvas[i] for i in visible)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda e: e.infill("", ""), "both empty"),
        (lambda e: e.infill("x", max_new_tokens=0), "max_new_tokens"),
        (lambda e: e.infill("x", max_new_tokens=-3), "max_new_tokens"),
        (lambda e: e.infill("x", max_new_tokens=10 ** 9), "at most"),
        (lambda e: e.infill("x", seed=2 ** 70), "seed"),
        (lambda e: e.infill("x", seed=-1), "seed"),
        (lambda e: e.infill("x", temperature=0.5), "unknown sampling option"),
        (lambda e: e.infill("x", max_denoising_steps=0), "max_denoising_steps"),
        (lambda e: e.infill(b"bytes"), "must be text"),
        (lambda e: e.infill("bad \udc80 surrogate"), "not valid UTF-8"),
        (lambda e: e.infill_ids([]), "empty"),
        (lambda e: e.infill_ids([10 ** 9]), "token ids"),
        (lambda e: e.rewrite("a", "b", "c", strength=2), "strength"),
        (lambda e: e.infill("x", extra="one chunk, not a list"), "extra must be a list"),
        (lambda e: e.infill("x", extra=[b"bytes"]), "extra must be a list"),
        (lambda e: e.rewrite("a", "b", "c", extra=["bad \udc80"]), "extra\\[0\\] is not valid UTF-8"),
    ],
)
def test_bad_input_gets_clear_value_error(call, message):
    model, tok = tiny_pair(seed=11, canvas_length=16)
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match=message):
        call(engine)


def test_load_reports_missing_files(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        Engine.load(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Engine.load(str(tmp_path))
    engine = Engine.load(str(tiny_model_dir))
    assert engine.info()["canvas_length"] == 16
    assert engine.sampling.max_denoising_steps == 8  # from the model's dg_edit.json


def test_inverse_cdf_draws_follow_the_distribution():
    """The fast draw samples the same categorical as torch.multinomial (checked by frequencies)."""
    from dg_edit.step import StepSpec, vocab_pass

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).clamp(min=1e-12))
    batch = logits.expand(1, 20000, 5).contiguous()  # [B, L, V]
    spec = StepSpec(cfg=SamplingConfig(), vocab_size=5, draw="inverse_cdf", fixed=True, single_line=False)
    drawn = vocab_pass(batch, torch.zeros((1, 20000), dtype=torch.long), None, spec,
                       torch.Generator().manual_seed(0)).denoiser_canvas
    freq = torch.bincount(drawn.flatten(), minlength=5).float() / drawn.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01)
    assert int(drawn.max()) <= 3  # a zero-probability token is never drawn


def test_done_counts_every_decoder_pass_the_request_ran():
    # Candidate rows stop independently, but each pass runs the whole batch: the request's cost (and
    # its tokens per forward) is the passes the batch ran, which is also how many drafts were shown.
    model, tok = tiny_pair(seed=6, canvas_length=64)
    a, newline = tok.encode("a", add_special_tokens=False), tok.encode("\n", add_special_tokens=False)

    def only_the_first_row_is_sure(module, args, output):
        output.logits[:] = 0.0  # uniform: one unsure slot accepted per step
        output.logits[0, 0, a[0]] = 1e4  # row 0 is decided ("a\n") at its first pass, and wins
        output.logits[0, 1, newline[0]] = 1e4
        return output

    handle = model.register_forward_hook(only_the_first_row_is_sure)
    try:
        engine = Engine(model, tok, sampling=SamplingConfig(noise="mask", mask_token_id=3))
        events = list(engine.stream("x = compute(", "\ny = 2\n", seed=0, single_line=True,
                                    max_denoising_steps=8, entropy_bound=2.0))
    finally:
        handle.remove()
    done, steps = events[-1], events[:-1]
    assert done.text == "a" and len(steps) > 1  # the other rows went on after row 0 was decided
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    assert done.steps == len(steps)
    assert done.tokens_per_forward == pytest.approx(2 / len(steps))  # "a" and its newline
