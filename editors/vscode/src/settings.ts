/**
 * VS Code settings (`dgEdit.*`) -> the server's configuration (`dg_edit.config.Settings` keys).
 *
 * Only settings the user actually set are sent: the defaults live in one place, the server's
 * `Settings` dataclass (package.json shows the same defaults, written from it), so an unset
 * `dgEdit.maxNewTokens` means "the server's default", never a second copy of it here.
 */
import * as vscode from "vscode";
import type { DocumentSelector } from "vscode-languageclient/node";

export const SECTION = "dgEdit";

/** How the server process is started: `<command> <args…> lsp <serverArgs…>`. */
export interface LaunchSettings {
  command: string;
  args: string[];
}

export function launchSettings(): LaunchSettings {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const command = cfg.get<string>("command") || "dg-edit";
  const args = [...(cfg.get<string[]>("args") ?? []), "lsp", ...(cfg.get<string[]>("serverArgs") ?? [])];
  return { command, args };
}

// Settings of the extension itself; every other `dgEdit.*` property in package.json is a key of
// `dg_edit.config.Settings` in camelCase (package.json is written from Settings by settings_schema.py,
// and tests/test_vscode_settings.py keeps the two equal).
const CLIENT_ONLY = new Set(["command", "args", "serverArgs", "showCanvas", "nextEdit", "nextEditDelayMs", "trace.server"]);

/** `maxNewTokens` -> `max_new_tokens`. */
export function settingsKey(name: string): string {
  return name.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());
}

/** The server's setting names (`dgEdit.` stripped) from the extension's package.json. */
export function serverSettingNames(packageJSON: { contributes?: { configuration?: { properties?: object } } }): string[] {
  const properties = Object.keys(packageJSON.contributes?.configuration?.properties ?? {});
  return properties
    .filter((p) => p.startsWith(SECTION + "."))
    .map((p) => p.slice(SECTION.length + 1))
    .filter((name) => !CLIENT_ONLY.has(name));
}

/**
 * The `Settings` mapping sent as initializationOptions and in workspace/didChangeConfiguration:
 * only the settings the user set (in any scope), so an unset one means the server's default.
 */
export function serverSettings(names: readonly string[]): Record<string, unknown> {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const out: Record<string, unknown> = {};
  for (const name of names) {
    const seen = cfg.inspect(name);
    const set = [seen?.globalValue, seen?.workspaceValue, seen?.workspaceFolderValue,
      seen?.globalLanguageValue, seen?.workspaceLanguageValue, seen?.workspaceFolderLanguageValue]
      .some((v) => v !== undefined);
    const value = cfg.get<unknown>(name);
    if (!set || value === null || value === undefined) continue;
    out[settingsKey(name)] = value;
  }
  return out;
}

/** The extension's own next-edit settings. */
export function nextEditSettings(): { enabled: boolean; delayMs: number } {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  return { enabled: cfg.get<boolean>("nextEdit") ?? true, delayMs: cfg.get<number>("nextEditDelayMs") ?? 500 };
}

/** Documents the client syncs: every file, or only the languages the user enabled. */
export function documentSelector(): DocumentSelector {
  const languages = vscode.workspace.getConfiguration(SECTION).get<string[] | null>("languages");
  const schemes = ["file", "untitled"];
  if (!languages || languages.length === 0 || languages.includes("*")) {
    return schemes.map((scheme) => ({ scheme }));
  }
  return languages.flatMap((language) => schemes.map((scheme) => ({ scheme, language })));
}

/** True when a configuration change needs a new server process (not just new settings). */
export function needsRestart(e: vscode.ConfigurationChangeEvent): boolean {
  return ["command", "args", "serverArgs", "languages"].some((k) => e.affectsConfiguration(`${SECTION}.${k}`));
}
