"""Settings from `initializationOptions` and `workspace/didChangeConfiguration`.

Both carry the keys of `dg_edit.config.Settings` (snake_case, e.g. `max_new_tokens`, `candidates`,
`languages`, `model`), either flat or under a `"dgEdit"` section; sampling names such as
`max_denoising_steps` may sit at the top level. They are read with `Settings.from_dict` on top of the
command line's settings (for didChangeConfiguration: on top of the command line plus
initializationOptions, so each change replaces the previous change), so the defaults have one
source and unknown keys are reported. A bad
configuration is shown to the user (`window/showMessage`) and the previous settings stay in force.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lsprotocol import types

from dg_edit.config import Settings

from . import prefill
from .engine_host import EngineUnavailable
from .state import DgEditServer

SECTION = "dgEdit"


def parse(options: Any, base: Settings) -> Settings:
    """Settings from an options object (flat or under "dgEdit"); raises ValueError with the reason."""
    if options is None:
        return base
    if isinstance(options, dict) and isinstance(options.get(SECTION), dict):
        options = options[SECTION]
    return Settings.from_dict(options, base=base)


def _apply(ls: DgEditServer, options: Any, source: str) -> bool:
    try:
        settings = parse(options, ls.base_settings)
    except ValueError as e:
        message = f"dg-edit: ignoring invalid {source}: {e}"
        ls.log(message, types.MessageType.Error)
        ls.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=message))
        return False
    ls.settings = settings
    ls.forget_results()  # computed with other settings
    ls.host.start(settings)  # loads, reloads (other model) or re-wraps (other windows) as needed
    prefill.schedule_all(ls)  # a new engine starts with empty caches
    return True


def on_initialize(ls: DgEditServer, params: types.InitializeParams) -> None:
    """Read initializationOptions and start loading the model (the answer does not wait for it)."""
    if _apply(ls, params.initialization_options, "initializationOptions"):
        ls.base_settings = ls.settings  # later configuration changes apply on top of these
    if not ls.host.started:
        ls.host.start(ls.settings)
    asyncio.ensure_future(report_load(ls))


async def report_load(ls: DgEditServer) -> None:
    """Tell the user when the model is ready, or why it is not (the server keeps running either way)."""
    try:
        engine = await ls.host.get()
    except EngineUnavailable as e:
        ls.log(e.message, types.MessageType.Error)
        ls.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=e.message))
        return
    ls.log(f"dg-edit: model {engine.name} ready ({ls.host.load_ms or 0:.0f} ms)")


async def on_change_configuration(ls: DgEditServer, params: types.DidChangeConfigurationParams) -> None:
    """Pushed settings are applied; an empty push from a pull-model client makes us ask for "dgEdit"."""
    if params.settings not in (None, {}):
        _apply(ls, params.settings, "configuration")
        return
    workspace = ls.client_capabilities.workspace
    if workspace is None or not workspace.configuration:
        return
    items = await ls.workspace_configuration_async(
        types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)]))
    if items and items[0] is not None:
        _apply(ls, items[0], "configuration")


def register(server: DgEditServer) -> None:
    server.feature(types.INITIALIZE)(on_initialize)
    server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(on_change_configuration)
