"""Metadata-only wheels, so pip's resolver can be asked what `pip install dg-edit` does to a venv.

Why: the question "does installing dg-edit replace the torch a GPU user already has?" is answered by
pip's resolver from metadata alone (names, versions, Requires-Dist). Real torch wheels are gigabytes;
these wheels hold nothing but a dist-info, build in milliseconds, and install without a network.
`dg_edit_requirements` reads pyproject.toml itself, so the answer follows any edit of a bound.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement


def fake_wheel(folder: Path, name: str, version: str, requires: list[str] = (), extras: list[str] = ()) -> Path:
    """Write `name-version-py3-none-any.whl` holding only METADATA, WHEEL and RECORD; return its path."""
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"
    info = f"{stem}.dist-info"
    metadata = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Provides-Extra: {extra}" for extra in extras]
    metadata += [f"Requires-Dist: {line}" for line in requires]
    files = {
        f"{info}/METADATA": "\n".join(metadata) + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: dg-edit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def dg_edit_requirements(pyproject: Path) -> list[Requirement]:
    """The runtime dependencies pyproject.toml declares, as pip reads them."""
    return [Requirement(line) for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def lower_bound(req: Requirement) -> str:
    """The `>=` version of a requirement (every runtime dependency of dg-edit has one: tests/deps.py)."""
    return next(s.version for s in req.specifier if s.operator == ">=")


def fake_index(folder: Path, pyproject: Path, extra_torch: list[str]) -> None:
    """A find-links folder: dg-edit 0.0.0 with pyproject's requirements, each of them at its lower bound,
    and torch also at each version in `extra_torch` (the releases pip may be tempted to swap in)."""
    folder.mkdir(parents=True, exist_ok=True)
    reqs = dg_edit_requirements(pyproject)
    fake_wheel(folder, "dg-edit", "0.0.0", [str(r) for r in reqs])
    for req in reqs:
        fake_wheel(folder, req.name, lower_bound(req), extras=sorted(req.extras))
    for version in extra_torch:
        fake_wheel(folder, "torch", version)
