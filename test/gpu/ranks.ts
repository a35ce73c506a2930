// Multi-process GPU tests: which rank counts this machine can run (one GPU per rank), and running a
// fixture under `tsep launch` with its output collected.

import { type AddressInfo, createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { Device } from '../../src/device/context.ts';
import { type LaunchRun, startLaunch } from '../unit/helpers/launch.ts';
import { gpuSkip } from './gpu.ts';

export const visibleGpus = gpuSkip ? 0 : Device.count();

/** 2, 4 and all visible GPUs, the sizes worth testing here. */
export const rankCounts = [...new Set([2, 4, visibleGpus])].filter((r) => r >= 2).sort((a, b) => a - b);

/** False when `ranks` ranks can run here, else why not. */
export function skipFor(ranks: number): string | false {
  if (gpuSkip) return gpuSkip;
  if (visibleGpus < ranks) return `needs ${ranks} GPUs (one per rank); ${visibleGpus} visible`;
  return false;
}

export type RankRun = LaunchRun;

/** Runs `node <fixture> ...args` on `ranks` ranks through `tsep launch` with a job time limit. */
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
    extraEnv,
  ).done;
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
    const gpus = Array.from({ length: perHost }, (_, i) => h * perHost + i).join(',');
    return launchRanks(perHost, fixture, args, timeoutS, { CUDA_VISIBLE_DEVICES: gpus }, [
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

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
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
