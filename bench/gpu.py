"""The real model's shape on one GPU: one command, figures beside their anchors.

Builds google/diffusiongemma-26B-A4B-it's architecture from tests/fixtures/diffusiongemma-26b-a4b
with random bf16 weights directly on the GPU (no download, no checkpoint), then prints:

  canvas tokens/s (256 slots, --steps denoising steps)      anchor: 1,000+ tok/s on one H100
  warm single-line infill p50/p95, 2,000-token prefix
  engine step / bare decoder forward (time)
  engine / model.generate at identical tokens               anchor: vLLM 895 tok/s end to end, FP8, batch 1
  compiled / eager step (Settings.compile_step)
  peak GPU memory                                           plan: `dg-edit plan` figure beside it
and the same for each quantization that runs there (quantized in place: `dg_edit.quantize`).

Random weights never become confident, so every canvas runs all --steps steps (the release's own
figures stop after ~20): the rates are per canvas of `--steps` steps.

    python bench/gpu.py                 # on the GPU machine (see README, "GPU benchmark")
    python bench/gpu.py --tiny          # the same code on a CPU with a tiny config (CI: tests/test_bench_gpu.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dg_edit import Engine, hf_adapter as hf, plan, quantize as q
from dg_edit.config import Settings
from dg_edit.prefix_cache import encode_prefix

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusiongemma-26b-a4b"
ANCHOR_TOKS = 1000.0  # tok/s on one H100 (the release's figure)
ANCHOR_VLLM = 895.0  # tok/s end to end, FP8, batch 1 (vLLM)


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
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    out["weights_bytes"] = q.storage_bytes(model)[0]
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
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on the GPU machine, or use --tiny", file=sys.stderr)
        return 2
    hf.check_transformers()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench/gpu.py: {'tiny config' if args.tiny else '26B-A4B architecture (random weights)'} on {name}, "
          f"torch {torch.__version__}, {args.steps} steps per canvas, {time.strftime('%Y-%m-%d')}")
    results = []
    for method in [m.strip() for m in args.quantize.split(",") if m.strip()]:
        try:
            q.check_available(method)
        except ValueError as e:
            print(f"== {method}: skipped: {e}")
            continue
        model = None
        try:
            model = build(args.tiny, str(device), dtype)
            q.quantize_in_place(method, model)
            planned = None
            if device.type == "cuda":
                planned = plan.make_plan(model.config, dtype=dtype, quantize=method, device=str(device), rows=1,
                                         prefix_tokens=args.prefix).total_bytes
            f = figures(model, args, f"{method} ({str(dtype).replace('torch.', '')})")
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
        report(f, planned)
        results.append(f)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
