// Across hosts: the 4-GPU machine run as 2 virtual hosts of 2 ranks (two `tsep launch --nnodes 2` on one
// machine, each seeing 2 GPUs). Issue "NCCL transport": 'auto' must pick NCCL and the normal-mode and
// low-latency matrices must still match the CPU reference bit for bit. Issue "Multi-host": transport
// 'nvshmem' (NVLink inside a host, NVSHMEM between hosts) runs the low-latency matrix the same way.
// With TSEP_TEST_SHARE_GPUS=1 the four ranks may share fewer GPUs (NVSHMEM runs several PEs per GPU;
// the NCCL cases skip).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRandom } from './gpu.ts';
import { indent, launchVirtualHosts, skipFor } from './ranks.ts';

const JOB_TIMEOUT_S = 400;

/**
 * Runs `fixture <seed> quick <transport>` on 2 × 2 ranks; every rank must print `<name> transport <want>`
 * and its `ok` line.
 */
function onVirtualHosts(
  mode: string,
  fixture: string,
  name: string,
  ok: (rank: number) => string,
  transport: 'auto' | 'nvshmem' = 'auto',
  also?: (rank: number) => string,
): void {
  const want = transport === 'auto' ? 'nccl' : transport;
  const title =
    transport === 'auto'
      ? `${mode} on 2 virtual hosts × 2 ranks: transport auto picks NCCL; results equal the CPU reference`
      : `${mode} on 2 virtual hosts × 2 ranks over NVSHMEM between hosts: results equal the CPU reference`;
  test(title, {
    skip: skipFor(4, { nccl: want === 'nccl' }),
    timeout: (JOB_TIMEOUT_S + 30) * 1000,
  }, async () => {
    const seed = Math.floor(seededRandom(`virtual hosts ${mode} ${transport}`)() * 2 ** 31);
    const runs = await launchVirtualHosts(
      2,
      2,
      new URL(`./fixtures/${fixture}`, import.meta.url),
      [String(seed), 'quick', transport],
      JOB_TIMEOUT_S,
    );
    const stdout = runs.map((r) => r.stdout).join('');
    process.stdout.write(`# 2 hosts × 2 ranks, ${name} ${seed} quick ${transport}:\n${indent(stdout)}\n`);
    const detail = runs
      .map((r, h) => `\n--- host ${h} stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`)
      .join('');
    for (const [h, r] of runs.entries())
      assert.equal(r.code, 0, `host ${h}: exit ${r.code ?? r.signal}${detail}`);
    for (let rank = 0; rank < 4; rank++) {
      assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] ${name} transport ${want}$`, 'm'), detail);
      assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] ${ok(rank)}$`, 'm'), detail);
      if (also) assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] ${also(rank)}`, 'm'), detail);
    }
  });
}

onVirtualHosts('normal mode', 'normal-check.ts', 'normal-check', (r) => `normal all ok rank ${r}`);
onVirtualHosts('low-latency mode', 'll-check.ts', 'll-check', (r) => `ll all ok rank ${r}`);
onVirtualHosts('low-latency mode', 'll-check.ts', 'll-check', (r) => `ll all ok rank ${r}`, 'nvshmem');
// The device's count of tokens put to the other host equals one per (token, destination host).
onVirtualHosts(
  'normal mode',
  'normal-check.ts',
  'normal-check',
  (r) => `normal all ok rank ${r}`,
  'nvshmem',
  () => 'normal ok: cross-host traffic [1-9]\\d* tokens \\(\\d+ B\\), once per destination host',
);
