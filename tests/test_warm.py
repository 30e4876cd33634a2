"""Warm everywhere: per-document encoder caches, idle prefill and typed-ahead, against the engine API.

The property under test everywhere: a warm answer (an engine that has seen the document before,
prefilled it, or served other cursors in it) equals the cold answer (a fresh engine) bitwise, for
the same seed. Small windows (48 tokens, chunks of 8) make every case cheap and make the left-window
cut and the character cut move often.
"""

from __future__ import annotations

import inspect
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

import dg_edit.config as corpus_module
from dg_edit import denoise
from dg_edit.config import Settings
from dg_edit.engine import Engine
from dg_edit.events import Done, Step
from dg_edit.plan import kv_bytes_per_token
from dg_edit.testing import tiny_pair
from dg_edit.typed_ahead import Answer, rest_after_typing
from dg_edit.windows import char_start, token_drop

pytestmark = pytest.mark.timeout(600)

SMALL = Settings(max_prefix_tokens=48, prefix_chunk=8, idle_prefill_ms=0, typed_ahead=False)
DOC = inspect.getsource(corpus_module)[:2400]  # ~1,600 tokens: dozens of windows, several char starts


@pytest.fixture(scope="module")
def pair():
    model, tok = tiny_pair(seed=3, canvas_length=16, sliding_window=16)
    model.generation_config.max_denoising_steps = 3
    return model, tok


def cold(pair, prefix: str, suffix: str, seed: int, settings: Settings = SMALL, **kw) -> Done:
    """The reference: a fresh engine, nothing cached."""
    return Engine(*pair, settings=settings).infill(prefix, suffix, seed=seed, session="doc", max_new_tokens=8, **kw)


def documents(engine: Engine) -> dict[str, dict]:
    """`cache_info()["documents"]` by session, least recently used first."""
    return {d["session"]: d for d in engine.cache_info()["documents"]}


def ask(engine: Engine, text: str, cursor: int, seed: int, **kw) -> Done:
    return engine.infill(text[:cursor], text[cursor:], seed=seed, session="doc", max_new_tokens=8, **kw)


class Logits:
    """Every decoder pass's logits, bitwise: equal tokens could hide a 1e-6 difference in the states."""

    def __init__(self, model):
        self.model = model

    def __call__(self, fn):
        seen: list[torch.Tensor] = []
        handle = self.model.register_forward_hook(lambda m, args, out: seen.append(out.logits.detach().clone()))
        try:
            result = fn()
        finally:
            handle.remove()
        return result, seen


def warm_equals_cold(pair, engine: Engine, text: str, cursor: int, seed: int, **kw) -> Done:
    """Ask `engine` (warm) and a fresh engine (cold) at `cursor`: same answer, same logits at every pass."""
    logits = Logits(pair[0])
    warm, warm_logits = logits(lambda: ask(engine, text, cursor, seed, **kw))
    reference, cold_logits = logits(lambda: cold(pair, text[:cursor], text[cursor:], seed, **kw))
    assert warm == reference, (cursor, warm, reference)
    assert len(warm_logits) == len(cold_logits) > 0
    assert all(torch.equal(a, b) for a, b in zip(warm_logits, cold_logits)), cursor
    return warm


