"""`dg-edit serve`: the network front end, a sibling of `dg_edit.lsp` and `dg_edit.tui`.

Modules: `protocol` (the websocket protocol: frames in, typed requests out), `gate` (who may
connect: token, Host, Origin), `outbox` (a slow websocket reader costs bounded memory) and `app`
(the service itself and `main()` for `dg-edit serve`). The core (engine, sampler, canvas, caches,
config, events) knows nothing of any of them.
"""
