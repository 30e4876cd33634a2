"""`dg-edit serve`: the network front end, a sibling of `dg_edit.lsp` and `dg_edit.tui`.

Modules: `app` (the service and `main()` for `dg-edit serve`), `transport` (uvicorn: HTTP and
websockets on one port), `gate` (who may connect: token, Host, Origin), `ws` + `protocol` + `outbox`
(the websocket protocol; a slow reader costs bounded memory), `http_api` + `openai_api` +
`llama_api` + `errors` (the HTTP APIs editor tools speak), `runner` (the one place the engine is
called) and `page` (the demo page). The core (engine, sampler, canvas, caches, config, events)
knows nothing of any of them.
"""
