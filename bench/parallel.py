"""--parallel on the CPU: 2 ranks against 1, measured side by side in one run.

Correctness is the point here; 2 ranks on one CPU share its cores and add a gloo all-reduce per layer,
so they are expected to be slower, not faster. On GPUs the same launch spreads the weights (memory) and
the matmuls (time) over devices; that figure needs GPUs and is not measured by this script.

(a) texts: N requests (a third with a suffix, so candidate lengths; a third multi-block) through
    `dg-edit infill --json`, in one process and under `torchrun --nproc-per-node 2 ... --parallel tp`
    (and `ep`): how many texts differ from one process's.
(b) time per denoising step (sum of each reply's ms over its steps), ratio 2 ranks / 1 rank; the
    settings alternate in rounds, so load on the machine drifts over all of them alike.
(c) first-step logits of K prompts: max |sharded - unsharded| (run under torchrun by this script itself).

    OMP_NUM_THREADS=1 python bench/parallel.py [--requests 100 --hidden 128 --layers 4 --vocab 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def requests(n: int) -> list[dict]:
    heads = ["def add(a, b):\n    return ", "import os\n\nPATH = ", "class Config:\n    def __init__(self):\n",
             "for i in range(10):\n    ", "x = [", "# parse the file\nwith open(name) as f:\n    "]
    out = []
    for i in range(n):
        r: dict = {"id": i, "prefix": heads[i % len(heads)], "seed": 1000 + i}
        if i % 3 == 1:
            r["suffix"] = "\n\nprint(result)\n"
        elif i % 3 == 2:
            r["max_new_tokens"] = 40  # several canvases
        out.append(r)
    return out


def run_cli(command: list[str], lines: list[dict], timeout: float) -> tuple[list[dict], float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(command, input="".join(json.dumps(r) + "\n" for r in lines), capture_output=True,
                          text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:8])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines()], wall


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def ms_per_step(replies: list[dict]) -> float:
    return sum(r["ms"] for r in replies) / max(sum(r["steps"] for r in replies), 1)


def logits_worker(model_dir: str, mode: str, prompts: int) -> int:
    """Under torchrun: first-step logits sharded (every rank) and unsharded (rank 0), for `prompts` prompts."""
    import torch
    import torch.distributed as dist

    from dg_edit import hf_adapter as hf
    from dg_edit.engine import Engine
    from dg_edit.loading import LoadOptions
    from dg_edit.prefix_cache import encode_prefix

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = Engine.load(model_dir, options=LoadOptions(parallel=(mode, world)))
    plain = Engine.load(model_dir) if rank == 0 else None
    worst = 0.0
    flips = 0
    for k, r in enumerate(requests(prompts)):
        ids = [sharded.bos_id, *sharded.tokenizer.encode(r["prefix"], add_special_tokens=False)]
        width = sharded.canvas_length
        canvas = torch.randint(0, sharded.vocab_size, (1, width), generator=torch.Generator().manual_seed(k))
        position_ids = torch.arange(len(ids), len(ids) + width)[None]
        out = []
        for engine in (sharded, plain):
            if engine is None:
                continue
            with torch.inference_mode():
                cache, _ = encode_prefix(engine.model, ids)
                masks = hf.decoder_masks(engine.model, cache, 1, width, None)
                out.append(hf.decoder_forward(engine.model, cache, canvas, position_ids, masks).float())
        if rank == 0:
            worst = max(worst, (out[0] - out[1]).abs().max().item())
            flips += int((out[0].argmax(-1) != out[1].argmax(-1)).sum())
    if rank == 0:
        print(json.dumps({"max_abs_logit_diff": worst, "argmax_flips": flips}), flush=True)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--modes", default="tp,ep")
    parser.add_argument("--rounds", type=int, default=4, help="settings alternate in this many rounds")
    parser.add_argument("--logits-worker", nargs=3, metavar=("DIR", "MODE", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.logits_worker:
        model_dir, mode, prompts = args.logits_worker
        return logits_worker(model_dir, mode, int(prompts))

    from dg_edit.testing import save_tiny_model_dir

    with tempfile.TemporaryDirectory(prefix="dg-edit-bench-parallel-") as tmp:
        model_dir = save_tiny_model_dir(
            Path(tmp) / "model", seed=0, vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers,
            canvas_length=args.canvas, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
            sliding_window=128)
        import torch

        from dg_edit.engine import Engine

        n_params = sum(p.numel() for p in Engine.load(str(model_dir)).model.parameters())
        print(f"random DiffusionGemma: {n_params / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} "
              f"layers, vocab {args.vocab}, canvas {args.canvas}; {args.requests} requests; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs; torch "
              f"{torch.__version__}")
        lines = requests(args.requests)
        timeout = 60.0 + 10.0 * args.requests
        modes = args.modes.split(",")
        commands = {"1 process": [sys.executable, "-m", "dg_edit.cli", "infill", "--json", "--model", str(model_dir)]}
        for mode in modes:
            commands[f"2 ranks, {mode}"] = torchrun(2, "-m", "dg_edit.cli", "infill", "--json", "--parallel", mode,
                                                    "--model", str(model_dir))
        # Rounds of each setting in turn, so that the machine's load drifts over all of them alike.
        replies: dict[str, list[dict]] = {name: [] for name in commands}
        size = -(-len(lines) // args.rounds)
        for start in range(0, len(lines), size):
            for name, command in commands.items():
                replies[name] += run_cli(command, lines[start:start + size], timeout)[0]
        one = replies["1 process"]
        base = ms_per_step(one)
        print(f"1 process      : {base:7.2f} ms/step, {sum(r['steps'] for r in one)} steps")
        for mode in modes:
            two = replies[f"2 ranks, {mode}"]
            differ = sum(a.get("text") != b.get("text") for a, b in zip(one, two))
            step = ms_per_step(two)
            print(f"2 ranks, {mode}   : {step:7.2f} ms/step (x{step / base:.2f} of 1 process), texts differing "
                  f"{differ}/{len(lines)}")
            probe = subprocess.run(torchrun(2, __file__, "--logits-worker", str(model_dir), mode, "20"),
                                   capture_output=True, text=True, timeout=timeout)
            if probe.returncode != 0:
                raise SystemExit(f"logits probe failed:\n{probe.stderr[-3000:]}")
            stats = json.loads(probe.stdout.strip().splitlines()[-1])
            print(f"   first-step logits, 20 prompts: max |sharded - one process| {stats['max_abs_logit_diff']:.2e}, "
                  f"argmax flips {stats['argmax_flips']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
