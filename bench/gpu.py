"""The real model's shape on one GPU: one command, figures beside their anchors.

Builds google/diffusiongemma-26B-A4B-it's architecture from tests/fixtures/diffusiongemma-26b-a4b
with random bf16 weights directly on the GPU (no download, no checkpoint), then prints:

  canvas tokens/s (256 slots, --steps denoising steps)      anchor: 1,000+ tok/s on one H100
  warm single-line infill p50/p95, 2,000-token prefix
  engine step / bare decoder forward (time)
  engine / model.generate at identical tokens               anchor: vLLM 895 tok/s end to end, FP8, batch 1
  compiled / eager step (Settings.compile_step)
  peak GPU memory                                           plan: `dg-edit plan` figure beside it
and the same for each quantization that runs there (quantized in place: `dg_edit.quantize`). Then, for the
first variant only (bf16 by default), issue 25's target:

  N concurrent single-line requests (--concurrent, 16), each from its own thread against one engine:
  p50/p95, p50(N) / p50(one alone)                          target: <= 2 with batching on
  requests/s and tokens/s, the most requests one decoder forward carried (must be > 1), with
  `batching: false` beside it

Random weights never become confident, so every canvas runs all --steps steps (the release's own
figures stop after ~20): the rates are per canvas of `--steps` steps.

    python bench/gpu.py                 # on the GPU machine (see README, "GPU benchmark")
    python bench/gpu.py --tiny          # the same code on a CPU with a tiny config (CI: tests/test_bench_gpu.py)
    python bench/gpu.py --sections concurrent --quantize none --json gpu.json   # issue 25's figure only

With --json the figures are written after each variant and each concurrent phase: a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from dg_edit import Engine, hf_adapter as hf, plan, quantize as q
from dg_edit.canvas import candidate_lengths
from dg_edit.config import Settings
from dg_edit.prefix_cache import encode_prefix
from dg_edit.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "diffusiongemma-26b-a4b"
ANCHOR_TOKS = 1000.0  # tok/s on one H100 (the release's figure)
ANCHOR_VLLM = 895.0  # tok/s end to end, FP8, batch 1 (vLLM)
TARGET_CONCURRENT = 2.0  # issue 25: p50 of 16 concurrent single-line requests <= 2x one request alone
TYPED = "abc"  # what a user types between two requests of one document (3 characters, no newline)
SECTIONS = ("figures", "concurrent")


def build(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """The model: the fixture's config (or a tiny one), random weights initialized on `device`."""
    torch.manual_seed(seed)
    if tiny:
        from dg_edit.testing import tiny_config

        config = tiny_config(canvas_length=32, vocab_size=512, hidden_size=64, layers=2, head_dim=16,
                             global_head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=64,
                             intermediate_size=128)
    else:
        config = plan.load_config(FIXTURE)
    model = hf.model_from_config(config, dtype=dtype, device=device).eval()
    generation = model.generation_config
    generation.eos_token_id = [1, 106, 50] if not tiny else [1]
    generation.pad_token_id = 0
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[list[float], object]:
    """Wall times in ms of `repeats` calls (after one warm-up), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return times, result


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def figures(model, args, label: str) -> dict:
    """Every figure for one model (full precision or quantized)."""
    device = model.device
    vocab = model.config.get_text_config().vocab_size
    canvas = int(model.config.canvas_length)
    steps = args.steps
    sampling = dict(max_denoising_steps=steps, confidence_threshold=1e-12)  # random weights: all steps run
    # the whole prompt and the growing 2,000-token prefix stay inside the window (no left cut)
    window = max(args.prompt, args.prefix + 3 * args.requests + 64)
    engine = Engine(model, settings=Settings(max_prefix_tokens=window))
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (args.prompt,), generator=gen).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"label": label}

    # canvas tokens/s: one canvas of `canvas` slots per request
    times, done = timed(lambda: engine.infill_ids(prompt, max_new_tokens=canvas, seed=2, **sampling), device,
                        args.repeats)
    ms = statistics.median(times)
    out["canvas_tok_s"] = canvas / (ms / 1000)
    out["step_ms"] = ms / done.steps

    # bare decoder forward over the same canvas, with self-conditioning logits
    with engine._inference():
        cache, _ = encode_prefix(model, prompt)
        tokens = torch.randint(0, vocab, (1, canvas), device=device)
        positions = torch.arange(len(prompt), len(prompt) + canvas, device=device)[None]
        sc = torch.zeros((1, canvas, vocab), device=device, dtype=hf.embedding_dtype(model))
        fwd_times, _ = timed(lambda: hf.decoder_forward(model, cache, tokens, positions, None, sc), device,
                             args.repeats * 2)
    out["forward_ms"] = statistics.median(fwd_times)

    # engine / model.generate at identical tokens (plain canvas, the reference's draws)
    prompt_t = torch.tensor([prompt], device=device)

    def generate():
        torch.manual_seed(3)
        with engine._inference():
            seq = model.generate(prompt_t, max_new_tokens=canvas, **sampling).sequences
        return seq[0, len(prompt):].tolist()

    gen_times, ref = timed(generate, device, args.repeats)
    eng_times, mine = timed(lambda: engine.infill_ids(prompt, max_new_tokens=canvas, seed=3, **sampling), device,
                            args.repeats)
    eos = set(model.generation_config.eos_token_id)
    ref_cut = next((ref[:i] for i, t in enumerate(ref) if t in eos), ref)
    out["identical"] = list(mine.ids) == ref_cut
    out["engine_over_generate"] = statistics.median(gen_times) / statistics.median(eng_times)  # throughput ratio

    # warm single-line infill with a 2,000-token prefix: 3 tokens typed between requests
    suffix = torch.randint(3, vocab, (16,), generator=gen).tolist()
    prefix = torch.randint(3, vocab, (args.prefix,), generator=gen).tolist()
    engine.infill_ids(prefix, suffix, max_new_tokens=32, seed=4, session="doc", **sampling)
    lat = []
    for _ in range(args.requests):
        prefix = prefix + torch.randint(3, vocab, (3,), generator=gen).tolist()
        sync(device)
        t0 = time.perf_counter()
        engine.infill_ids(prefix, suffix, max_new_tokens=32, seed=4, session="doc", **sampling)
        sync(device)
        lat.append((time.perf_counter() - t0) * 1000)
    out["single_line_p50_ms"], out["single_line_p95_ms"] = percentile(lat, 50), percentile(lat, 95)

    # compiled / eager step
    if args.compile:
        compiled = Engine(model, settings=Settings(compile_step=True, max_prefix_tokens=window))
        c_times, c_done = timed(lambda: compiled.infill_ids(prompt, max_new_tokens=canvas, seed=2, **sampling),
                                device, args.repeats)
        out["compiled_step_ms"] = statistics.median(c_times) / c_done.steps
        out["compiled_identical"] = c_done.ids == done.ids
        compiled.close()
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    out["weights_bytes"] = q.storage_bytes(model)[0]
    engine.close()  # its caches go now, not when its idle scheduler thread ends: the next section counts free memory
    return out


def report(f: dict, planned: int | None) -> None:
    print(f"== {f['label']}")
    print(f"  canvas tokens/s            {f['canvas_tok_s']:10.1f}   (anchor: {ANCHOR_TOKS:,.0f}+ tok/s on one H100)")
    print(f"  warm single-line infill    p50 {f['single_line_p50_ms']:.1f} ms   p95 {f['single_line_p95_ms']:.1f} ms")
    print(f"  engine step / forward      {f['step_ms']:.2f} ms / {f['forward_ms']:.2f} ms = "
          f"{f['step_ms'] / f['forward_ms']:.2f}")
    print(f"  engine / model.generate    {f['engine_over_generate']:.2f}  (identical tokens: "
          f"{'yes' if f['identical'] else 'NO'}; anchor: vLLM {ANCHOR_VLLM:.0f} tok/s end to end at FP8, batch 1)")
    if "compiled_step_ms" in f:
        print(f"  compiled / eager step      {f['compiled_step_ms'] / f['step_ms']:.2f}  (identical tokens: "
              f"{'yes' if f['compiled_identical'] else 'NO'})")
    peak = plan._gb(f["peak_bytes"]) if f["peak_bytes"] is not None else "n/a (CPU)"
    plan_text = f"; plan: {plan._gb(planned)}" if planned else ""
    print(f"  weights / peak memory      {plan._gb(f['weights_bytes'])} / {peak}{plan_text}")


# ------------------------------------------------------------------ issue 25: concurrent single-line requests
class StepLog:
    """The engine's observer (`Engine.observer`, what `dg-edit serve`'s metrics read): each decoder forward
    the scheduler ran and how many requests it carried. Called from the scheduler's thread."""

    def __init__(self):
        self.forwards = 0  # decoder forwards that gave logits, counting up
        self.requests = 0  # requests those forwards carried, summed
        self.max_requests = 0  # most requests one forward carried
        self.max_rows = 0  # most canvas rows one forward carried

    def on_step(self, rows: int, requests: int, seconds: float, queue_depth: int) -> None:
        self.forwards += 1
        self.requests += requests
        self.max_requests = max(self.max_requests, requests)
        self.max_rows = max(self.max_rows, rows)

    def on_admit(self, waited_seconds: float) -> None:
        pass  # Done.waited_ms carries each request's wait