# ---------------------------------------------------------------------------------------------- windows
def test_window_rules_move_in_coarse_steps():
    assert [token_drop(n, 48) for n in (1, 48, 49, 72, 73, 96, 97)] == [0, 0, 24, 24, 48, 48, 72]
    # a prefix keeps between half a window and a window of tokens
    assert all(24 <= n - token_drop(n, 48) <= 48 for n in range(49, 500))
    cap = 48 * 16
    assert char_start(cap, 48) == 0 and char_start(cap + 1, 48) == cap // 4
    assert {char_start(n, 48) for n in range(cap + 1, cap + cap // 4)} == {cap // 4}


def test_every_cursor_falls_in_a_planned_window(pair):
    engine = Engine(*pair, settings=SMALL)
    planned = {w.key: w.ids for w in engine.document_windows(DOC)}
    near_end = list(engine.document_windows(DOC, near=len(DOC)))
    assert {w.key: w.ids for w in near_end} == planned  # the same windows, nearest the cursor first
    assert near_end[0].tail and near_end[0].span[1] >= len(DOC) - 16
    assert len({k[1] for k in planned}) > 1  # the document is longer than one character window
    for cursor in range(0, len(DOC) + 1, 7):
        key, ids = engine._prefix_window(DOC[:cursor])
        assert key in planned, cursor
        window = planned[key]
        # the request's tokens are the window's, except perhaps the word the cursor cuts
        same = next((i for i, (a, b) in enumerate(zip(ids, window)) if a != b), min(len(ids), len(window)))
        assert same >= len(ids) - SMALL.prefix_chunk


# ---------------------------------------------------------------------------------------------- warm == cold
def test_after_prefill_every_cursor_is_warm_and_bitwise_cold(pair):
    engine = Engine(*pair, settings=SMALL)
    encoded = engine.prefill_now("doc", DOC)
    assert encoded >= len(DOC) // 2  # roughly twice the document's tokens (1,600): every window
    assert engine.prefill_now("doc", DOC) == 0  # nothing missing any more
    for i, cursor in enumerate(range(3, len(DOC), 97)):
        warm = warm_equals_cold(pair, engine, DOC, cursor, seed=i)
        assert warm.encoded < 2 * SMALL.prefix_chunk, (cursor, warm.encoded)  # the cursor's chunk at most
    reference = cold(pair, DOC[:500], DOC[500:], seed=0)
    assert reference.encoded == reference.prefix_tokens


def chunk_edge_cursor(engine: Engine, text: str, start: int) -> int:
    """A cursor whose prefix is a whole number of chunks of the document's own tokens (nothing to encode)."""
    windows = {w.key: w.ids for w in engine.document_windows(text)}
    for cursor in range(start, len(text)):
        key, ids = engine._prefix_window(text[:cursor])
        if len(ids) % SMALL.prefix_chunk == 0 and windows[key][: len(ids)] == ids:
            return cursor
    pytest.fail("no cursor with a chunk-aligned prefix")


def test_cursor_at_a_chunk_edge_and_at_the_end_reuses_everything(pair):
    engine = Engine(*pair, settings=SMALL)
    engine.prefill_now("doc", DOC)
    end = warm_equals_cold(pair, engine, DOC, len(DOC), seed=1)  # the last window was prefilled with its tail
    assert end.encoded == 0
    at_edge = warm_equals_cold(pair, engine, DOC, chunk_edge_cursor(engine, DOC, 40), seed=2)
    assert at_edge.encoded == 0


def test_a_prefix_shorter_than_a_chunk_is_kept_as_a_tail(pair):
    engine = Engine(*pair, settings=SMALL)
    first = warm_equals_cold(pair, engine, "x = 1\n", 6, seed=1)  # 4 tokens: BOS and a line
    assert 0 < first.encoded < SMALL.prefix_chunk
    again = warm_equals_cold(pair, engine, "x = 1\n", 6, seed=2)
    assert again.encoded == 0


def test_a_request_in_flight_keeps_its_states_while_another_rewrites_the_strip(pair):
    # The first request reads the strip's buffers in place (nothing to encode); the second, an edit
    # just before it in the same window, cuts the strip there and writes new states: copy-on-write.
    engine = Engine(*pair, settings=SMALL)
    engine.prefill_now("doc", DOC)
    cursor = chunk_edge_cursor(engine, DOC, 1200)
    logits = Logits(pair[0])

    def interleaved():
        first = engine.stream(DOC[:cursor], DOC[cursor:], seed=7, session="doc", max_new_tokens=8,
                              max_denoising_steps=3, confidence_threshold=1e-9)
        events = [next(first)]
        edited = DOC[: cursor - 40] + "zz" + DOC[cursor - 40:]
        at = cursor - 8  # same window (strip), before the first request's cursor: within its buffer
        assert engine._prefix_window(edited[:at])[0] == engine._prefix_window(DOC[:cursor])[0]
        second = engine.infill(edited[:at], edited[at:], seed=8, session="doc", max_new_tokens=8)
        assert second.encoded > SMALL.prefix_chunk  # it re-encoded from the edit on
        events += list(first)
        return events[-1]

    warm, warm_logits = logits(interleaved)
    reference, cold_logits = logits(lambda: Engine(*pair, settings=SMALL).infill(
        DOC[:cursor], DOC[cursor:], seed=7, session="doc", max_new_tokens=8, max_denoising_steps=3,
        confidence_threshold=1e-9))
    assert warm.encoded == 0 and warm == reference
    first_pass = warm_logits[:1] + warm_logits[-(len(cold_logits) - 1):]  # the second request's passes in between
    assert all(torch.equal(a, b) for a, b in zip(first_pass, cold_logits))


def test_jumps_edits_before_and_after_the_cursor_and_undo(pair):
    engine = Engine(*pair, settings=SMALL)
    text = DOC
    engine.prefill_now("doc", text)
    history = [text]
    script = [("ask", 1500), ("ask", 300), ("ask", 2100), ("edit", 800, "renamed"), ("ask", 1200),
              ("ask", 700), ("prefill",), ("ask", 1200), ("edit", 1900, "\n    x = 1\n"), ("ask", 1000),
              ("ask", 2000), ("undo",), ("ask", 1000), ("prefill",), ("ask", 2000), ("ask", 850)]
    for seed, op in enumerate(script):
        if op[0] == "edit":
            at, insert = op[1], op[2]
            text = text[:at] + insert + text[at + 3:]
            history.append(text)
        elif op[0] == "undo":
            history.pop()
            text = history[-1]
        elif op[0] == "prefill":
            engine.prefill_now("doc", text)
        else:
            warm_equals_cold(pair, engine, text, min(op[1], len(text)), seed)
    # after the last prefill, the edits are all encoded again: any cursor is warm
    assert ask(engine, text, 1700, 99).encoded < 2 * SMALL.prefix_chunk


def test_multi_block_answers_and_rewrites_share_the_cache_correctly(pair):
    engine = Engine(*pair, settings=SMALL)
    engine.prefill_now("doc", DOC)
    # an answer longer than one canvas encodes its first block after the prefix (1.f)
    warm = engine.infill(DOC[:1000], "", seed=4, session="doc", max_new_tokens=40)
    assert warm == Engine(*pair, settings=SMALL).infill(DOC[:1000], "", seed=4, session="doc", max_new_tokens=40)
    # an instruction leads a rewrite's prefix: its own strip, the document's windows untouched
    args = (DOC[:900], DOC[900:930], DOC[930:])
    r1 = engine.rewrite(*args, instruction="rename it", seed=5, session="doc")
    assert r1 == Engine(*pair, settings=SMALL).rewrite(*args, instruction="rename it", seed=5, session="doc")
    assert ask(engine, DOC, 905, 6).encoded < 2 * SMALL.prefix_chunk


def test_token_level_requests_share_sessions_too(pair):
    model, tok = pair
    ids = tok.encode(DOC, add_special_tokens=False)[:300]
    engine = Engine(model, tok, settings=SMALL)
    first = engine.infill_ids(ids[:200], max_new_tokens=8, seed=1, session="ids")
    second = engine.infill_ids(ids[:205], max_new_tokens=8, seed=1, session="ids")
    assert second.encoded < 2 * SMALL.prefix_chunk
    fresh = Engine(model, tok, settings=SMALL)
    assert first == fresh.infill_ids(ids[:200], max_new_tokens=8, seed=1, session="ids")
    assert second == Engine(model, tok, settings=SMALL).infill_ids(ids[:205], max_new_tokens=8, seed=1,
                                                                   session="ids")


edits = st.one_of(
    st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from(["x", "  ", "\n", "name = 1\n", "(", "é"])),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
    st.tuples(st.just("ask"), st.floats(0, 1), st.integers(0, 3)),
    st.tuples(st.just("prefill"), st.just(0.0), st.just(0)),
    st.tuples(st.just("undo"), st.just(0.0), st.just(0)),
)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(ops=st.lists(edits, min_size=1, max_size=8), start=st.integers(0, 1600))
def test_fuzz_random_edits_and_cursors_warm_equals_cold(pair, ops, start):
    text = DOC[start : start + 900]  # a file of ~600 tokens: a dozen windows
    engine = Engine(*pair, settings=SMALL)
    engine.prefill_now("doc", text)
    history = [text]
    for kind, where, arg in ops:
        at = int(where * len(text))
        if kind == "insert":
            text = text[:at] + arg + text[at:]
            history.append(text)
        elif kind == "delete":
            text = text[:at] + text[at + arg:]
            history.append(text)
        elif kind == "undo" and len(history) > 1:
            history.pop()
            text = history[-1]
        elif kind == "prefill":
            engine.prefill_now("doc", text)
        elif kind == "ask" and text:
            warm_equals_cold(pair, engine, text, at, arg)


# ---------------------------------------------------------------------------------------------- memory
def test_bytes_per_token_from_the_config_match_the_cache(pair):
    model, tok = pair
    engine = Engine(model, tok, settings=SMALL)
    per_token = kv_bytes_per_token(model.config.get_text_config(decoder=True), model.dtype)
    # 2 layers x (K and V) x 1 head x 16 dims x 4 bytes
    assert per_token == engine.cache_info()["bytes_per_token"] == 2 * 2 * 1 * 16 * 4
    engine.infill(DOC[:300], "", seed=0, session="doc", max_new_tokens=8)
    doc = documents(engine)["doc"]
    assert doc["bytes"] >= per_token * doc["tokens"]


def test_bytes_per_token_of_the_26b_shape():
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    config = DiffusionGemmaTextConfig(
        hidden_size=2816, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024, intermediate_size=2112,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704)
    # 25 sliding layers x 2 x 8 heads x 256 + 5 full layers x 2 x 2 heads x 512, bf16
    assert kv_bytes_per_token(config, torch.bfloat16) == (25 * 2 * 8 * 256 + 5 * 2 * 2 * 512) * 2 == 225_280


def test_documents_are_evicted_least_recently_used_within_the_budget(pair):
    text = DOC[:600]
    probe = Engine(*pair, settings=SMALL)
    probe.prefill_now("a", text)
    one_doc = probe.cache_info()["bytes"]
    engine = Engine(*pair, settings=SMALL)
    engine.caches.budget_bytes = int(2.5 * one_doc)  # Settings.cache_budget_mb, in bytes
    for name in ("a", "b", "c"):
        engine.prefill_now(name, text)
    assert list(documents(engine)) == ["b", "c"]  # "a" was the least recently used
    ask(engine, text, 100, 0)  # a request makes "doc" the most recent document
    assert list(documents(engine)) == ["b", "c", "doc"]
    engine.prefill_now("doc", text)  # room for "doc" comes from the least recently used, "b"
    info = engine.cache_info()
    assert list(documents(engine)) == ["c", "doc"] and info["bytes"] <= engine.caches.budget_bytes
    assert not info["prefill"]["budget_full"]


def test_prefill_stops_at_the_budget_and_requests_stay_exact(pair):
    engine = Engine(*pair, settings=SMALL)
    engine.caches.budget_bytes = 40_000  # ~150 tokens of this model's cache
    engine.prefill_now("doc", DOC)
    info = engine.cache_info()
    assert info["prefill"]["budget_full"] and 0 < info["bytes"] <= 40_000
    for cursor in (100, 2000):
        warm_equals_cold(pair, engine, DOC, cursor, 3)
    assert engine.cache_info()["bytes"] <= 40_000
    nothing = Engine(*pair, settings=Settings.from_dict({"cache_budget_mb": 0}, base=SMALL))
    nothing.prefill_now("doc", DOC)
    warm_equals_cold(pair, nothing, DOC, 700, 4)
    assert nothing.cache_info()["bytes"] == 0


def test_a_document_over_the_budget_is_prefilled_around_the_last_cursor(pair):
    big = DOC * 8  # ~13,000 tokens, far over this budget
    engine = Engine(*pair, settings=SMALL)
    engine.caches.budget_bytes = 200_000  # ~700 tokens of this model's cache
    ask(engine, big, 15_000, 0)
    engine.prefill_now("doc", big)
    assert engine.cache_info()["prefill"]["budget_full"]
    assert warm_equals_cold(pair, engine, big, 15_060, 1).encoded < 2 * SMALL.prefix_chunk
    assert engine.cache_info()["bytes"] <= 200_000


# ---------------------------------------------------------------------------------------------- idle prefill
def test_idle_prefill_waits_for_quiet_and_for_requests(pair):
    settings = Settings.from_dict({"idle_prefill_ms": 300}, base=SMALL)
    engine = Engine(*pair, settings=settings)
    engine.prefill("doc", DOC[:600])
    time.sleep(0.1)
    assert engine.cache_info()["prefill"]["encoded"] == 0  # not quiet long enough yet
    assert engine.wait_prefilled(60)
    done_once = engine.cache_info()["prefill"]["encoded"]
    assert done_once > 0

    # A running request holds prefill off from its first step to its end.
    settings = Settings.from_dict({"idle_prefill_ms": 0}, base=SMALL)
    engine = Engine(*pair, settings=settings)
    events = engine.stream(DOC[:300], DOC[300:600], seed=1, session="doc", max_new_tokens=8,
                           max_denoising_steps=3, confidence_threshold=1e-9)
    assert isinstance(next(events), Step)
    engine.prefill("doc", DOC[:600])
    time.sleep(0.5)
    assert engine.cache_info()["prefill"]["encoded"] == 0 and engine.cache_info()["prefill"]["pending"] == 1
    list(events)
    assert engine.wait_prefilled(60)
    assert engine.cache_info()["prefill"]["encoded"] > 0


def test_requests_during_idle_prefill_are_served_and_stay_exact(pair):
    settings = Settings.from_dict({"idle_prefill_ms": 0}, base=SMALL)
    engine = Engine(*pair, settings=settings)
    engine.prefill("doc", DOC)
    for c in (200, 1500, 900, 2300):  # interleaved with prefill chunks
        warm_equals_cold(pair, engine, DOC, c, c)
    assert engine.wait_prefilled(120)
    # new text while prefill runs replaces the old; forget stops it
    engine.prefill("doc", DOC + "\n# more\n")
    engine.forget("doc")
    assert engine.wait_prefilled(60)
    assert "doc" not in documents(engine)


def test_idle_prefill_off(pair):
    settings = Settings.from_dict({"idle_prefill": False, "idle_prefill_ms": 0}, base=SMALL)
    engine = Engine(*pair, settings=settings)
    engine.prefill("doc", DOC)
    assert engine.wait_prefilled(5) and engine.cache_info()["prefill"]["encoded"] == 0


def test_prefill_thread_is_niced_and_goes_away_when_idle(pair):
    import os

    settings = Settings.from_dict({"idle_prefill_ms": 0}, base=SMALL)
    engine = Engine(*pair, settings=settings)
    engine.prefill("doc", DOC[:300])
    assert engine.wait_prefilled(60)
    assert engine._prefill.niceness == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
    deadline = time.monotonic() + 10
    while engine._prefill._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine._prefill._thread is None  # no thread while nothing is pending
    assert not any(t.name == "dg-edit-prefill" for t in threading.enumerate())


# ---------------------------------------------------------------------------------------------- typed-ahead
def test_rest_after_typing_rules():
    a = Answer(prefix="x = ", suffix="\n", text="compute(1)", options=(0,))
    assert rest_after_typing(a, "x = comp", "\n", (0,)) == "ute(1)"
    assert rest_after_typing(a, "x = ", "\n", (0,)) is None  # nothing typed: ask the model
    assert rest_after_typing(a, "x = compute(1)", "\n", (0,)) is None  # all of it typed
    assert rest_after_typing(a, "x = cat", "\n", (0,)) is None  # departs from the answer
    assert rest_after_typing(a, "x = comp", "", (0,)) is None  # another suffix
    assert rest_after_typing(a, "x = comp", "\n", (1,)) is None  # another seed / options
    assert rest_after_typing(a, "y = comp", "\n", (0,)) is None
    assert rest_after_typing(Answer("x = ", "\n", "ab  ", (0,)), "x = ab", "\n", (0,)) is None  # only blanks left


def _answer_with_text(engine: Engine, prefix: str, suffix: str) -> tuple[int, Done]:
    for seed in range(40):
        done = engine.infill(prefix, suffix, seed=seed, session="doc", max_new_tokens=8)
        if done.text[:2].strip() and done.text[3:].strip():
            return seed, done
    pytest.fail("the tiny model proposed no text of three characters in 40 seeds")


def test_typed_ahead_returns_the_rest_without_a_model_call(pair):
    engine = Engine(*pair, settings=Settings.from_dict({"typed_ahead": True}, base=SMALL))
    prefix, suffix = DOC[:500], DOC[500:]
    seed, first = _answer_with_text(engine, prefix, suffix)
    typed = first.text[:2]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(denoise, "generate", lambda *a, **k: pytest.fail("the model ran"))  # the denoising loop
        events = list(engine.stream(prefix + typed, suffix, seed=seed, session="doc", max_new_tokens=8))
    assert len(events) == 1 and isinstance(events[0], Done)
    rest = events[0]
    assert rest.typed_ahead and rest.steps == 0 and rest.text == first.text[2:]
    assert rest.to_json()["typed_ahead"] is True
    # typing on keeps hitting; another seed, or text that departs from the answer, asks the model
    more = engine.infill(prefix + first.text[:3], suffix, seed=seed, session="doc", max_new_tokens=8)
    assert more.typed_ahead and more.text == first.text[3:]
    other = engine.infill(prefix + typed, suffix, seed=seed + 1, session="doc", max_new_tokens=8)
    assert not other.typed_ahead and other.steps > 0
    departs = engine.infill(prefix + "\x01", suffix, seed=seed, session="doc", max_new_tokens=8)
    assert not departs.typed_ahead
    # without a session, or with the setting off, there is no memory of answers
    assert not engine.infill(prefix + typed, suffix, seed=seed, max_new_tokens=8).typed_ahead
    off = Engine(*pair, settings=SMALL)
    off.infill(prefix, suffix, seed=seed, session="doc", max_new_tokens=8)
    assert not off.infill(prefix + typed, suffix, seed=seed, session="doc", max_new_tokens=8).typed_ahead


def test_exiting_while_idle_prefill_runs_is_a_clean_exit():
    # A daemon thread frozen inside a torch kernel at interpreter exit aborts the process (exit code
    # 134, "terminate called without an active exception"); prefill threads are stopped at exit.
    import subprocess
    import sys

    script = """
import inspect, time
import dg_edit.config as corpus
from dg_edit.config import Settings
from dg_edit.engine import Engine
from dg_edit.testing import tiny_pair
engine = Engine(*tiny_pair(seed=3, canvas_length=16, sliding_window=16),
                settings=Settings(max_prefix_tokens=48, prefix_chunk=8, idle_prefill_ms=0))
engine.prefill("doc", inspect.getsource(corpus) * 20)
while engine.cache_info()["prefill"]["encoded"] == 0:
    time.sleep(0.01)
print("exiting mid-prefill", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exiting mid-prefill" in proc.stdout and "terminate" not in proc.stderr


def test_prefill_with_other_files_chunks_serves_requests_that_carry_them(pair):
    # The language server and the HTTP APIs send chunks of other files ahead of the prefix. Prefilled
    # with the same chunks, every cursor is warm (at most the chunk holding it is encoded) and equals
    # a cold request with those chunks; prefilled without them, the strip is not the one they use.
    settings = Settings(max_prefix_tokens=48, prefix_chunk=8, idle_prefill_ms=0, typed_ahead=False,
                        max_extra_tokens=40)
    text = DOC[:700]
    extra = ("# other.py\nimport os\nROOT = os.sep\n", "# util.py\ndef helper(x):\n    return x\n")
    engine = Engine(*pair, settings=settings)
    assert engine.prefill_now("doc", text, extra=extra) > 0
    assert engine.prefill_now("doc", text, extra=extra) == 0
    logits = Logits(pair[0])
    for cursor in range(0, len(text), 97):
        warm, warm_logits = logits(lambda: engine.infill(text[:cursor], text[cursor:], seed=cursor, session="doc",
                                                         max_new_tokens=8, extra=extra))
        assert engine.last_encoded <= settings.prefix_chunk, cursor
        reference, cold_logits = logits(lambda: Engine(*pair, settings=settings).infill(
            text[:cursor], text[cursor:], seed=cursor, session="doc", max_new_tokens=8, extra=extra))
        assert warm == reference and all(torch.equal(a, b) for a, b in zip(warm_logits, cold_logits)), cursor
    # the chunks really are ahead of the prefix: without them the same cursor reads another prompt
    without = Engine(*pair, settings=settings)
    without.prefill_now("doc", text)
    without.infill(text[:300], text[300:], seed=1, session="doc", max_new_tokens=8, extra=extra)
    assert without.last_encoded > settings.prefix_chunk
