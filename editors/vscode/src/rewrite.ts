/**
 * "dg-edit: Rewrite Selection": ask for an optional instruction, then run the server's
 * `dg-edit.rewrite` command. The server applies the result itself with workspace/applyEdit as a
 * TextDocumentEdit naming the version it read (the one our didChange sent just before), so a
 * rewrite never lands on text that changed while the model was working: VS Code rejects it.
 */
import * as vscode from "vscode";
import { ExecuteCommandRequest, LanguageClient } from "vscode-languageclient/node";

export const REWRITE_COMMAND = "dg-edit.rewrite";

export async function rewriteSelection(client: LanguageClient | undefined): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!client || !client.isRunning()) {
    void vscode.window.showErrorMessage("dg-edit: the language server is not running (see “dg-edit: Show Server Log”).");
    return;
  }
  if (!editor || editor.selection.isEmpty) {
    void vscode.window.showInformationMessage("dg-edit: select the code to rewrite first.");
    return;
  }
  const instruction = await vscode.window.showInputBox({
    title: "dg-edit: Rewrite Selection",
    prompt: "Instruction (optional): leave empty to let the model rewrite the selection freely",
    placeHolder: "e.g. use a list comprehension",
  });
  if (instruction === undefined) return; // Escape: the user changed their mind

  const document = editor.document;
  const args: Record<string, unknown> = {
    uri: client.code2ProtocolConverter.asUri(document.uri),
    range: client.code2ProtocolConverter.asRange(editor.selection),
  };
  if (instruction.trim()) args.instruction = instruction.trim();

  await vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title: "dg-edit: rewriting the selection", cancellable: true },
    async (_progress, token) => {
      try {
        await client.sendRequest(ExecuteCommandRequest.type, { command: REWRITE_COMMAND, arguments: [args] }, token);
      } catch (err) {
        if (token.isCancellationRequested) return;
        void vscode.window.showErrorMessage(`dg-edit: rewrite failed: ${err instanceof Error ? err.message : String(err)}`);
      }
    },
  );
}
