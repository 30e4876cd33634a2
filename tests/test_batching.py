"""Continuous batching (dg_edit/scheduler.py): concurrent requests share one decoder forward per step and
each gets the answer it gets alone; admission by canvas rows, in order, fair across clients."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from dg_edit import Done, Engine, Step
from dg_edit import hf_adapter as hf
from dg_edit.config import Settings
from dg_edit.faults import MARKER, install as install_fault
from dg_edit.prefix_cache import encode_prefix
from dg_edit.testing import tiny_pair

PREFIXES = [
    "import os\n",
    "def add(a, b):\n    return ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n"
    "        return (self.x ** 2 + self.y ** 2) ** 0.5\n\n    def scale(self, k):\n        return Point(",
    "x = [",
    "for i in range(10):\n    total = total + i * i\n    if total > 100:\n        break\nprint(",
]


def together(calls):
    """Run the calls in threads released at once; their results in order (an exception is a result)."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def worker(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - compared by the test
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return results


class Recorder:
    """The metrics hook, recording what the scheduler reports."""

    def __init__(self):
        self.steps: list[tuple[int, int, float, int]] = []
        self.waits: list[float] = []

    def on_step(self, rows, requests, seconds, queue_depth):
        self.steps.append((rows, requests, seconds, queue_depth))

    def on_admit(self, waited_seconds):
        self.waits.append(waited_seconds)


def mixes(engine):
    """Requests of every kind: lengths, suffixes (candidate rows), single-line, rewrites, multi-block,
    mask-free sampling overrides, sessions (document caches)."""
    return [
        lambda: engine.infill(PREFIXES[0], "", max_new_tokens=40, seed=1),  # multi-block (canvas 16)
        lambda: engine.infill(PREFIXES[1], "\n\nprint(add(1, 2))\n", max_new_tokens=16, seed=2),  # candidates
        lambda: engine.infill(PREFIXES[2], ")\n", max_new_tokens=12, seed=3, session="a:doc"),
        lambda: engine.infill(PREFIXES[3], "]\nprint(x)\n", max_new_tokens=8, seed=4, single_line=True),
        lambda: engine.rewrite(PREFIXES[1], "a + b", "\n", strength=0.7, seed=5),
        lambda: engine.infill(PREFIXES[4], "", max_new_tokens=10, seed=6, max_denoising_steps=5),
        lambda: engine.infill(PREFIXES[2], "\n", max_new_tokens=16, seed=7, session="b:doc", t_max=1.0),
    ]


def exact_pair(seed: int = 3):
    """A tiny model in float64 (eager experts: grouped_mm has no float64 kernel). Its logits come out in
    float32, so a different batch shape's rounding (~1e-16) never reaches them: token parity is exact."""
    model, tok = tiny_pair(seed=seed, canvas_length=16)
    model = model.double()
    hf.set_experts_implementation(model, "eager")
    return model, tok


def test_concurrent_requests_get_the_answers_they_get_alone_in_shared_forwards():
    model, tok = exact_pair()
    engine = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False))
    alone = [call() for call in mixes(engine)]
    assert engine.scheduler.max_batch == 1
    engine.observer = recorder = Recorder()
    batched = together(mixes(engine))
    assert engine.scheduler.max_batch >= 3  # the requests really shared forwards
    assert any(requests > 1 for _, requests, _, _ in recorder.steps)
    for a, b in zip(alone, batched):
        assert isinstance(b, Done), b
        assert (b.text, b.ids, b.steps, b.length) == (a.text, a.ids, a.steps, a.length)
    assert len(recorder.waits) == len(batched)


def test_a_batch_over_the_cpu_group_limit_runs_in_row_groups_with_the_same_answers(monkeypatch):
    """On a CPU a batch whose [rows, width, V] buffers would pass `hf.CPU_GROUP_BYTES` runs as consecutive
    row groups, one decoder pass each (fresh mmaps of bigger buffers page-fault every step): each request
    still gets the answer it gets alone, and steps really ran in groups."""
    model, tok = exact_pair()
    engine = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False))
    alone = [call() for call in mixes(engine)]
    vocab = hf.text_config(model).vocab_size
    monkeypatch.setattr(hf, "CPU_GROUP_BYTES", 2 * 16 * vocab * 4)  # two rows of a 16-slot canvas a group
    stack, stacked = hf.stack_batch, []

    def recording(model, parts):
        batch = stack(model, parts)
        stacked.append(batch)
        return batch

    monkeypatch.setattr(hf, "stack_batch", recording)
    batched = together(mixes(engine))
    assert any(len(batch.groups) >= 2 for batch in stacked), [len(batch.groups) for batch in stacked]
    for batch in stacked:  # groups are consecutive and cover every part
        if batch.groups:
            assert [g[0] for g in batch.groups][0] == 0 and batch.groups[-1][1] == len(batch.rows)
            assert all(a[1] == b[0] for a, b in zip(batch.groups, batch.groups[1:]))
    for a, b in zip(alone, batched):
        assert isinstance(b, Done), b
        assert (b.text, b.ids, b.steps, b.length) == (a.text, a.ids, a.steps, a.length)


