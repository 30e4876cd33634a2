"""Reading and saving the file the TUI edits, without ever losing it.

Loading turns every way a path can be unusable (missing, a directory, binary, not UTF-8, unreadable)
into a `FileProblem` with a sentence a person can act on. Saving is atomic: the text goes to a
temporary file in the same folder, is fsynced, gets the old file's mode and replaces the file with
`os.replace`, so a crash leaves either the old file or the new one, never half of each. A
`Fingerprint` taken at load time lets the editor notice that someone else changed the file since.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git and grep decide)


class FileProblem(Exception):
    """A path the editor cannot open as text. `kind` is missing, directory, binary, not_utf8 or unreadable."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Fingerprint:
    """What the file on disk looked like: enough to tell whether it changed since."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Loaded:
    text: str
    fingerprint: Fingerprint | None  # None: the file does not exist yet (a new file)


def fingerprint(path: str | Path) -> Fingerprint | None:
    """The current fingerprint of `path`, or None when there is no regular file there."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())


def changed_on_disk(path: str | Path, loaded: Fingerprint | None) -> bool:
    """True when the file differs from what was loaded (edited, replaced, deleted or newly created)."""
    now = fingerprint(path)
    if now is None or loaded is None:
        return now != loaded
    return now.sha256 != loaded.sha256 or now.size != loaded.size


def load_text(path: str | Path) -> Loaded:
    """Read `path` as UTF-8 text; raise `FileProblem` for anything that is not an editable text file."""
    p = Path(path)
    if p.is_dir():
        raise FileProblem("directory", f"{p} is a directory; open a file inside it instead")
    if not p.exists():
        if not p.parent.is_dir():
            raise FileProblem("unreadable", f"{p} does not exist and its folder {p.parent} does not either")
        raise FileProblem("missing", f"{p} does not exist")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileProblem("unreadable", f"cannot read {p}: {e.strerror or e}") from None
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise FileProblem("binary", f"{p} looks like a binary file (it contains NUL bytes); dg-edit edits text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileProblem("not_utf8", f"{p} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
                                      f"{e.start}); dg-edit only edits UTF-8 files") from None
    st = p.stat()
    fp = Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
    return Loaded(text=text, fingerprint=fp)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, text: str) -> Fingerprint:
    """Replace `path` with `text` (UTF-8) atomically, keeping its mode; returns the new fingerprint.

    A symlink is followed, so the link stays a link and its target gets the new text.
    """
    target = Path(os.path.realpath(path))
    data = text.encode("utf-8")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = _default_mode()
    else:
        # Replacing the file would succeed (the folder is writable), but a read-only file is the
        # user saying "do not change this": refuse, as other editors do, rather than overwrite it.
        if not mode & 0o222 or not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, f"{target.name} is read-only (mode {mode:o}); make it writable "
                                                "to save it")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".dg-edit-tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    st = target.stat()
    return Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX: fsync the directory entry)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not let a directory be opened; the data itself is already synced
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync on a directory is unsupported there; nothing more can be done
    finally:
        os.close(fd)
