/**
 * Live refinement: each `dgEdit/canvas` notification carries the draft of one denoising step.
 *
 * The draft is drawn as a ghost decoration after the cursor so the user sees the text settle,
 * and the status bar counts the steps. A draft for an older document version than the one on
 * screen is dropped: it describes text that no longer exists. `done` (or a keystroke, or a
 * quiet period) clears the decoration; the final text arrives as the normal inline suggestion.
 */
import * as vscode from "vscode";

/** Payload of the server's `dgEdit/canvas` notification. */
export interface CanvasParams {
  uri: string;
  version: number;
  requestId: string | number;
  step: number;
  text: string;
  done: boolean;
  kind?: string; // "next_edit": the draft of a rewritten window (nextEdit.ts shows the result), not ghost text
}

const MAX_SHOWN = 80; // characters of the draft shown inline
const STALE_MS = 3000; // a draft with no follow-up for this long is cleared

/** Turn a multi-line draft into one decoration line ("⏎" marks the line breaks). */
export function draftLabel(text: string): string {
  const oneLine = text.replace(/\r?\n/g, " ⏎ ");
  return oneLine.length > MAX_SHOWN ? oneLine.slice(0, MAX_SHOWN - 1) + "…" : oneLine;
}

export class CanvasView implements vscode.Disposable {
  private readonly decoration = vscode.window.createTextEditorDecorationType({
    after: {
      color: new vscode.ThemeColor("editorGhostText.foreground"),
      fontStyle: "italic",
    },
    rangeBehavior: vscode.DecorationRangeBehavior.ClosedClosed,
  });
  private shownIn: vscode.TextEditor | undefined;
  private staleTimer: NodeJS.Timeout | undefined;
  private readonly subscriptions: vscode.Disposable[] = [];

  constructor(private readonly status: vscode.StatusBarItem) {
    // Typing or moving the cursor makes any draft on screen stale.
    this.subscriptions.push(
      vscode.workspace.onDidChangeTextDocument((e) => {
        if (this.shownIn && e.document === this.shownIn.document) this.clear();
      }),
      vscode.window.onDidChangeTextEditorSelection((e) => {
        if (e.textEditor === this.shownIn && e.kind !== undefined) this.clear();
      }),
    );
  }

  /** Handle one notification. */
  update(params: CanvasParams): void {
    if (params.kind === "next_edit") return;
    const editor = vscode.window.visibleTextEditors.find((e) => e.document.uri.toString() === params.uri);
    if (!editor || editor.document.version !== params.version) return; // stale or not on screen
    if (params.done) {
      this.status.text = `$(check) dg-edit`;
      this.status.tooltip = `dg-edit: draft settled after ${params.step} step(s)`;
      this.clear();
      return;
    }
    this.status.text = `$(sync~spin) dg-edit step ${params.step}`;
    this.status.tooltip = "dg-edit: refining the draft";
    if (!vscode.workspace.getConfiguration("dgEdit").get<boolean>("showCanvas", true)) return;
    const at = editor.selection.active;
    editor.setDecorations(this.decoration, [
      { range: new vscode.Range(at, at), renderOptions: { after: { contentText: draftLabel(params.text) } } },
    ]);
    this.shownIn = editor;
    clearTimeout(this.staleTimer);
    this.staleTimer = setTimeout(() => this.clear(), STALE_MS);
  }

  clear(): void {
    clearTimeout(this.staleTimer);
    this.shownIn?.setDecorations(this.decoration, []);
    this.shownIn = undefined;
  }

  dispose(): void {
    this.clear();
    this.decoration.dispose();
    this.subscriptions.forEach((d) => d.dispose());
  }
}