def test_in_float32_batching_changes_logits_by_rounding_only(monkeypatch):
    """In float32 a different batch shape rounds differently (matmul blocking): measured here against each
    request's forward alone, at every batched step. On a random tiny model every token's entropy is nearly
    ln V, so the entropy-bound acceptance order can flip on such a difference and a request's tokens change;
    the test says how many did, and bounds the logit difference that caused it."""
    model, tok = tiny_pair(seed=3, canvas_length=16)
    engine = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False))
    alone = [call() for call in mixes(engine)]
    batched_forward = hf.batched_decoder_forward
    worst = [0.0]

    def checked(model, batch, parts):
        out = batched_forward(model, batch, parts)
        for part, logits in zip(parts, out):
            b, width = part.canvas.shape
            masks = hf.decoder_masks(model, part.cache, b, width, part.attention_mask)
            own = hf.decoder_forward(model, part.cache, part.canvas, part.position_ids, masks,
                                     part.self_conditioning_logits)
            worst[0] = max(worst[0], (own - logits).abs().max().item())
        return out

    monkeypatch.setattr(hf, "batched_decoder_forward", checked)
    batched = together(mixes(engine))
    assert all(isinstance(b, Done) for b in batched), batched
    changed = sum(a.ids != b.ids for a, b in zip(alone, batched))
    assert engine.scheduler.max_batch >= 2
    assert 0.0 < worst[0] <= 1e-5, f"{changed} of {len(alone)} answers changed; logits differ by {worst[0]}"
    print(f"float32: {changed} of {len(alone)} answers changed by rounding; logits differ by at most {worst[0]:.2e}")


def test_a_batched_forward_gives_each_request_its_own_logits_within_float_rounding():
    """Different prefix lengths (longer than the sliding window, so sliding layers are padded too), canvas
    widths, pad columns and self-conditioning in one forward: each part's logits equal its forward alone up
    to float rounding of a different batch shape (bounded here; the token test above shows it changes none)."""
    model, _ = tiny_pair(seed=3, canvas_length=16)
    g = torch.Generator().manual_seed(0)
    parts, alone = [], []
    with torch.inference_mode():
        for prefix_len, width, rows, with_sc, pad in ((5, 16, 1, False, False), (47, 24, 3, True, True),
                                                       (20, 8, 2, True, False)):
            cache, _ = encode_prefix(model, torch.randint(6, 300, (prefix_len,), generator=g).tolist())
            if rows > 1:
                hf.batch_repeat(cache, rows)
            canvas = torch.randint(0, 300, (rows, width), generator=g)
            positions = torch.arange(prefix_len, prefix_len + width, dtype=torch.int32).expand(rows, -1)
            mask = None
            if pad:
                mask = torch.ones((rows, prefix_len + width), dtype=torch.bool)
                mask[1:, -5:] = False  # shorter candidate rows end in batch pad
            sc = torch.randn((rows, width, model.config.get_text_config().vocab_size), generator=g) if with_sc else None
            part = hf.BatchPart(cache, canvas, positions, mask, sc)
            parts.append(part)
            masks = hf.decoder_masks(model, cache, rows, width, mask)
            alone.append(hf.decoder_forward(model, cache, canvas, positions, masks, sc))
        batch = hf.stack_batch(model, parts)
        together_logits = hf.batched_decoder_forward(model, batch, parts)
    worst = 0.0
    for part, a, b in zip(parts, alone, together_logits):
        assert b.shape == a.shape
        real = torch.ones(a.shape[:2], dtype=torch.bool) if part.attention_mask is None else \
            part.attention_mask[:, -a.shape[1]:]
        worst = max(worst, (a - b).abs()[real].max().item())
    assert worst <= 1e-4, f"batched logits differ from alone by {worst}"


def test_a_cancelled_request_leaves_the_batch_and_the_others_are_unchanged():
    model, tok = exact_pair()
    engine = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False))
    want = engine.infill(PREFIXES[2], "", max_new_tokens=16, seed=11)
    seen = []

    def cancelled():
        stream = engine.stream(PREFIXES[1], "", max_new_tokens=16, seed=12, max_denoising_steps=40)
        seen.extend([next(stream), next(stream)])
        stream.close()
        return "closed"

    got = together([lambda: engine.infill(PREFIXES[2], "", max_new_tokens=16, seed=11), cancelled])
    assert got[1] == "closed" and all(isinstance(s, Step) for s in seen)
    assert got[0] == want


