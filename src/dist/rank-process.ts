// One rank of `tsep launch`: its wrapper process (rank-wrapper.ts), its prefixed output, its exit status.

import { type ChildProcess, spawn } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { LineSplitter } from './line-splitter.ts';

// Run from sources the wrapper is a .ts file; from the published build it is .js next to this module.
const WRAPPER = fileURLToPath(
  new URL(import.meta.url.endsWith('.ts') ? './rank-wrapper.ts' : './rank-wrapper.js', import.meta.url),
);

/** Stderr lines kept per rank for the failure summary. */
const TAIL_LINES = 20;

/** How one rank ended. `code`/`signal` are the command's own status, as the wrapper saw it. */
export interface RankExit {
  rank: number;
  localRank: number;
  /** Exit code, or null when a signal ended it. */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when the command could not be started (e.g. not found). */
  error?: string;
  /** The last stderr lines the rank wrote (terminators removed). */
  stderrTail: string[];
}

/** What to run for one rank and where its output goes. */
export interface RankSpec {
  rank: number;
  localRank: number;
  command: string;
  args: readonly string[];
  env: NodeJS.ProcessEnv;
  graceMs: number;
  stdout: Writable;
  stderr: Writable;
}

/** A running rank. `exited` resolves once it has exited and its output is flushed. */
export class RankProcess {
  readonly rank: number;
  readonly localRank: number;
  readonly exited: Promise<RankExit>;
  private readonly wrapper: ChildProcess;
  private commandPid: number | undefined;
  private running = true;

  constructor(spec: RankSpec) {
    this.rank = spec.rank;
    this.localRank = spec.localRank;
    // detached: the wrapper gets its own session, so a terminal's Ctrl-C reaches only the launcher, which
    // forwards it exactly once.
    this.wrapper = spawn(process.execPath, [WRAPPER, String(spec.graceMs), spec.command, ...spec.args], {
      stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
      env: spec.env,
      detached: true,
    });
    const prefix = Buffer.from(`[rank ${spec.rank}] `);
    const tail: string[] = [];
    const stdoutDone = prefixLines(this.wrapper.stdout!, spec.stdout, prefix);
    const stderrDone = prefixLines(this.wrapper.stderr!, spec.stderr, prefix, (line) => {
      tail.push(line.toString('utf8').replace(/[\r\n]+$/, ''));
      if (tail.length > TAIL_LINES) tail.shift();
    });
    const status = this.readStatus(this.wrapper.stdio[3] as Readable);
    this.exited = new Promise((resolve) => {
      const finish = (code: number | null, signal: NodeJS.Signals | null, error?: string): void =>
        resolve({
          rank: this.rank,
          localRank: this.localRank,
          code,
          signal,
          ...(error !== undefined ? { error } : {}),
          stderrTail: tail,
        });
      // Only a wrapper that never started (e.g. EAGAIN) ends here; a started one always closes.
      this.wrapper.once('error', (err) => {
        if (this.wrapper.pid !== undefined) return;
        this.running = false;
        finish(null, null, `could not start the rank wrapper: ${err.message}`);
      });
      this.wrapper.once('exit', () => {
        this.running = false;
        // A descendant that left the rank's process group could hold the pipes open forever; give the
        // output a moment to drain, then stop waiting for it.
        setTimeout(() => {
          for (const s of this.wrapper.stdio) s?.destroy();
        }, 2000).unref();
      });
      this.wrapper.once('close', async (code, signal) => {
        this.running = false;
        await Promise.all([stdoutDone, stderrDone]);
        // The wrapper's report is the command's own status; the wrapper's status stands in only when it
        // died before reporting (it was SIGKILLed).
        const reported = await status;
        if (reported) finish(reported.code, reported.signal, reported.error);
        else finish(code, signal);
      });
    });
  }

  /** Sends `signal` to the rank (the wrapper forwards it to the command's whole process group). */
  signal(signal: NodeJS.Signals): void {
    if (this.running) this.wrapper.kill(signal);
  }

  /** SIGKILLs the command's process group and the wrapper: the last resort after the grace period. */
  kill(): void {
    if (!this.running) return;
    if (this.commandPid !== undefined) {
      try {
        process.kill(-this.commandPid, 'SIGKILL');
      } catch {
        // ESRCH: already gone.
      }
    }
    this.wrapper.kill('SIGKILL');
  }

  /** Parses the wrapper's fd-3 messages; resolves with its final report, if it made one. */
  private readStatus(control: Readable): Promise<Report | undefined> {
    return new Promise((resolve) => {
      let report: Report | undefined;
      const lines = new LineSplitter((line) => {
        const msg = JSON.parse(line.toString('utf8')) as { pid?: number } & Report;
        if (msg.pid !== undefined) this.commandPid = msg.pid;
        else report = msg;
      });
      control.on('data', (chunk: Buffer) => lines.push(chunk));
      control.on('error', () => {});
      control.on('close', () => resolve(report));
    });
  }
}

interface Report {
  code: number | null;
  signal: NodeJS.Signals | null;
  error?: string;
}

/** Copies `from` to `to` line by line with `prefix`; resolves when `from` ends. */
function prefixLines(
  from: Readable,
  to: Writable,
  prefix: Buffer,
  onLine?: (line: Buffer) => void,
): Promise<void> {
  const lines = new LineSplitter((line) => {
    to.write(Buffer.concat([prefix, line]));
    onLine?.(line);
  });
  return new Promise((resolve) => {
    from.on('data', (chunk: Buffer) => lines.push(chunk));
    from.on('error', () => {});
    from.on('close', () => {
      lines.end();
      resolve();
    });
  });
}
