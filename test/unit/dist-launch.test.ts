// End-to-end tests of `tsep launch`: real processes, the real CLI, small fixture scripts as ranks.
// Every test also checks that no rank (nor its wrapper) outlives the launcher.

import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import {
  freePort,
  type LaunchRun,
  type StartedLaunch,
  startLaunch as startLaunchProcess,
} from './helpers/launch.ts';
import { tempDir } from './helpers/temp.ts';

const NODE = process.execPath;
const fixture = (name: string): string => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));

function startLaunch(launchArgs: string[], command: string[]): StartedLaunch {
  return startLaunchProcess(launchArgs, command, 30);
}

/** Runs a fixture under `tsep launch` and waits for the launcher to exit. */
function launchFixture(launchArgs: string[], name: string, args: string[]): Promise<LaunchRun> {
  return startLaunch(launchArgs, [NODE, fixture(name), ...args]).done;
}

interface Pids {
  pid: number;
  ppid: number;
}

function readPids(dir: string): Pids[] {
  return readdirSync(dir).map((f) => JSON.parse(readFileSync(join(dir, f), 'utf8')) as Pids);
}

async function waitForPidFiles(dir: string, count: number): Promise<Pids[]> {
  const deadline = Date.now() + 10_000;
  while (readdirSync(dir).length < count) {
    if (Date.now() > deadline) throw new Error(`only ${readdirSync(dir).length} of ${count} ranks started`);
    await sleep(25);
  }
  await sleep(50); // let the last file's write finish
  return readPids(dir);
}

/** True when the process no longer runs. A zombie counts as gone: it runs no code and holds nothing. */
function gone(pid: number): boolean {
  if (existsSync('/proc/self/stat')) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      return /^[ZX]/.test(stat.slice(stat.lastIndexOf(')') + 2));
    } catch {
      return true;
    }
  }
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

async function assertAllGone(pids: Pids[], withinMs: number): Promise<void> {
  const all = pids.flatMap((p) => [p.pid, p.ppid]);
  const deadline = Date.now() + withinMs;
  while (all.some((p) => !gone(p))) {
    if (Date.now() > deadline) assert.fail(`still running: ${all.filter((p) => !gone(p)).join(', ')}`);
    await sleep(50);
  }
}

test('4 ranks: store operations and collectives give every rank the right values', async () => {
  const dir = tempDir('tsep-launch-');
  const seed = Math.floor(Math.random() * 2 ** 31);
  const run = await launchFixture(['-n', '4'], 'dist-collectives.ts', [dir, String(seed)]);
  assert.equal(run.code, 0, `seed ${seed}\n${run.stderr}`);
  for (let r = 0; r < 4; r++) {
    // The partial "hello " was completed by a later write: one prefixed line, not two.
    assert.match(run.stdout, new RegExp(`^\\[rank ${r}\\] hello from rank ${r} of 4$`, 'm'));
    assert.match(run.stdout, new RegExp(`^\\[rank ${r}\\] rank ${r} ok$`, 'm'));
  }
  const pids = readPids(dir);
  assert.equal(pids.length, 4);
  await assertAllGone(pids, 2000);
});

test('2 nodes of 2 ranks: global ranks, world size and the store on node 0', async () => {
  const dir = tempDir('tsep-launch-');
  const port = await freePort();
  const seed = Math.floor(Math.random() * 2 ** 31);
  const common = ['-n', '2', '--nnodes', '2', '--master-addr', '127.0.0.1', '--master-port', String(port)];
  // Node 1 starts first: its ranks must wait for node 0's store to come up.
  const node1 = launchFixture([...common, '--node-rank', '1'], 'dist-collectives.ts', [dir, String(seed)]);
  await sleep(300);
  const node0 = launchFixture([...common, '--node-rank', '0'], 'dist-collectives.ts', [dir, String(seed)]);
  const [run0, run1] = await Promise.all([node0, node1]);
  assert.equal(run0.code, 0, run0.stderr);
  assert.equal(run1.code, 0, run1.stderr);
  assert.match(run0.stdout, /^\[rank 1\] hello from rank 1 of 4$/m);
  assert.match(run1.stdout, /^\[rank 3\] rank 3 ok$/m);
  assert.doesNotMatch(run1.stdout, /\[rank [01]\]/);
  await assertAllGone(readPids(dir), 2000);
});

test("node 0's launcher keeps the store until the other nodes' ranks have left it", async () => {
  const dir = tempDir('tsep-launch-');
  const port = await freePort();
  const common = ['-n', '1', '--nnodes', '2', '--master-addr', '127.0.0.1', '--master-port', String(port)];
  const node0 = launchFixture([...common, '--node-rank', '0'], 'dist-late-leaver.ts', [dir, '4000']);
  const node1 = launchFixture([...common, '--node-rank', '1'], 'dist-late-leaver.ts', [dir, '4000']);
  const [run0, run1] = await Promise.all([node0, node1]);
  assert.equal(run1.code, 0, run1.stderr);
  assert.equal(run0.code, 0, run0.stderr);
  assert.match(run1.stdout, /^\[rank 1\] rank 1 ok$/m);
  // Node 0's rank was done long before: its launcher said why it waited.
  assert.match(
    run0.stderr,
    /waiting up to another 298 s for the 1 rank\(s\) of other nodes still connected to the store/,
  );
  assert.ok(run0.ms >= 3000, `node 0's launcher exited after ${run0.ms} ms, before node 1's rank left`);
  await assertAllGone(readPids(dir), 2000);
});

