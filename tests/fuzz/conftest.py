"""Shared by the fuzz modules: example counts, recorded per test and reported at the end of the run.

Each fuzz module drives ONE long-lived real server (websocket service, language server, `dg-edit
infill --json`) with hypothesis examples. The counts are part of what the README reports, so every
test records how many examples it really sent (`fuzz_count(n)`), and the terminal summary prints
them (also written to artifacts/fuzz-counts.json, which is git-ignored).

`DG_EDIT_FUZZ_SCALE` (default 1) multiplies every test's example budget: CI runs the default
(~2-3 minutes for the whole fuzz suite); a long local run can use 10.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

_COUNTS: Counter = Counter()
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture
def fuzz_count(request):
    """Call with how many inputs this test sent; summed per test id."""
    name = request.node.nodeid

    def record(n: int = 1) -> None:
        _COUNTS[name] += n

    return record


def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    terminalreporter.section("fuzz inputs sent (per test)")
    for name, n in sorted(_COUNTS.items()):
        terminalreporter.write_line(f"{n:7d}  {name}")
    terminalreporter.write_line(f"{sum(_COUNTS.values()):7d}  total")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz-counts.json").write_text(json.dumps(dict(_COUNTS), indent=1))
