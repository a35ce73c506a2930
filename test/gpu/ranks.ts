// Multi-process GPU tests: which rank counts this machine can run (one GPU per rank), and running a
// fixture under `tsep launch` with its output collected.

import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Device } from '../../src/device/context.ts';
import { gpuSkip } from './gpu.ts';

const MAIN = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url));

export const visibleGpus = gpuSkip ? 0 : Device.count();

/** 2, 4 and all visible GPUs, the sizes worth testing here. */
export const rankCounts = [...new Set([2, 4, visibleGpus])].filter((r) => r >= 2).sort((a, b) => a - b);

/** False when `ranks` ranks can run here, else why not. */
export function skipFor(ranks: number): string | false {
  if (gpuSkip) return gpuSkip;
  if (visibleGpus < ranks) return `needs ${ranks} GPUs (one per rank); ${visibleGpus} visible`;
  return false;
}

export interface RankRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs `node <fixture> ...args` on `ranks` ranks through `tsep launch` with a job time limit. */
export function launchRanks(
  ranks: number,
  fixture: URL,
  args: readonly string[],
  timeoutS: number,
  extraEnv: NodeJS.ProcessEnv = {},
): Promise<RankRun> {
  const env: NodeJS.ProcessEnv = { ...process.env, TSEP_STORE_TIMEOUT_S: '60', ...extraEnv };
  delete env.NODE_TEST_CONTEXT; // the ranks are plain programs, not test files
  const launchArgs = ['launch', '-n', String(ranks), '--timeout', String(timeoutS), '--'];
  const child = spawn(
    process.execPath,
    [MAIN, ...launchArgs, process.execPath, fileURLToPath(fixture), ...args],
    {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => {
    stdout += d;
  });
  child.stderr.on('data', (d: Buffer) => {
    stderr += d;
  });
  return new Promise((resolve) => {
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** Output as TAP comment lines, so node:test prints it under the test. */
export function indent(text: string): string {
  return text
    .trimEnd()
    .split('\n')
    .map((l) => `#   ${l}`)
    .join('\n');
}
