// Starting `tsep launch` as a child process with its output collected, for the unit tests of the launcher
// and the multi-process GPU tests.

import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';

const MAIN = fileURLToPath(new URL('../../../src/cli/main.ts', import.meta.url));

export interface LaunchRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Wall time of the launcher process. */
  ms: number;
}

export interface StartedLaunch {
  pid: number;
  done: Promise<LaunchRun>;
  kill(signal: NodeJS.Signals): void;
}

/**
 * `node src/cli/main.ts launch ...launchArgs -- ...command`, with the store timeout `storeTimeoutS` and
 * `extraEnv` added to this process's environment.
 */
export function startLaunch(
  launchArgs: readonly string[],
  command: readonly string[],
  storeTimeoutS: number,
  extraEnv: NodeJS.ProcessEnv = {},
): StartedLaunch {
  const env: NodeJS.ProcessEnv = { ...process.env, TSEP_STORE_TIMEOUT_S: String(storeTimeoutS), ...extraEnv };
  delete env.NODE_TEST_CONTEXT; // the ranks are plain programs, not test files
  const started = performance.now();
  const child = spawn(process.execPath, [MAIN, 'launch', ...launchArgs, '--', ...command], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => {
    stdout += d;
  });
  child.stderr.on('data', (d: Buffer) => {
    stderr += d;
  });
  const done = new Promise<LaunchRun>((resolve) => {
    child.on('close', (code, signal) =>
      resolve({ code, signal, stdout, stderr, ms: performance.now() - started }),
    );
  });
  return { pid: child.pid!, done, kill: (s) => child.kill(s) };
}

/** A TCP port on 127.0.0.1 that was free a moment ago (for a launcher's --master-port). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}
