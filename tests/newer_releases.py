"""Print a NOTICE when the registry has a torch or transformers that pyproject.toml's bounds leave out.

Why: transformers has an upper bound (dg_edit/hf_adapter.py drives its internals), so a new release
is refused until someone tests it and moves the bound. CI (.ci/run) calls this on every run so the
next move is never a surprise. torch has only a lower bound; its newest release is printed beside
the one CI runs, with a NOTICE when README "Supported versions" does not record a one-off check of it.

Never fails: no network, no pip, an odd answer -> one line saying so, exit 0. Quick: one
`pip index versions` per package, each with a timeout.

Usage: python tests/newer_releases.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

WATCHED = ("transformers", "torch")
CI_TORCH = "2.13.0"  # tests/run.sh installs this CPU wheel at both ends
TIMEOUT_S = 30


def newest_release(package: str) -> str:
    """The newest final release the configured registry lists, via pip's own client; raises on failure."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check",
                           "--retries", "1", "--timeout", "10"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", proc.stdout, re.MULTILINE | re.IGNORECASE)
    if proc.returncode != 0 or match is None:
        last = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise RuntimeError(last)
    return match.group(1)


def bounds(pyproject: Path) -> dict[str, str]:
    """package -> its specifier in pyproject.toml's runtime dependencies, for the watched packages."""
    out = {}
    for line in tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", line)
        if m and m.group(1).lower() in WATCHED:
            out[m.group(1).lower()] = m.group(2).strip()
    return out


def torch_row(readme: Path) -> str:
    """The torch line of README's "Supported versions" table (the one-off checks name their versions)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    return next((line for line in text.splitlines() if line.startswith("| torch |")), "")


def main() -> int:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        print("[newer_releases] NOTICE: packaging is not installed here; registry check skipped")
        return 0
    root = Path(__file__).resolve().parents[1]
    specs = bounds(root / "pyproject.toml")
    for package in WATCHED:
        spec = specs.get(package, "")
        try:
            newest = newest_release(package)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"[newer_releases] NOTICE: could not ask the registry about {package} ({e}); check skipped")
            continue
        if not SpecifierSet(spec).contains(newest, prereleases=True):
            print(f"[newer_releases] NOTICE: {package} {newest} is out and pyproject.toml admits {package}{spec}: "
                  f"test it (README, \"Supported versions\") and move the bound")
        elif package == "torch" and Version(newest) > Version(CI_TORCH) and newest not in torch_row(root / "README.md"):
            print(f"[newer_releases] NOTICE: torch {newest} is out (admitted: {package}{spec}; CI runs {CI_TORCH}) and "
                  f"README \"Supported versions\" records no check of it: run the one-off check described there")
        else:
            print(f"[newer_releases] {package} {newest} is the newest release; admitted by {package}{spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
