// Multi-process GPU tests: which rank counts this machine can run (one GPU per rank), and running a
// fixture under `tsep launch` with its output collected.
//
// TSEP_TEST_SHARE_GPUS=1 lets ranks share GPUs (rank r on GPU r mod visible, as EpBuffer places them), so
// the 2- and 4-rank cases run on a one-GPU machine. Processes on one GPU take turns in time slices: the
// results are checked the same way, timings mean nothing, and NCCL refuses two ranks on one GPU, so its
// cases skip (`skipFor(ranks, { nccl: true })`).

import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { Device } from '../../src/device/context.ts';
import { freePort, type LaunchRun, startLaunch } from '../unit/helpers/launch.ts';
import { gpuSkip, indent, seededRandom } from './gpu.ts';

export { indent } from './gpu.ts';

export const visibleGpus = gpuSkip ? 0 : Device.count();

/** Whether ranks may share GPUs here (TSEP_TEST_SHARE_GPUS=1). */
export const shareGpus = process.env.TSEP_TEST_SHARE_GPUS === '1';

if (shareGpus && !gpuSkip) {
  process.stdout.write(
    `# TSEP_TEST_SHARE_GPUS=1: ranks share the ${visibleGpus} visible GPU(s); NCCL cases skip\n`,
  );
}

/** 2, 4 and all visible GPUs, the sizes worth testing here. */
export const rankCounts = [...new Set([2, 4, visibleGpus])].filter((r) => r >= 2).sort((a, b) => a - b);

/** False when `ranks` ranks can run here, else why not. `nccl`: the case needs one GPU per rank. */
export function skipFor(ranks: number, needs: { nccl?: boolean } = {}): string | false {
  if (gpuSkip) return gpuSkip;
  if (visibleGpus >= ranks) return false;
  if (!shareGpus) return `needs ${ranks} GPUs (one per rank); ${visibleGpus} visible`;
  if (needs.nccl)
    return `NCCL refuses two ranks on one GPU; ${ranks} ranks on ${visibleGpus} GPU(s) share them`;
  return false;
}

/** The GPUs (as CUDA_VISIBLE_DEVICES) of virtual host `h` of `perHost` ranks: shared round-robin if needed. */
export function hostGpus(h: number, perHost: number): string {
  const ids = Array.from({ length: perHost }, (_, i) => (h * perHost + i) % Math.max(1, visibleGpus));
  return [...new Set(ids)].join(',');
}

export type RankRun = LaunchRun;

/**
 * Runs `node <fixture> ...args` on `ranks` ranks through `tsep launch` with a job time limit. The ranks run
 * with TSEP_POISON_OUTPUTS=1: every pool tensor starts as POISON_BYTE (0xa5) bytes, so an output element no kernel wrote
 * fails the comparison instead of matching by luck (fresh pool memory is often zero).
 */
export function launchRanks(
  ranks: number,
  fixture: URL,
  args: readonly string[],
  timeoutS: number,
  extraEnv: NodeJS.ProcessEnv = {},
  launchFlags: readonly string[] = [],
): Promise<RankRun> {
  return startLaunch(
    ['-n', String(ranks), ...launchFlags, '--timeout', String(timeoutS)],
    [process.execPath, fileURLToPath(fixture), ...args],
    60,
    { TSEP_POISON_OUTPUTS: '1', ...extraEnv },
  ).done;
}

/** A run's output, to append to assertion messages. */
export function runDetail(run: RankRun): string {
  return `\n--- stdout ---\n${run.stdout}\n--- stderr ---\n${run.stderr}`;
}

/**
 * Echoes a fixture run's output as test comments under `label`, asserts that it exited 0, and returns
 * runDetail(run) for the test's further assertions.
 */
export function expectCleanExit(label: string, run: RankRun): string {
  process.stdout.write(`# ${label}:\n${indent(run.stdout)}\n`);
  const detail = runDetail(run);
  assert.equal(run.code, 0, `exit ${run.code ?? run.signal}${detail}`);
  return detail;
}

/**
 * Runs fixtures/<fixture>.ts with `<seed> full <transport>` on `ranks` ranks (the seed drawn from the test's
 * name; TSEP_TEST_SEED replays one), `env` added, then expectCleanExit. Returns its stdout and detail.
 */
export async function runCheckFixture(
  fixture: string,
  testName: string,
  ranks: number,
  transport: string,
  timeoutS: number,
  env: Record<string, string> = {},
): Promise<{ stdout: string; detail: string }> {
  const seed = Math.floor(seededRandom(testName)() * 2 ** 31);
  const args = [String(seed), 'full', transport];
  const run = await launchRanks(
    ranks,
    new URL(`./fixtures/${fixture}.ts`, import.meta.url),
    args,
    timeoutS,
    env,
  );
  const envText = Object.entries(env)
    .map(([k, v]) => `${k}=${v} `)
    .join('');
  const detail = expectCleanExit(`${envText}tsep launch -n ${ranks} ${fixture} ${args.join(' ')}`, run);
  return { stdout: run.stdout, detail };
}

/**
 * Runs `node <fixture> ...args` as `hosts` virtual hosts of `perHost` ranks on this machine: one
 * `tsep launch --nnodes H --node-rank h` per host, each seeing its own GPUs (CUDA_VISIBLE_DEVICES), so the
 * ranks believe they are on different hosts (LOCAL_WORLD_SIZE = perHost < WORLD_SIZE). Resolves with every
 * launcher's result once all have exited.
 */
export async function launchVirtualHosts(
  hosts: number,
  perHost: number,
  fixture: URL,
  args: readonly string[],
  timeoutS: number,
): Promise<RankRun[]> {
  const port = await freePort();
  const runs = Array.from({ length: hosts }, (_, h) => {
    return launchRanks(perHost, fixture, args, timeoutS, { CUDA_VISIBLE_DEVICES: hostGpus(h, perHost) }, [
      '--nnodes',
      String(hosts),
      '--node-rank',
      String(h),
      '--master-addr',
      '127.0.0.1',
      '--master-port',
      String(port),
    ]);
  });
  return Promise.all(runs);
}
