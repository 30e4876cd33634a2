"""Engine overhead, measured side by side on one random DiffusionGemma in one run.

(a) engine tokens/s against `model.generate` at identical output        target >= 1.0
(b) engine time per denoising step over the bare decoder forward        target <= 1.10
(c) request after appending 10 tokens to a 2,000-token prefix vs cold   target <= 0.25 (prefill stage)

    OMP_NUM_THREADS=2 python bench/engine.py [--hidden 256 --layers 6 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dg_edit import Engine, hf_adapter as hf
from dg_edit.prefix_cache import CacheStore, encode_prefix
from dg_edit.testing import tiny_model


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time in ms over `repeats` runs (after one warm-up), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    model = tiny_model(seed=0, canvas_length=args.canvas, vocab_size=args.vocab, hidden_size=args.hidden,
                       layers=args.layers, sliding_window=512, num_attention_heads=4, head_dim=64,
                       global_head_dim=64)
    engine = Engine(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"random DiffusionGemma: {n_params / 1e6:.1f}M parameters, canvas {args.canvas}, "
          f"vocab {args.vocab}, {torch.get_num_threads()} threads")
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    new_tokens = args.canvas * 2

    # (a) identical output, tokens per second
    def run_generate():
        torch.manual_seed(1)
        return model.generate(prompt, max_new_tokens=new_tokens).sequences[0, args.prompt:].tolist()

    def run_engine():
        return engine.infill_ids(prompt[0].tolist(), max_new_tokens=new_tokens, seed=1)

    ms_ref, ref_ids = timed(run_generate, args.repeats)
    ms_eng, done = timed(run_engine, args.repeats)
    assert list(done.ids) == ref_ids[: len(done.ids)] and len(done.ids) == len(ref_ids), "outputs differ"
    ratio_a = ms_ref / ms_eng
    print(f"(a) generate {len(ref_ids) / ms_ref * 1000:8.1f} tok/s   engine {len(done.ids) / ms_eng * 1000:8.1f} tok/s"
          f"   engine/generate = {ratio_a:.3f}   (target >= 1.0, identical output: yes)")

    # (b) per-step cost: engine step (decoder + sampler + bookkeeping) over a bare decoder forward
    with torch.inference_mode():
        cache, _ = encode_prefix(model, prompt[0].tolist())
        canvas = torch.randint(0, args.vocab, (1, args.canvas))
        positions = torch.arange(args.prompt, args.prompt + args.canvas, dtype=torch.int32).unsqueeze(0)
        sc_logits = torch.randn(1, args.canvas, args.vocab)

        def bare_forward():
            return hf.decoder_forward(model, cache, canvas, positions, None, sc_logits)

        ms_fwd, _ = timed(bare_forward, args.repeats * 4)
    steps = 16

    for draw in ("multinomial", "inverse_cdf"):
        def engine_block():
            return engine.infill_ids(prompt[0].tolist(), max_new_tokens=args.canvas, seed=2, session="b",
                                     max_denoising_steps=steps, confidence_threshold=1e-9, draw=draw)

        engine_block()  # prefix now cached: the timed runs encode nothing
        ms_block, block = timed(engine_block, args.repeats)
        ms_step = ms_block / block.steps
        print(f"(b) bare decoder forward {ms_fwd:7.2f} ms   engine step ({draw:11}) {ms_step:7.2f} ms   "
              f"ratio = {ms_step / ms_fwd:.3f}   (target <= 1.10)")

    # (c) prefix cache: cold 2,000-token prefix vs the same + 10 appended tokens in a warm session
    long_prefix = torch.randint(3, args.vocab, (2000,), generator=torch.Generator().manual_seed(3)).tolist()
    extra = torch.randint(3, args.vocab, (10,), generator=torch.Generator().manual_seed(4)).tolist()

    chunk = engine.settings.prefix_chunk

    def cold_prefill():
        with torch.inference_mode():
            return encode_prefix(model, long_prefix + extra, None, chunk)

    store = CacheStore(1 << 40, chunk, engine.caches.bytes_per_token)
    with torch.inference_mode():
        store.encode(model, "c", "window", long_prefix)  # the document's strip, as a request leaves it
    base = store.strip("c", "window")

    def warm_prefill():
        with torch.inference_mode():
            return encode_prefix(model, long_prefix + extra, base, chunk)

    ms_cold, _ = timed(cold_prefill, args.repeats)
    ms_warm, (_, n_encoded) = timed(warm_prefill, args.repeats)

    def cold_request():
        fresh = Engine(model)
        return fresh.infill_ids(long_prefix + extra, max_new_tokens=args.canvas, seed=5, session="c",
                                max_denoising_steps=steps)

    def warm_request():
        engine.infill_ids(long_prefix, max_new_tokens=1, seed=5, session="c", max_denoising_steps=1)
        t0 = time.perf_counter()
        r = engine.infill_ids(long_prefix + extra, max_new_tokens=args.canvas, seed=5, session="c",
                              max_denoising_steps=steps)
        return (time.perf_counter() - t0) * 1000, r

    ms_cold_req, cold_r = timed(cold_request, args.repeats)
    warm_times = [warm_request() for _ in range(args.repeats)]
    ms_warm_req = statistics.median(t for t, _ in warm_times)
    assert warm_times[-1][1].ids == cold_r.ids, "cached and uncached results differ"
    print(f"(c) prefill of 2,010 tokens: cold {ms_cold:7.1f} ms   warm {ms_warm:6.1f} ms ({n_encoded} tokens encoded)"
          f"   ratio = {ms_warm / ms_cold:.3f}   (target <= 0.25)")
    print(f"    whole request ({steps} steps): cold {ms_cold_req:7.1f} ms   warm {ms_warm_req:7.1f} ms   "
          f"ratio = {ms_warm_req / ms_cold_req:.3f}   (identical output: yes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