def documents(tokenizer, n: int, prefix_tokens: int) -> list[tuple[str, str]]:
    """`n` (prefix, suffix) pairs cut from different places of this repository's own source: each prefix
    about `prefix_tokens` tokens, ending inside a line that has text (a single-line request), the suffix
    the rest of that line and the lines after it."""
    corpus = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "dg_edit").glob("*.py")))
    sample = corpus[:20000]
    span = int(prefix_tokens * len(sample) / len(tokenizer.encode(sample, add_special_tokens=False)))
    while len(corpus) < n * (span + 2000):
        corpus += corpus
    docs = []
    for i in range(n):
        line_start = corpus.rfind("\n", 0, i * (len(corpus) - span - 2000) // n + span) + 1
        while True:  # the cursor: the middle of the first line with text at or after the prefix's end
            line = corpus[line_start:corpus.index("\n", line_start)]
            if len(line.strip()) >= 4:
                break
            line_start += len(line) + 1
        indent = len(line) - len(line.lstrip())
        cursor = line_start + indent + len(line.strip()) // 2
        start = max(0, cursor - span)
        docs.append((corpus[start:cursor], corpus[cursor:cursor + 400]))
    return docs


def closed_loop(engine: Engine, docs: list[tuple[str, str]], sessions: list[str], requests: int, typed_from: int,
                sampling: dict) -> tuple[list[float], list, float]:
    """Each document's client sends `requests` single-line requests one after another, from its own thread,
    all starting together; request k's prefix has `TYPED` typed (typed_from + k) times. (Client-side
    latencies in ms, the `Done`s, wall seconds.)"""
    start = threading.Barrier(len(docs) + 1)
    latencies: list[float] = []
    answers: list = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        prefix, suffix = docs[i]
        try:
            start.wait()
            for k in range(requests):
                t0 = time.perf_counter()
                done = engine.infill(prefix + TYPED * (typed_from + k), suffix, single_line=True, session=sessions[i],
                                     seed=1000 * i + k, **sampling)
                latencies.append((time.perf_counter() - t0) * 1000)
                answers.append(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(len(docs))]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return latencies, answers, wall


def concurrent_phase(engine: Engine, docs: list[tuple[str, str]], args, sampling: dict, slots: int) -> dict:
    """One engine's figures: its warm single-line request alone, then `len(docs) - 1` of them at once.

    Warm document sessions, as in an editor: each client's document was encoded by its previous request
    (or idle prefill), so a request encodes only the chunk that typing changed, and its time is its
    denoising steps, which are what batching shares. Cold 2,000-token prefixes would measure the
    encoder instead, which runs per request (a chunk per step between the batched forwards)."""
    n = len(docs) - 1
    clients, sessions = docs[:n], [f"client{i}:doc" for i in range(n)]  # one client each: fair admission
    # Warm-up, untimed: every session encodes its document once; the batch shapes run once.
    closed_loop(engine, clients, sessions, 1, 0, sampling)
    closed_loop(engine, docs[n:], ["alone:doc"], 1, 0, sampling)
    alone, _, _ = closed_loop(engine, docs[n:], ["alone:doc"], 2 * args.concurrent_requests, 1, sampling)
    log = StepLog()
    engine.observer = log
    latencies, answers, wall = closed_loop(engine, clients, sessions, args.concurrent_requests, 1, sampling)
    engine.observer = None
    p50, alone_p50 = percentile(latencies, 50), percentile(alone, 50)
    return {"batching": engine.settings.batching, "alone_p50_ms": alone_p50, "p50_ms": p50,
            "p95_ms": percentile(latencies, 95), "ratio": p50 / alone_p50,
            "wait_p50_ms": percentile([d.waited_ms for d in answers], 50),
            "requests_per_s": len(answers) / wall, "tokens_per_s": len(answers) * slots / wall,
            "prefix_tokens_p50": percentile([d.prefix_tokens for d in answers], 50),
            "encoded_p50": percentile([d.encoded for d in answers], 50),
            "max_requests_per_forward": log.max_requests, "max_rows_per_forward": log.max_rows,
            "mean_requests_per_forward": log.requests / max(1, log.forwards), "forwards": log.forwards}


def concurrent_figures(model, tokenizer, args, label: str, save, into: dict) -> dict:
    """Issue 25's figure: `--concurrent` warm single-line requests at once against one engine, batching on
    and then off (each its own engine over the same weights), each beside its own request alone. The
    figures go into `into` as they come, and `save` is called after each phase."""
    canvas = int(model.config.canvas_length)
    base = Settings()
    slots = min(base.single_line_tokens, canvas - base.suffix_head_tokens)  # one canvas (the tiny one is 32)
    rows_each = len(candidate_lengths(slots))  # a single-line request with a suffix: its candidate rows
    docs = documents(tokenizer, args.concurrent + 1, args.prefix)  # the last one runs alone
    window = int(args.prefix * 1.25) + 64  # the whole prefix stays inside the window (its estimate may be short)
    # every document stays warm: the cache budget holds all of them (on the 26B shape, 17 x 2,564 tokens ~ 10 GB)
    need = (args.concurrent + 1) * window * plan.kv_bytes_per_token(hf.text_config(model), model.dtype)
    cache_mb = max(base.cache_budget_mb, -(-need // (1 << 20)))
    settings = Settings(max_prefix_tokens=window, single_line_tokens=slots, cache_budget_mb=cache_mb,
                        idle_prefill=False, typed_ahead=False, batching=True, batch_rows=args.batch_rows)
    sampling = dict(max_denoising_steps=args.steps, confidence_threshold=1e-12)  # random weights: all steps run
    out = into
    out.update({"section": "concurrent", "label": label, "clients": args.concurrent,
                "requests_per_client": args.concurrent_requests, "slots": slots, "rows_per_request": rows_each,
                "steps": args.steps, "phases": []})
    print(f"== concurrent single-line infill: {label}, {args.concurrent} clients x {args.concurrent_requests} "
          f"requests (alone: {2 * args.concurrent_requests}), warm document sessions, ~{args.prefix:,}-token "
          f"prefixes, {slots}-slot canvas, {rows_each} candidate rows each", flush=True)
    engine = Engine(model, tokenizer, settings=settings)
    limit = engine.scheduler.batch_rows
    out["rows_limit"] = limit
    print(f"  admitted rows per forward  {limit} ({'Settings.batch_rows' if args.batch_rows else 'as many as fit: `dg-edit plan`'}); "
          f"{args.concurrent} requests need {args.concurrent * rows_each}", flush=True)
    if limit < args.concurrent * rows_each:
        print(f"  !! only {limit // rows_each} of {args.concurrent} requests fit one forward: the rest wait their turn "
              "(--batch-rows sets the limit)", flush=True)
    for batching in (True, False):
        if not batching:
            off = engine.with_settings(dataclasses.replace(settings, batching=False))
            engine.close()
            engine = off
            gc.collect()
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        phase = concurrent_phase(engine, docs, args, sampling, slots)
        out["phases"].append(phase)
        save()
        print(f"  batching {'on ' if batching else 'off'}: p50 {phase['p50_ms']:.1f} ms, alone {phase['alone_p50_ms']:.1f} "
              f"ms, ratio {phase['ratio']:.2f}, most requests in one forward {phase['max_requests_per_forward']}",
              flush=True)
    engine.close()
    return out


def report_concurrent(f: dict) -> bool:
    """Print the section's figures, batching on and off side by side; whether batching was measured."""
    on, off = f["phases"]
    n = f["clients"]

    def row(name: str, key: str, fmt: str) -> None:
        print(f"  {name:34}{format(on[key], fmt):>14}{format(off[key], fmt):>14}")

    print(f"  {'':34}{'batching on':>14}{'batching off':>14}")
    row("one request alone, p50 (ms)", "alone_p50_ms", ".1f")
    row(f"{n} concurrent, p50 (ms)", "p50_ms", ".1f")
    row(f"{n} concurrent, p95 (ms)", "p95_ms", ".1f")
    row(f"p50({n}) / p50(alone)", "ratio", ".2f")
    row("queue wait p50 (ms)", "wait_p50_ms", ".1f")
    row("requests/s", "requests_per_s", ".2f")
    row(f"tokens/s ({f['slots']} slots per request)", "tokens_per_s", ".1f")
    row("most requests in one forward", "max_requests_per_forward", "d")
    row("mean requests per forward", "mean_requests_per_forward", ".2f")
    row("prefix tokens p50", "prefix_tokens_p50", "d")
    row("tokens encoded per request p50", "encoded_p50", "d")
    print(f"  target: p50({n}) / p50(alone) <= {TARGET_CONCURRENT:g} with batching on: "
          f"{'met' if on['ratio'] <= TARGET_CONCURRENT else 'NOT met'} ({on['ratio']:.2f}; batching off "
          f"{off['ratio']:.2f}); throughput on / off {on['requests_per_s'] / off['requests_per_s']:.2f}x")
    print("  (tokens/s counts each request's single-line canvas: random weights write no real line)")
    batched = on["max_requests_per_forward"] > 1
    if not batched:
        print(f"  !!!!!! NOT MEASURING BATCHING: no decoder forward carried more than one request "
              f"(most: {on['max_requests_per_forward']}); the ratio above is not issue 25's figure !!!!!!")
    return batched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: the same code, in seconds")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20, help="warm single-line requests for p50/p95")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", default="none,int8,fp8,nf4", help="comma list; those whose library is "
                                                                        "missing are reported and skipped")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS)}; concurrent runs for the first --quantize only")
    parser.add_argument("--concurrent", type=int, default=16, help="concurrent single-line requests (clients)")
    parser.add_argument("--concurrent-requests", type=int, default=4,
                        help="requests per client, one after another (one request alone: twice as many)")
    parser.add_argument("--batch-rows", type=int, default=0,
                        help="Settings.batch_rows for the concurrent section (0: as many as fit)")
    parser.add_argument("--json", default="", help="also write the figures here (after each variant and phase)")
    args = parser.parse_args(argv)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if not sections or sections - set(SECTIONS):
        parser.error(f"--sections takes a comma list of {', '.join(SECTIONS)}")
    if "concurrent" in sections and (args.concurrent < 2 or args.concurrent_requests < 1):
        parser.error("--concurrent must be at least 2 and --concurrent-requests at least 1")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on the GPU machine, or use --tiny", file=sys.stderr)
        return 2
    hf.check_transformers()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench/gpu.py: {'tiny config' if args.tiny else '26B-A4B architecture (random weights)'} on {name}, "
          f"torch {torch.__version__}, {args.steps} steps per canvas, {time.strftime('%Y-%m-%d')}", flush=True)
    results: list[dict] = []

    def save() -> None:
        """Write what has been measured so far (atomically): a run cut short still leaves its numbers."""
        if args.json:
            path = Path(args.json)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(partial, path)

    batched = True
    methods = [m.strip() for m in args.quantize.split(",") if m.strip()]
    for method in methods:
        try:
            q.check_available(method)
        except ValueError as e:
            print(f"== {method}: skipped: {e}")
            continue
        model = None
        label = f"{method} ({str(dtype).replace('torch.', '')})"
        try:
            model = build(args.tiny, str(device), dtype)
            q.quantize_in_place(method, model)
            if "figures" in sections:
                planned = None
                if device.type == "cuda":
                    planned = plan.make_plan(model.config, dtype=dtype, quantize=method, device=str(device), rows=1,
                                             prefix_tokens=args.prefix).total_bytes
                f = figures(model, args, label)
                report(f, planned)
                results.append({"section": "figures", **f})
                save()
            if "concurrent" in sections and method == methods[0]:
                tokenizer = tiny_tokenizer(min(512, model.config.get_text_config().vocab_size))
                results.append({"section": "concurrent", "label": label, "phases": []})  # saved as it fills
                results[-1] = concurrent_figures(model, tokenizer, args, label, save, into=results[-1])
                batched = report_concurrent(results[-1])
                save()
        except (ImportError, RuntimeError, NotImplementedError) as e:  # one variant failing must not cost the rest
            if args.tiny:
                raise  # on the CI path a failure is a defect, not a missing GPU kernel
            print(f"== {method}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save()
    return 0 if batched else 1


if __name__ == "__main__":
    raise SystemExit(main())