test('a rank exiting with code 3 stops the job within 5 s and is named with its stderr', async () => {
  const dir = tempDir('tsep-launch-');
  const run = await launchFixture(['-n', '4'], 'dist-fail.ts', [dir, 'exit3']);
  assert.equal(run.code, 3);
  assert.ok(run.ms < 5000, `took ${run.ms} ms`);
  assert.match(run.stderr, /rank 2 exited with code 3; stopping the other ranks/);
  assert.match(run.stderr, /first failure was rank 2 \(local rank 2\), which exited with code 3/);
  assert.match(run.stderr, /last stderr lines of rank 2:\n {2}\| rank 2 is failing on purpose/);
  await assertAllGone(readPids(dir), 2000);
});

test('a rank killed by a signal fails the job with 128 + signal number', async () => {
  const dir = tempDir('tsep-launch-');
  const run = await launchFixture(['-n', '4'], 'dist-fail.ts', [dir, 'sigkill']);
  assert.equal(run.code, 128 + 9);
  assert.match(run.stderr, /first failure was rank 1 \(local rank 1\), which was killed by SIGKILL/);
  await assertAllGone(readPids(dir), 2000);
});

test('a rank that never reaches a barrier makes the others raise RendezvousError naming it', async () => {
  const dir = tempDir('tsep-launch-');
  const run = await launchFixture(['-n', '4'], 'dist-missing.ts', [dir]);
  assert.equal(run.code, 0, run.stderr);
  for (let r = 0; r < 3; r++) {
    const line = run.stdout.split('\n').find((l) => l.startsWith(`[rank ${r}] {`));
    assert.ok(line, `rank ${r} printed no error:\n${run.stdout}`);
    assert.deepEqual(JSON.parse(line.slice(`[rank ${r}] `.length)), {
      code: 'TSEP_RENDEZVOUS_ERROR',
      key: 'fixture/0/barrier/3',
      missingRanks: [3],
    });
  }
  assert.ok(run.ms < 8000, `took ${run.ms} ms`);
  await assertAllGone(readPids(dir), 2000);
});

test('--timeout stops every rank and exits 124 with a message', async () => {
  const dir = tempDir('tsep-launch-');
  const run = await launchFixture(['-n', '4', '--timeout', '1'], 'dist-hang.ts', [dir]);
  assert.equal(run.code, 124);
  assert.match(run.stderr, /timed out after 1 s \(--timeout\); stopping all ranks/);
  assert.ok(run.ms >= 1000 && run.ms < 4000, `took ${run.ms} ms`);
  await assertAllGone(readPids(dir), 2000);
});

test('ranks that ignore SIGTERM are SIGKILLed after the grace period', async () => {
  const dir = tempDir('tsep-launch-');
  const run = await launchFixture(['-n', '2', '--timeout', '0.5'], 'dist-hang.ts', [dir, 'ignore-term']);
  assert.equal(run.code, 124);
  assert.ok(run.ms >= 3400 && run.ms < 7000, `took ${run.ms} ms`);
  await assertAllGone(readPids(dir), 2000);
});

test('SIGINT to the launcher reaches every rank once', async () => {
  const dir = tempDir('tsep-launch-');
  const launch = startLaunch(['-n', '4'], [NODE, fixture('dist-hang.ts'), dir, 'sigint']);
  const pids = await waitForPidFiles(dir, 4);
  launch.kill('SIGINT');
  const run = await launch.done;
  assert.equal(run.code, 130);
  for (let r = 0; r < 4; r++) {
    assert.equal(run.stdout.split('\n').filter((l) => l === `[rank ${r}] rank ${r} got SIGINT`).length, 1);
  }
  await assertAllGone(pids, 2000);
});

test('a SIGKILLed launcher leaves no rank behind, even ranks that ignore SIGTERM', async () => {
  const dir = tempDir('tsep-launch-');
  const launch = startLaunch(['-n', '4'], [NODE, fixture('dist-hang.ts'), dir, 'ignore-term']);
  const pids = await waitForPidFiles(dir, 4);
  launch.kill('SIGKILL');
  await launch.done;
  // The wrappers notice at once, send SIGTERM, and SIGKILL after the 3 s grace period.
  await assertAllGone(pids, 6000);
});

test('a command that cannot start fails the job with 127', async () => {
  const run = await startLaunch(['-n', '2'], ['/nonexistent/tsep-test-command']).done;
  assert.equal(run.code, 127);
  assert.match(run.stderr, /rank \d could not start: spawn \/nonexistent\/tsep-test-command ENOENT/);
});

test('bad flags are rejected before anything starts', async () => {
  const run = await startLaunch(['-n', '0'], ['true']).done;
  assert.notEqual(run.code, 0);
  assert.match(run.stderr, /--nproc-per-node/);
  const multi = await startLaunch(['-n', '1', '--nnodes', '2'], ['true']).done;
  assert.notEqual(multi.code, 0);
  assert.match(multi.stderr, /Invalid master-addr/);
});
