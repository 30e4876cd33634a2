"""Exceptions shared by the CLI and the front ends it dispatches to.

Kept out of `dg_edit.cli` so that `python -m dg_edit.cli` (where the CLI module is `__main__`) and
the front ends raising `UsageError` agree on one class.
"""


class UsageError(Exception):
    """A user mistake: reported on stderr with exit code 2."""
