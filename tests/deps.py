"""Pins for the oldest end of the supported range, read from pyproject.toml's lower bounds.

Why: the supported range is the tested range. `tests/run.sh --oldest` installs dg-edit with these
constraints into a fresh venv, so every lower bound in pyproject.toml is a release CI has run; moving
a bound is one commit that CI proves or refuses. Only the runtime dependencies whose interfaces the
project leans on are pinned (the rest resolve as usual).

torch is the exception: every torch but the 2.13.0 CPU wheel this machine kind has on disk is a
multi-GB CUDA download, so CI runs 2.13.0 at both ends and torch's lower bound (and its newest
release) is shown once, by hand, with the result recorded in README "Supported versions".

Usage: python tests/deps.py            # prints `name==lower` lines for pip's -c
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PINNED_AT_OLDEST = ("transformers", "tokenizers", "pygls", "lsprotocol", "websockets", "textual", "starlette",
                    "uvicorn", "accelerate")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*(.*)$")


def oldest_pins(pyproject: Path) -> list[str]:
    """`name==X` for each dependency in PINNED_AT_OLDEST whose pyproject line says `>=X`."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    pins = []
    for line in data["project"]["dependencies"]:
        m = _REQUIREMENT.match(line)
        if not m or m.group(1).lower() not in PINNED_AT_OLDEST:
            continue
        lower = re.search(r">=\s*([^,\s;]+)", m.group(2))
        if lower is None:
            raise SystemExit(f"pyproject.toml: {line!r} has no >= lower bound to test")
        pins.append(f"{m.group(1).lower()}=={lower.group(1)}")
    missing = set(PINNED_AT_OLDEST) - {p.split("==")[0] for p in pins}
    if missing:
        raise SystemExit(f"pyproject.toml lists no bounds for {', '.join(sorted(missing))}")
    return pins


def main() -> int:
    print("\n".join(oldest_pins(Path(__file__).resolve().parents[1] / "pyproject.toml")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
