"""bench/gpu.py --tiny: the GPU benchmark's code path, run on a CPU so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_benchmark_runs_on_a_cpu_with_a_tiny_config(tmp_path):
    quantize = ["none"] + [m for m, lib in (("int8", "torchao"), ("fp8", "torchao"), ("nf4", "bitsandbytes"))
                           if __import__("importlib").util.find_spec(lib)]
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--steps", "3", "--requests", "3",
                        "--repeats", "1", "--prefix", "100", "--no-compile", "--quantize", ",".join(quantize),
                        "--concurrent", "16", "--concurrent-requests", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for method in quantize:
        assert f"== {method} " in r.stdout
    for figure in ("canvas tokens/s", "warm single-line infill", "engine step / forward", "engine / model.generate",
                   "weights / peak memory"):
        assert r.stdout.count(figure) == len(quantize)
    # the engine reproduces model.generate token for token, quantized or not
    assert r.stdout.count("identical tokens: yes") == len(quantize)

    # issue 25's figure, for the first variant only: 16 concurrent single-line requests against one engine
    assert r.stdout.count("== concurrent single-line infill") == 1
    for figure in ("admitted rows per forward", "one request alone, p50", "16 concurrent, p50", "16 concurrent, p95",
                   "p50(16) / p50(alone)", "requests/s", "tokens/s", "most requests in one forward",
                   "target: p50(16) / p50(alone) <= 2 with batching on"):
        assert figure in r.stdout, figure
    assert "NOT MEASURING BATCHING" not in r.stdout
    results = json.loads(out.read_text())
    # written as it goes: the first variant's figures, its concurrent section, then the other variants
    assert [f["section"] for f in results] == ["figures", "concurrent"] + ["figures"] * (len(quantize) - 1)
    concurrent = results[1]
    assert concurrent["label"].startswith("none") and concurrent["clients"] == 16
    on, off = concurrent["phases"]
    assert on["batching"] is True and off["batching"] is False
    # batching really happened: one decoder forward carried several requests' canvases (else the ratio is not
    # issue 25's figure), and with batching off none did
    assert on["max_requests_per_forward"] > 1, on
    assert off["max_requests_per_forward"] == 1, off
    assert concurrent["rows_limit"] >= 16 * concurrent["rows_per_request"]
    for phase in (on, off):
        assert phase["p50_ms"] > 0 and phase["alone_p50_ms"] > 0 and phase["requests_per_s"] > 0
        assert phase["ratio"] == pytest.approx(phase["p50_ms"] / phase["alone_p50_ms"])
        assert phase["encoded_p50"] < phase["prefix_tokens_p50"]  # warm sessions: typing re-encodes a chunk only
