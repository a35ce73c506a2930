// GPU tests of the process group: `tsep launch` starts R ranks of test/gpu/fixtures/pg-peers.ts, one per
// GPU; each rank writes a seed- and rank-tagged pattern into every peer's symmetric buffer through the peer
// pointer table and checks what every peer wrote into its own, then checks NCCL allReduce, allToAll and
// allToAllv element by element (see the fixture for the details). R = 2, 4 and, where more GPUs are
// visible, all of them; a size needs that many GPUs. Fresh seed per run; TSEP_TEST_SEED replays one.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Device } from '../../src/device/context.ts';
import { gpuSkip, seededRandom } from './gpu.ts';

const MAIN = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url));
const FIXTURE = fileURLToPath(new URL('./fixtures/pg-peers.ts', import.meta.url));
/** The launcher's own bound on the job (it stops every rank and exits 124 after it). */
const JOB_TIMEOUT_S = 240;

const visible = gpuSkip ? 0 : Device.count();
const sizes = [...new Set([2, 4, visible])].filter((r) => r >= 2).sort((a, b) => a - b);

function skipFor(ranks: number): string | false {
  if (gpuSkip) return gpuSkip;
  if (visible < 2) return `needs at least 2 GPUs (one per rank); ${visible} visible`;
  if (visible < ranks) return `needs ${ranks} GPUs (one per rank); ${visible} visible`;
  return false;
}

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function launch(ranks: number, seed: number): Promise<Run> {
  const env: NodeJS.ProcessEnv = { ...process.env, TSEP_STORE_TIMEOUT_S: '60' };
  delete env.NODE_TEST_CONTEXT; // the ranks are plain programs, not test files
  const args = ['launch', '-n', String(ranks), '--timeout', String(JOB_TIMEOUT_S), '--'];
  const child = spawn(process.execPath, [MAIN, ...args, process.execPath, FIXTURE, String(seed)], {
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
  return new Promise((resolve) => {
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

const indent = (text: string): string =>
  text
    .trimEnd()
    .split('\n')
    .map((l) => `#   ${l}`)
    .join('\n');

for (const ranks of sizes) {
  test(`${ranks} ranks: peer writes through symmetric buffers, NCCL allReduce/allToAll/allToAllv`, {
    skip: skipFor(ranks),
    timeout: (JOB_TIMEOUT_S + 30) * 1000,
  }, async () => {
    const rand = seededRandom(`process group, ${ranks} ranks`);
    const seed = Math.floor(rand() * 2 ** 31);
    const run = await launch(ranks, seed);
    process.stdout.write(`# tsep launch -n ${ranks} (seed ${seed}) output:\n${indent(run.stdout)}\n`);
    const detail = `\n--- stdout ---\n${run.stdout}\n--- stderr ---\n${run.stderr}`;
    assert.equal(run.signal, null, `the launcher was killed by ${run.signal}${detail}`);
    assert.equal(run.code, 0, `tsep launch exited with ${run.code}${detail}`);
    for (let r = 0; r < ranks; r++) {
      const ok = new RegExp(`^\\[rank ${r}\\] pg-peers rank ${r}/${ranks} OK`, 'm');
      assert.match(run.stdout, ok, `rank ${r} did not print its OK line${detail}`);
    }
  });
}
