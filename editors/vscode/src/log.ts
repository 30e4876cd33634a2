/**
 * The "dg-edit" log channel, remembering the server's last stderr lines so a failed start can
 * quote the server's own error (e.g. "model directory not found") in the message the user sees.
 */
import * as readline from "node:readline";
import type { Readable } from "node:stream";
import * as vscode from "vscode";

const KEEP_LINES = 20;

export class ServerLog implements vscode.Disposable {
  readonly channel = vscode.window.createOutputChannel("dg-edit", { log: true });
  private tail: string[] = [];

  /** `LanguageClientOptions.stdioOptions`: stderr goes to the channel and to the tail. */
  readonly stdioOptions = {
    stdout: (input: Readable, out: vscode.LogOutputChannel) => this.lines(input, (l) => out.info(l)),
    stderr: (input: Readable, out: vscode.LogOutputChannel) =>
      this.lines(input, (l) => {
        this.tail = [...this.tail, l].slice(-KEEP_LINES);
        out.error(l);
      }),
  };

  private lines(input: Readable, onLine: (line: string) => void): void {
    readline.createInterface({ input, crlfDelay: Infinity, terminal: false }).on("line", onLine);
  }

  /** The last `n` non-empty stderr lines, joined with " | ". */
  lastLines(n: number): string {
    return this.tail
      .map((l) => l.trim())
      .filter((l) => l)
      .slice(-n)
      .join(" | ");
  }

  clearTail(): void {
    this.tail = [];
  }

  show(): void {
    this.channel.show(true);
  }

  dispose(): void {
    this.channel.dispose();
  }
}
