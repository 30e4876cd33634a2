"""Helpers shared by the fuzz modules (a plain module, so that tests can import it by name)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck

# deadline=None: every example talks to a real server (timing varies with the machine's load);
# derandomize: CI runs the same examples each time, so a failure reproduces from the log.
HYPOTHESIS = dict(deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def examples(n: int) -> int:
    """The example budget for a test: `n` times DG_EDIT_FUZZ_SCALE (default 1)."""
    return max(1, int(n * float(os.environ.get("DG_EDIT_FUZZ_SCALE", "1"))))
