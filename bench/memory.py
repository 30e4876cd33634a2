"""Step memory and time at the real width and vocabulary, measured side by side in one run.

A one-layer DiffusionGemma with the 26B-A4B's width (2816), vocabulary (262,144), attention and MLP
shapes, and a few experts (random weights, no download). It prints, for a plain canvas (reference
draws) and for a batch of candidate rows (clamped suffix, inverse-CDF draws):

(a) peak memory of one engine step / one bare decoder forward       goal <= 1.5
(b) engine step time / bare decoder forward time
(c) compiled step / eager step time (Settings.compile_step)
and the memory plan's step estimate beside the measured peak.

Peak memory is the process's resident high-water mark above what it held before the call (weights,
prefix cache), reset through /proc/self/clear_refs; on CUDA it is torch's max_memory_allocated.
Both sides count the self-conditioning logits a step reads.

    OMP_NUM_THREADS=2 python bench/memory.py [--slots 256 --rows 4 --steps 4 --compile]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from dg_edit import Engine, hf_adapter as hf
from dg_edit.config import Settings
from dg_edit.plan import step_bytes
from dg_edit.prefix_cache import encode_prefix
from dg_edit.testing import tiny_model


def real_width_model(vocab: int = 262_144, experts: int = 8, device: str = "cpu", dtype=torch.float32,
                     canvas_length: int = 256):
    """One full-attention layer shaped like the 26B-A4B's, with `experts` experts of 704 (top-2)."""
    model = tiny_model(seed=0, canvas_length=canvas_length, vocab_size=vocab, hidden_size=2816, layers=1,
                       intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       global_head_dim=512, num_global_key_value_heads=2, num_experts=experts, top_k_experts=2,
                       moe_intermediate_size=704, sliding_window=1024)
    return model.to(device=device, dtype=dtype)


class Peak:
    """Peak memory above the level at entry: resident high-water mark on a CPU, allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _status("VmHWM") - self.base
        return False


def _malloc_returns_big_blocks() -> None:
    """Make glibc serve every block of 64 KiB or more with its own mmap, returned on free, so that the
    resident high-water mark sees each tensor (by default freed blocks under 32 MiB stay in the heap)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(engine: Engine, prompt: list[int], *, rows: int, slots: int, steps: int, repeats: int) -> dict:
    """Bare forward and engine step, time and peak memory, for one layout."""
    model = engine.model
    device = model.device
    vocab = engine.vocab_size
    suffix = list(range(10, 26)) if rows > 1 else []
    lengths = [slots // (2 ** i) for i in range(rows)] if rows > 1 else None
    width = slots + len(suffix)
    kwargs = dict(max_denoising_steps=steps, confidence_threshold=1e-12, seed=1, session="bench")

    def request():
        if rows > 1:
            return engine._guarded(_request(engine, prompt, suffix, lengths, kwargs), with_steps=False)
        return iter([engine.infill_ids(prompt, max_new_tokens=slots, **kwargs)])

    list(request())  # warm: prefix cached, first-call costs paid
    times = []
    done = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = list(request())[-1]
        times.append((time.perf_counter() - t0) * 1000 / done.steps)
    with Peak(device) as step_peak:
        list(request())
    # the bare forward over the same canvas, reading the same cache, with self-conditioning logits
    with torch.inference_mode():
        cache, _ = encode_prefix(model, prompt)
        if rows > 1:
            hf.batch_repeat(cache, rows)
        canvas = torch.randint(0, vocab, (rows, width), device=device)
        positions = torch.arange(len(prompt), len(prompt) + width, dtype=torch.int32, device=device)[None]
        positions = positions.expand(rows, -1).contiguous()

        def forward(sc):
            return hf.decoder_forward(model, cache, canvas, positions, None, sc)

        forward(torch.randn(rows, width, vocab, device=device, dtype=hf.embedding_dtype(model)))
        fwd_times = []
        for _ in range(repeats):
            sc = torch.randn(rows, width, vocab, device=device, dtype=hf.embedding_dtype(model))
            t0 = time.perf_counter()
            forward(sc)
            fwd_times.append((time.perf_counter() - t0) * 1000)
            del sc
        with Peak(device) as fwd_peak:
            sc = torch.randn(rows, width, vocab, device=device, dtype=hf.embedding_dtype(model))
            out = forward(sc)
            del out, sc
    return dict(step_ms=statistics.median(times), forward_ms=statistics.median(fwd_times),
                step_peak=step_peak.bytes, forward_peak=fwd_peak.bytes, steps=done.steps, width=width)


def _request(engine: Engine, prompt: list[int], suffix: list[int], lengths, kwargs):
    request = engine._request_from_ids(prompt, suffix, max(lengths), kwargs["seed"], kwargs["session"],
                                       {k: v for k, v in kwargs.items() if k not in ("seed", "session")})
    request.lengths = sorted(lengths)
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4, help="candidate rows of the batched layout")
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the compiled step (slow to compile)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        _malloc_returns_big_blocks()

    model = real_width_model(args.vocab, device=args.device, canvas_length=args.slots)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"one-layer DiffusionGemma at the 26B-A4B width: {n_params / 1e9:.2f}B parameters, vocab {args.vocab:,}, "
          f"{torch.get_num_threads()} threads, {args.device}")
    prompt = torch.randint(3, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    engines = {"eager": Engine(model)}
    if args.compile:
        engines["compiled"] = Engine(model, settings=Settings(compile_step=True))
    for rows, slots, label in ((1, args.slots, "plain canvas, reference draws"),
                               (args.rows, args.slots, f"{args.rows} candidate rows + clamped suffix")):
        figures = {name: measure(e, prompt, rows=rows, slots=slots,
                                 steps=args.steps, repeats=args.repeats) for name, e in engines.items()}
        m = figures["eager"]
        planned = step_bytes(model.config, torch.float32, m["width"], rows, args.prompt)["total"]
        print(f"[{label}] {rows} x {m['width']} canvas, [B, L, V] float32 = {rows * m['width'] * args.vocab * 4 / 1e6:.0f} MB")
        print(f"  (a) peak: engine step {m['step_peak'] / 1e6:8.0f} MB   bare forward {m['forward_peak'] / 1e6:8.0f} MB"
              f"   step/forward = {m['step_peak'] / m['forward_peak']:.2f}   (goal <= 1.5; plan's step estimate "
              f"{planned / 1e6:.0f} MB)")
        print(f"  (b) time: engine step {m['step_ms']:8.1f} ms   bare forward {m['forward_ms']:8.1f} ms"
              f"   step/forward = {m['step_ms'] / m['forward_ms']:.2f}")
        if "compiled" in figures:
            c = figures["compiled"]
            print(f"  (c) compiled step {c['step_ms']:8.1f} ms   eager step {m['step_ms']:8.1f} ms"
                  f"   compiled/eager = {c['step_ms'] / m['step_ms']:.2f}   (compiled peak {c['step_peak'] / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
