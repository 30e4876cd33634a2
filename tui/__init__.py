"""dg-edit's terminal editor (`dg-edit tui FILE`): infill and rewrite with the diffusion model,
watching the canvas refine as ghost text. Entry point: `dg_edit.tui.app.main`.

Modules: `app` (the Textual app: file, requests, keys), `editor` (TextArea with a pending-proposal
region), `ghost` (events to styled segments), `canvas_panel` (the canvas grid), `dialogs`, `status`,
`files` (loading and atomic saving), `remote` (`--connect` to a running `dg-edit serve`).
"""
