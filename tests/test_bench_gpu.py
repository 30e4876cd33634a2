"""bench/gpu.py --tiny: the GPU benchmark's code path, run on a CPU so that it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_benchmark_runs_on_a_cpu_with_a_tiny_config():
    quantize = ["none"] + [m for m, lib in (("int8", "torchao"), ("fp8", "torchao"), ("nf4", "bitsandbytes"))
                           if __import__("importlib").util.find_spec(lib)]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--steps", "3", "--requests", "3",
                        "--repeats", "1", "--prefix", "100", "--no-compile", "--quantize", ",".join(quantize)],
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    for method in quantize:
        assert f"== {method} " in r.stdout
    for figure in ("canvas tokens/s", "warm single-line infill", "engine step / forward", "engine / model.generate",
                   "weights / peak memory"):
        assert r.stdout.count(figure) == len(quantize)
    # the engine reproduces model.generate token for token, quantized or not
    assert r.stdout.count("identical tokens: yes") == len(quantize)
