"""The VS Code extension's server settings (`contributes.configuration` in package.json), written from
`dg_edit.config.Settings`, the one source of dg-edit's defaults.

Every `Settings` key the language server reads becomes `dgEdit.<camelCase>` with the same default,
its type and the description from the Settings table; the extension (src/settings.ts) sends the ones
the user set, under their Settings names, as initializationOptions and didChangeConfiguration.
Keys of the websocket service only (`SERVICE_ONLY`) are left out. tests/test_vscode_settings.py fails
when package.json and Settings differ; then run:

    python editors/vscode/settings_schema.py --write
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from dg_edit.config import Settings

PACKAGE = Path(__file__).resolve().parent / "package.json"
SECTION = "dgEdit"
# `dg-edit serve` settings: the language server never reads them.
SERVICE_ONLY = ("host", "port", "max_message_bytes", "max_inflight")
# Settings of the extension itself (how to start the server, what to draw): not Settings keys.
CLIENT_ONLY = ("command", "args", "serverArgs", "showCanvas", "nextEdit", "nextEditDelayMs", "trace.server")


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.capitalize() for part in rest)


def descriptions() -> dict[str, str]:
    """`what for` of each row of the table in Settings' docstring."""
    out = {}
    for line in (Settings.__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("key", "---"):
            for key in cells[0].split(" / "):
                out[key.strip()] = cells[2]
    return out


def schema_for(key: str, default: Any, description: str) -> dict[str, Any]:
    if isinstance(default, bool):
        kind: dict[str, Any] = {"type": "boolean"}
    elif isinstance(default, int):
        kind = {"type": "integer"}
    elif isinstance(default, float):
        kind = {"type": "number"}
    elif isinstance(default, str):
        kind = {"type": "string"}
    elif isinstance(default, tuple):
        kind = {"type": "array", "items": {"type": "string"}}
        default = list(default)
    else:
        kind = {"type": "object"}
        default = dict(default)
    text = description[0].upper() + description[1:] if description else key
    text = re.sub(r"\s+", " ", text)
    return {**kind, "default": default,
            "markdownDescription": f"{text}. (`{key}` in `dg_edit.config.Settings`; sent only when set here.)"}


def server_properties() -> dict[str, dict[str, Any]]:
    """`dgEdit.*` properties for the Settings keys, in Settings' order."""
    about = descriptions()
    defaults = Settings()
    return {f"{SECTION}.{camel(f.name)}": schema_for(f.name, getattr(defaults, f.name), about.get(f.name, ""))
            for f in dataclasses.fields(Settings) if f.name not in SERVICE_ONLY}


def updated_package(package: dict[str, Any]) -> dict[str, Any]:
    """package.json with its server properties replaced by `server_properties()` (client ones kept, first
    the launch settings, then the server's, then the rest)."""
    properties = package["contributes"]["configuration"]["properties"]
    client = {k: v for k, v in properties.items() if k.removeprefix(f"{SECTION}.") in CLIENT_ONLY}
    launch = {k: v for k, v in client.items() if k.removeprefix(f"{SECTION}.") in ("command", "args", "serverArgs")}
    rest = {k: v for k, v in client.items() if k not in launch}
    out = json.loads(json.dumps(package))
    out["contributes"]["configuration"]["properties"] = {**launch, **server_properties(), **rest}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite package.json (default: report a difference)")
    args = parser.parse_args(argv)
    current = json.loads(PACKAGE.read_text(encoding="utf-8"))
    wanted = updated_package(current)
    if current == wanted:
        print("package.json matches dg_edit.config.Settings")
        return 0
    if args.write:
        PACKAGE.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {PACKAGE}")
        return 0
    print("package.json differs from dg_edit.config.Settings; run with --write", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
