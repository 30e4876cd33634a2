"""Helpers shared by the fuzz modules (a plain module, so that tests can import it by name)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck
from hypothesis import strategies as st

# deadline=None: every example talks to a real server (timing varies with the machine's load);
# derandomize: CI runs the same examples each time, so a failure reproduces from the log.
HYPOTHESIS = dict(deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def examples(n: int) -> int:
    """The example budget for a test: `n` times DG_EDIT_FUZZ_SCALE (default 1)."""
    return max(1, int(n * float(os.environ.get("DG_EDIT_FUZZ_SCALE", "1"))))


# ---------------------------------------------------------------------------------------------- strategies
# Text the way editors and attackers produce it: any code point, lone surrogates, combining marks,
# bidi controls, NUL, and sometimes long.
any_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.sampled_from(["", "\ud800", "a\udfffb", "e\u0301\u0301", "\U0001F600" * 3, "\u202e", "\x00", "\r\n\r",
                     "<script>alert(1)</script>", "x" * 5000]),
)
huge_int = st.one_of(st.integers(-3, 64), st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1,
                                                            10**30, -10**30]))
numbers = st.one_of(huge_int, st.floats(allow_nan=False), st.sampled_from([1e308, -1e308, 1e-320, 0.5]))
leaf = st.one_of(st.none(), st.booleans(), numbers, any_text)
json_values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(any_text, inner, max_size=4)),
                           max_leaves=12)
field_value = st.one_of(leaf, st.lists(leaf, max_size=2), st.dictionaries(st.text(max_size=3), leaf, max_size=2))
