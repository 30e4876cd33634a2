"""The training corpus: the CPython standard library of the running interpreter.

Split by file, deterministically: a file is in validation when the first 8 bytes of the
SHA-256 of its path relative to the stdlib root, read as an integer, fall in the lowest
2% (``VALID_PERMILLE`` / 1000).  Only ``.py`` files that decode as UTF-8 are used;
``site-packages`` (third-party code) and ``__pycache__`` are excluded.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

VALID_PERMILLE = 20  # ~2% of files go to validation
EXCLUDE_DIRS = {"site-packages", "__pycache__", "dist-packages"}


@dataclass(frozen=True)
class SourceFile:
    rel: str  # path relative to the stdlib root, '/'-separated
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return f"CPython {platform.python_version()} ({sys.version.split()[0]}, {platform.python_implementation()})"


def is_validation(rel: str) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
    return (h % 1000) < VALID_PERMILLE


def iter_files(root: Path | None = None) -> list[SourceFile]:
    """All usable .py files of the stdlib, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    out: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            try:
                text = p.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # e.g. lib2to3 / test data deliberately in other encodings
            if not text.strip():
                continue
            out.append(SourceFile(rel, text))
    out.sort(key=lambda f: f.rel)
    return out


def split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_validation(f.rel)]
    valid = [f for f in files if is_validation(f.rel)]
    return train, valid
