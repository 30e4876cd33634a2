/**
 * dg-edit for VS Code: a thin client of `dg-edit lsp`.
 *
 * The language server does the work (inline completions, the rewrite command, progress);
 * vscode-languageclient wires its capabilities into VS Code. This file only starts and restarts
 * the server from the user's settings, drops answers for document versions that are gone,
 * animates the `dgEdit/canvas` drafts, and turns start-up failures into messages a user can act on.
 */
import * as vscode from "vscode";
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from "vscode-languageclient/node";

import { CanvasParams, CanvasView } from "./canvas";
import { ServerLog } from "./log";
import { NextEditView } from "./nextEdit";
import { rewriteSelection } from "./rewrite";
import {
  documentSelector,
  LaunchSettings,
  launchSettings,
  needsRestart,
  SECTION,
  serverSettingNames,
  serverSettings,
} from "./settings";

let client: LanguageClient | undefined;
let canvas: CanvasView | undefined;
let nextEdit: NextEditView | undefined;
let status: vscode.StatusBarItem;
let log: ServerLog;
let settingNames: string[] = []; // the Settings keys package.json exposes (camelCase)

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  log = new ServerLog();
  status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.name = "dg-edit";
  status.command = "dgEdit.showOutput";
  status.show();
  canvas = new CanvasView(status);
  nextEdit = new NextEditView(() => client, log.channel);
  settingNames = serverSettingNames(context.extension.packageJSON);
  context.subscriptions.push(
    log,
    status,
    canvas,
    nextEdit,
    vscode.commands.registerCommand("dgEdit.rewriteSelection", () => rewriteSelection(client)),
    vscode.commands.registerCommand("dgEdit.acceptNextEdit", () => nextEdit?.accept()),
    vscode.commands.registerCommand("dgEdit.dismissNextEdit", () => nextEdit?.dismiss()),
    vscode.commands.registerCommand("dgEdit.jumpToNextEdit", () => nextEdit?.jump()),
    vscode.commands.registerCommand("dgEdit.suggestNextEdit", () => nextEdit?.suggest()),
    vscode.commands.registerCommand("dgEdit.restartServer", () => restart()),
    vscode.commands.registerCommand("dgEdit.showOutput", () => log.show()),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (!e.affectsConfiguration(SECTION)) return;
      if (needsRestart(e)) void restart();
      else if (client?.isRunning()) {
        void client.sendNotification(DidChangeConfigurationNotification.type, { settings: serverSettings(settingNames) });
      }
    }),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await stop();
}

function setStatus(text: string, tooltip: string): void {
  status.text = text;
  status.tooltip = tooltip;
}

async function start(): Promise<void> {
  const launch = launchSettings();
  // No `transport`: languageclient would append `--stdio`; `dg-edit lsp` speaks stdio by default.
  const serverOptions: ServerOptions = { command: launch.command, args: launch.args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: documentSelector(),
    initializationOptions: serverSettings(settingNames),
    outputChannel: log.channel,
    stdioOptions: log.stdioOptions,
    middleware: {
      // Answers computed for an older version of the document describe text that is gone.
      async provideInlineCompletionItems(document, position, context, token, next) {
        const version = document.version;
        const result = await next(document, position, context, token);
        return document.version === version && !token.isCancellationRequested ? result : null;
      },
      async provideCompletionItem(document, position, context, token, next) {
        const version = document.version;
        const result = await next(document, position, context, token);
        return document.version === version && !token.isCancellationRequested ? result : null;
      },
    },
  };
  const next = new LanguageClient("dgEdit", "dg-edit", serverOptions, clientOptions);
  client = next;
  next.onDidChangeState((e) => {
    if (e.newState === State.Running) setStatus("$(sparkle) dg-edit", "dg-edit: language server running");
    if (e.newState === State.Stopped) setStatus("$(error) dg-edit", "dg-edit: language server stopped (click for the log)");
  });
  setStatus("$(loading~spin) dg-edit", "dg-edit: starting the language server");
  try {
    await next.start();
  } catch (err) {
    client = undefined;
    reportStartFailure(launch, err);
    return;
  }
  next.onNotification("dgEdit/canvas", (params: CanvasParams) => canvas?.update(params));
}

/** Explain why the server did not start, with the server's own last words when it printed any. */
function reportStartFailure(launch: LaunchSettings, err: unknown): void {
  const cmdline = [launch.command, ...launch.args].join(" ");
  setStatus("$(error) dg-edit", "dg-edit: language server failed to start (click for the log)");
  const reason = err instanceof Error ? err.message : String(err);
  const notFound = /ENOENT/.test(reason);
  const detail = notFound
    ? `“${launch.command}” was not found. Install dg-edit (pip install dg-edit) or set dgEdit.command to its full path.`
    : `“${cmdline}” stopped: ${log.lastLines(3) || reason}`;
  log.channel.error(detail);
  void vscode.window.showErrorMessage(`dg-edit: ${detail}`, "Open Settings", "Show Log").then((choice) => {
    if (choice === "Open Settings") void vscode.commands.executeCommand("workbench.action.openSettings", SECTION);
    if (choice === "Show Log") log.show();
  });
}

async function stop(): Promise<void> {
  const current = client;
  client = undefined;
  canvas?.clear();
  nextEdit?.dismiss();
  if (current?.needsStop()) await current.stop();
}

async function restart(): Promise<void> {
  await stop();
  log.clearTail();
  await start();
}
