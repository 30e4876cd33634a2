/**
 * Next-edit suggestions: the edit the server predicts the user will make next, near the cursor.
 *
 * Once the editor has been quiet for `dgEdit.nextEditDelayMs` after a change, the extension asks
 * the server with `textDocument/copilotInlineEdit` (VS Code's proposed inline-edit API is closed to
 * published extensions, so this is drawn with decorations): the text the edit replaces is struck
 * through, the new text follows it. The context key `dgEdit.nextEditVisible` lets `Tab` run
 * `dgEdit.acceptNextEdit` (one edit, then the server's `command` is run) and `Escape`
 * `dgEdit.dismissNextEdit`. Any change to the document, or another editor, clears it, and an answer
 * for a version of the document that is gone is never shown or applied.
 */
import * as vscode from "vscode";
import type { LanguageClient } from "vscode-languageclient/node";

import { draftLabel } from "./canvas";
import { nextEditSettings } from "./settings";

export const METHOD = "textDocument/copilotInlineEdit";
const CONTEXT_KEY = "dgEdit.nextEditVisible";

/** One edit of the server's answer (positions in UTF-16, as VS Code's). */
export interface InlineEdit {
  range: { start: { line: number; character: number }; end: { line: number; character: number } };
  text: string;
  textDocument: { uri: string; version: number };
  command?: { title: string; command: string; arguments?: unknown[] } | null;
}

interface Shown {
  editor: vscode.TextEditor;
  version: number;
  range: vscode.Range;
  edit: InlineEdit;
}

export class NextEditView implements vscode.Disposable {
  private readonly oldText = vscode.window.createTextEditorDecorationType({
    backgroundColor: new vscode.ThemeColor("diffEditor.removedTextBackground"),
    textDecoration: "line-through",
  });
  private readonly newText = vscode.window.createTextEditorDecorationType({
    after: {
      backgroundColor: new vscode.ThemeColor("diffEditor.insertedTextBackground"),
      margin: "0 0 0 0.5em",
    },
  });
  private shown: Shown | undefined;
  private timer: NodeJS.Timeout | undefined;
  private request: vscode.CancellationTokenSource | undefined;
  private readonly subscriptions: vscode.Disposable[] = [];

  constructor(
    private readonly client: () => LanguageClient | undefined,
    private readonly log: vscode.LogOutputChannel,
  ) {
    this.subscriptions.push(
      vscode.workspace.onDidChangeTextDocument((e) => {
        if (e.contentChanges.length === 0) return;
        const editor = vscode.window.activeTextEditor;
        if (this.shown?.editor.document === e.document || editor?.document === e.document) this.dismiss();
        if (editor?.document === e.document && nextEditSettings().enabled) this.schedule(editor);
      }),
      vscode.window.onDidChangeActiveTextEditor(() => this.dismiss()),
    );
  }

  /** The suggestion on screen (for the commands and for tests through the log). */
  get current(): Shown | undefined {
    return this.shown;
  }

  private schedule(editor: vscode.TextEditor): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.suggest(editor), nextEditSettings().delayMs);
  }

  /** Ask the server for the next edit at `editor`'s cursor and show the first one. */
  async suggest(editor: vscode.TextEditor | undefined = vscode.window.activeTextEditor): Promise<boolean> {
    this.dismiss();
    const client = this.client();
    if (!editor || !client?.isRunning()) return false;
    const document = editor.document;
    const version = document.version;
    const request = new vscode.CancellationTokenSource();
    this.request = request;
    const params = {
      textDocument: { uri: client.code2ProtocolConverter.asUri(document.uri), version },
      position: client.code2ProtocolConverter.asPosition(editor.selection.active),
    };
    let result: { edits?: InlineEdit[] } | null;
    try {
      result = await client.sendRequest<{ edits?: InlineEdit[] } | null>(METHOD, params, request.token);
    } catch (err) {
      if (!request.token.isCancellationRequested) {
        this.log.warn(`next-edit suggestion failed: ${err instanceof Error ? err.message : String(err)}`);
      }
      return false;
    } finally {
      if (this.request === request) this.request = undefined;
      request.dispose();
    }
    const edit = result?.edits?.[0];
    if (request.token.isCancellationRequested || !edit || document.version !== version ||
        edit.textDocument.version !== version || vscode.window.activeTextEditor !== editor) {
      return false; // nothing to suggest, or for a text (or an editor) that is gone
    }
    const range = client.protocol2CodeConverter.asRange(edit.range);
    if (!range.isEmpty) editor.setDecorations(this.oldText, [range]);
    editor.setDecorations(this.newText, [{
      range: new vscode.Range(range.end, range.end),
      renderOptions: { after: { contentText: draftLabel(edit.text) || "∅" } },
    }]);
    this.shown = { editor, version, range, edit };
    void vscode.commands.executeCommand("setContext", CONTEXT_KEY, true);
    this.log.info(`next-edit suggestion shown: ${JSON.stringify({ range: edit.range, text: edit.text, version })}`);
    return true;
  }

  /** Apply the suggestion (one edit), then run its command. False when none is shown or it is stale. */
  async accept(): Promise<boolean> {
    const shown = this.shown;
    this.dismiss();
    if (!shown || shown.editor.document.version !== shown.version) return false;
    const applied = await shown.editor.edit((b) => b.replace(shown.range, shown.edit.text));
    if (!applied) return false;
    const command = shown.edit.command;
    if (command) await vscode.commands.executeCommand(command.command, ...(command.arguments ?? []));
    return true;
  }

  /** Move the cursor to the start of the suggestion and show it. */
  jump(): boolean {
    const shown = this.shown;
    if (!shown) return false;
    shown.editor.selection = new vscode.Selection(shown.range.start, shown.range.start);
    shown.editor.revealRange(shown.range, vscode.TextEditorRevealType.InCenterIfOutsideViewport);
    return true;
  }

  /** Clear the suggestion, stop the timer and cancel the request in flight. */
  dismiss(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.request?.cancel();
    if (this.shown) {
      this.shown.editor.setDecorations(this.oldText, []);
      this.shown.editor.setDecorations(this.newText, []);
      this.shown = undefined;
      void vscode.commands.executeCommand("setContext", CONTEXT_KEY, false);
    }
  }

  dispose(): void {
    this.dismiss();
    this.oldText.dispose();
    this.newText.dispose();
    this.subscriptions.forEach((d) => d.dispose());
  }
}