def test_rows_beyond_the_limit_wait_in_order_fairly_across_clients_and_say_how_long():
    model, tok = tiny_pair(seed=3, canvas_length=16)
    engine = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False, batch_rows=2))
    engine.observer = recorder = Recorder()
    order = []
    lock = threading.Lock()

    def request(client, i):
        def call():
            for event in engine.stream(PREFIXES[i % len(PREFIXES)], "", max_new_tokens=8, seed=i,
                                       session=f"{client}:doc{i}", max_denoising_steps=4):
                if isinstance(event, Step) and event.index == 1:
                    with lock:
                        order.append(client)
            return event
        return call

    # Client a asks four times at once, then b once: b is admitted before a's later requests.
    results = together([request("a", 0), request("a", 1), request("a", 2), request("a", 3), request("b", 4)])
    assert all(isinstance(r, Done) for r in results)
    assert max(rows for rows, _, _, _ in recorder.steps) <= 2
    assert order.index("b") <= 2, order  # round-robin: b does not wait behind all of a's requests
    assert max(r.waited_ms for r in results) > 0.0
    assert any(depth > 0 for _, _, _, depth in recorder.steps)


def test_batching_off_runs_one_request_at_a_time_with_the_same_answers():
    model, tok = exact_pair()
    on = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False))
    off = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False, batching=False))
    a = together(mixes(on)[:4])
    b = together(mixes(off)[:4])
    assert off.scheduler.max_batch == 1 and on.scheduler.max_batch > 1
    assert [(x.text, x.ids) for x in a] == [(x.text, x.ids) for x in b]


@pytest.mark.parametrize("kind", ["raise:2", "nan:2", "oom:2"])
def test_a_failing_request_in_a_batch_fails_alone(kind):
    """The model failing on one request's rows (dg_edit/faults.py, as the fault tests inject it into a real
    server) costs that request only: the others in the same forwards get their answers unchanged."""
    model, tok = exact_pair()
    engine = Engine(model, tok, settings=Settings(typed_ahead=False, idle_prefill=False))
    want = [engine.infill(PREFIXES[1], "", max_new_tokens=16, seed=2),
            engine.infill(PREFIXES[3], "]\n", max_new_tokens=8, seed=4)]
    install_fault(model, tok, kind)
    results = together([lambda: engine.infill(PREFIXES[1], "", max_new_tokens=16, seed=2),
                        lambda: engine.infill(MARKER + "\n" + PREFIXES[0], "", max_new_tokens=16, seed=3),
                        lambda: engine.infill(PREFIXES[3], "]\n", max_new_tokens=8, seed=4)])
    assert results[0] == want[0] and results[2] == want[1]
    assert isinstance(results[1], Exception), results[1]
    assert engine.scheduler.max_batch >= 2


@pytest.mark.parametrize("batching", [True, False])
def test_done_json_reports_the_queue_wait(batching):
    model, tok = tiny_pair(seed=3, canvas_length=16)
    engine = Engine(model, tok, settings=Settings(batching=batching))
    done = engine.infill("x = 1\n", "", max_new_tokens=4, seed=0)
    assert "waited_ms" in done.to_json() and done.waited_ms >= 0.0


def test_a_long_cold_prefix_is_encoded_a_chunk_per_step_between_the_others_steps():
    model, tok = exact_pair()
    settings = Settings(typed_ahead=False, idle_prefill=False, prefix_chunk=16)
    engine = Engine(model, tok, settings=settings)
    long_prefix = PREFIXES[2] * 4  # ~20 chunks of 16 tokens, none cached yet
    want = Engine(model, tok, settings=settings).infill(long_prefix, "", max_new_tokens=8, seed=5, session="b:doc")
    calls: list[str] = []
    hf.encoder_module(model).register_forward_pre_hook(lambda *a: calls.append("E"))
    model.register_forward_pre_hook(lambda *a: calls.append("D"))
    started = threading.Event()

    def steady():
        for event in engine.stream(PREFIXES[1], "", max_new_tokens=16, seed=2, max_denoising_steps=48,
                                   confidence_threshold=1e-30, stability_threshold=48):
            started.set()
        return event

    def cold():
        started.wait(60)
        return engine.infill(long_prefix, "", max_new_tokens=8, seed=5, session="b:doc")

    results = together([steady, cold])
    assert results[1] == want  # chunked between other steps == encoded at once
    trace = "".join(calls)
    first_e, last_e = trace.index("E", trace.index("D")), trace.rindex("E")
    encoding = trace[first_e : last_e + 1]
    assert encoding.count("E") >= 10 and "EE" not in encoding, trace  # one chunk, then the others' step


