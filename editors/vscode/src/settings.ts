/**
 * VS Code settings (`dgEdit.*`) -> the server's configuration (`dg_edit.config.Settings` keys).
 *
 * Only settings the user actually set are sent: the defaults live in one place, the server's
 * `Settings` dataclass, so an unset `dgEdit.maxNewTokens` means "the server's default", never a
 * second copy of it here.
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

// VS Code setting name -> Settings key. Extend together with package.json's contributes.configuration.
const SERVER_KEYS: ReadonlyArray<[string, string]> = [
  ["model", "model"],
  ["maxNewTokens", "max_new_tokens"],
  ["candidates", "candidates"],
  ["languages", "languages"],
  ["sampling", "sampling"],
];

/** The `Settings` mapping sent as initializationOptions and in workspace/didChangeConfiguration. */
export function serverSettings(): Record<string, unknown> {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const out: Record<string, unknown> = {};
  for (const [name, key] of SERVER_KEYS) {
    const value = cfg.get<unknown>(name);
    if (value === null || value === undefined || value === "") continue;
    if (key === "sampling" && typeof value === "object" && Object.keys(value as object).length === 0) continue;
    out[key] = value;
  }
  return out;
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
