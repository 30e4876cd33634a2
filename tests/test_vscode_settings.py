"""The VS Code extension exposes every Settings key the language server reads, with Settings' own
defaults, so the two cannot drift (package.json is written from Settings by
editors/vscode/settings_schema.py; this test fails when someone adds a Settings key and forgets it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

from dg_edit.config import SAMPLING_NAMES, Settings
from editor_tools import REPO

PACKAGE = REPO / "editors" / "vscode" / "package.json"
SETTINGS_TS = REPO / "editors" / "vscode" / "src" / "settings.ts"


def _schema():
    spec = importlib.util.spec_from_file_location("settings_schema", REPO / "editors" / "vscode" / "settings_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _properties() -> dict:
    return json.loads(PACKAGE.read_text())["contributes"]["configuration"]["properties"]


def _settings_key(name: str) -> str:
    """What src/settings.ts's `settingsKey` does: camelCase -> snake_case."""
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def test_package_json_is_written_from_settings():
    schema = _schema()
    package = json.loads(PACKAGE.read_text())
    assert schema.updated_package(package) == package, "run: python editors/vscode/settings_schema.py --write"


def test_every_language_server_setting_is_exposed_with_its_default():
    schema = _schema()
    server = {name.removeprefix("dgEdit."): spec for name, spec in _properties().items()
              if name.removeprefix("dgEdit.") not in schema.CLIENT_ONLY}
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {_settings_key(name) for name in server} == fields - set(schema.SERVICE_ONLY)
    defaults = Settings().to_dict()
    for name, spec in server.items():
        assert spec["default"] == defaults[_settings_key(name)], name
        assert spec["markdownDescription"].strip(), name
    # What the extension sends is what the server reads: every default, sent as it is, is valid.
    sent = {_settings_key(name): spec["default"] for name, spec in server.items()}
    assert Settings.from_dict(sent) == Settings()
    # A sampling name a user may put in dgEdit.sampling is a SamplingConfig name.
    assert Settings.from_dict({"sampling": {SAMPLING_NAMES[0]: 12}}).sampling == {SAMPLING_NAMES[0]: 12}


def test_the_extension_and_the_schema_agree_on_the_client_only_settings():
    # settings.ts reads the server settings' names from package.json minus its own CLIENT_ONLY set.
    match = re.search(r"const CLIENT_ONLY = new Set\(\[([^\]]*)\]\)", SETTINGS_TS.read_text())
    assert match, "CLIENT_ONLY not found in settings.ts"
    names = set(re.findall(r'"([^"]+)"', match.group(1)))
    assert names == set(_schema().CLIENT_ONLY)
    assert all(f"dgEdit.{name}" in _properties() for name in names)