# ---------------------------------------------------------------------------------------------- lockstep
class Ranks:
    """Two engines kept in step as the ranks of a --parallel launch are (dg_edit/distributed.py), in one
    process: one wire orders the calls that open requests and the leader's steps; every request is opened
    on both engines, and each step the leader's scheduler plans is applied by both schedulers."""

    def __init__(self, leader: Engine, follower: Engine):
        self.leader, self.follower = leader, follower
        self.wire = threading.Lock()
        self.outcomes: list[tuple] = []  # (leader's, follower's) outcome of every step
        fatal = lambda error: not isinstance(error, ValueError)  # noqa: E731 - as distributed.is_request_error
        leader.scheduler.lockstep(self._run_step, fatal)
        follower.scheduler.lockstep(None, fatal)

    def _run_step(self, plan):
        with self.wire:
            mine = self.leader.scheduler.apply(plan)
            theirs = self.follower.scheduler.apply(plan)
            self.outcomes.append((mine, theirs))
            return mine

    def _open(self, method: str, *args, **kwargs):
        with self.wire:
            events = getattr(self.leader, method)(*args, **kwargs)
            getattr(self.follower, method)(*args, **kwargs)  # its events are read by no one: plans run it
            return events

    def stream(self, *args, **kwargs):
        return self._open("stream", *args, **kwargs)

    def stream_rewrite(self, *args, **kwargs):
        return self._open("stream_rewrite", *args, **kwargs)

    def infill(self, *args, **kwargs):
        return Engine.infill(self, *args, **kwargs)

    def rewrite(self, *args, **kwargs):
        return Engine.rewrite(self, *args, **kwargs)


def test_in_lockstep_a_follower_given_the_leaders_plans_runs_the_same_batched_steps():
    model, tok = exact_pair()
    settings = Settings(typed_ahead=False, idle_prefill=False)
    alone = [call() for call in mixes(Engine(model, tok, settings=settings))]
    leader = Engine(model, tok, settings=settings)
    follower = Engine(copy.deepcopy(model), tok, settings=settings)
    ranks = Ranks(leader, follower)
    batched = together(mixes(ranks))
    for a, b in zip(alone, batched):
        assert isinstance(b, Done), b
        assert (b.text, b.ids, b.steps, b.length) == (a.text, a.ids, a.steps, a.length)
    assert ranks.outcomes and all(mine == theirs for mine, theirs in ranks.outcomes)
    assert leader.scheduler.max_batch >= 3 and follower.scheduler.max_batch == leader.scheduler.max_batch
    assert follower.scheduler._thread is None  # a following rank runs only the plans it is given

    # A consumer that goes: the next plan drops its request on both.
    events = ranks.stream(PREFIXES[0], "", max_new_tokens=40, seed=9)
    assert isinstance(next(events), Step) and follower.scheduler.busy
    events.close()
    for _ in range(200):
        if not leader.scheduler.busy and not follower.scheduler.busy:
            break
        threading.Event().wait(0.01)
    assert not leader.scheduler.busy and not follower.scheduler.busy
    assert all(mine == theirs for mine, theirs in ranks.outcomes)


def test_in_lockstep_a_failure_that_is_not_the_requests_own_stops_every_request():
    model, tok = exact_pair()
    settings = Settings(typed_ahead=False, idle_prefill=False)
    leader = Engine(model, tok, settings=settings)
    follower = Engine(copy.deepcopy(model), tok, settings=settings)
    ranks = Ranks(leader, follower)
    calls = {"n": 0}
    forward = hf.decoder_forward

    def collective_lost(*args, **kwargs):  # the third forward's all-reduce finds a rank gone
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("Connection closed by peer")
        return forward(*args, **kwargs)

    hf_patch = pytest.MonkeyPatch()
    hf_patch.setattr(hf, "decoder_forward", collective_lost)
    try:
        results = together([lambda: ranks.infill(PREFIXES[0], "", max_new_tokens=40, seed=1)])
    finally:
        hf_patch.undo()
    # Not the request's own error (which would leave the scheduler running): the launch's, for everyone.
    assert isinstance(results[0], RuntimeError) and "closed by peer" in str(results[0])
    with pytest.raises(Exception, match="closed"):
        next(iter(leader.stream(PREFIXES[1], "", max_new_tokens=4, seed=2)))
