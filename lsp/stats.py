"""`dgEdit/stats`: counters, the engine's state and recent per-request records.

The benchmark (bench/lsp.py) reads the prefix-cache metric from here: each completed inline
completion record has `encoded` (prefix tokens the encoder processed for that request) and
`prefix_tokens` (the windowed prefix length), so `encoded / prefix_tokens` is the share re-encoded.
"""

from __future__ import annotations

from typing import Any

from .state import DgEditServer

STATS = "dgEdit/stats"


def stats(ls: DgEditServer, params: Any = None) -> dict[str, Any]:
    out = ls.stats.to_json()
    out["engine"] = ls.host.info()
    out["settings"] = ls.settings.to_dict()
    out["inflight"] = sum(len(v) for v in ls.inflight.values())
    return out


def register(server: DgEditServer) -> None:
    server.feature(STATS)(stats)
