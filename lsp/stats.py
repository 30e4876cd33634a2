"""`dgEdit/stats`: counters, the engine's state and recent per-request records.

The benchmark (bench/lsp.py) reads the prefix-cache metric from here: each completed inline
completion record has `encoded` (prefix tokens the encoder processed for that request) and
`prefix_tokens` (the windowed prefix length), so `encoded / prefix_tokens` is the share re-encoded,
and `typed_ahead` (true: the rest of the previous answer, no model call, steps 0). `cache` is the
engine's `cache_info()`: bytes per token, budget, bytes held, documents (a list of {session: the
uri, strips, tokens, bytes}, least recently used first) and idle prefill (pending, running, encoded, passes, budget_full, error);
null while the model loads. `next_edit.history` is the engine's edit history of each open document
([{uri, edits: [{start, end, text, old_text, score}]}], characters; what didChange fed it), null while
the model loads; `next_edit.prepared_all` is true when no next-edit preparation is pending or running.
"""

from __future__ import annotations

from typing import Any

from . import next_edit
from .state import DgEditServer

STATS = "dgEdit/stats"


def stats(ls: DgEditServer, params: Any = None) -> dict[str, Any]:
    out = ls.stats.to_json()
    out["engine"] = ls.host.info()
    out["settings"] = ls.settings.to_dict()
    out["inflight"] = sum(len(v) for v in ls.inflight.values())
    engine = ls.host.loaded()
    out["cache"] = engine.cache_info() if engine is not None else None
    out["next_edit"] = {"history": next_edit.history(ls),
                        "prepared_all": engine.wait_next_edit_prepared(0) if engine is not None else None}
    return out


def register(server: DgEditServer) -> None:
    server.feature(STATS)(stats)
