// The NCCL transport across hosts (issue "NCCL transport"): the 4-GPU machine run as 2 virtual hosts of 2
// ranks (two `tsep launch --nnodes 2` on one machine, each seeing 2 GPUs), so 'auto' must pick NCCL and the
// normal-mode and low-latency matrices must still match the CPU reference bit for bit.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRandom } from './gpu.ts';
import { indent, launchVirtualHosts, skipFor } from './ranks.ts';

const JOB_TIMEOUT_S = 400;

/** Runs `fixture <seed> quick auto` on 2 × 2 ranks; every rank must print `<name> transport nccl` and `ok`. */
function onVirtualHosts(mode: string, fixture: string, name: string, ok: (rank: number) => string): void {
  test(`${mode} on 2 virtual hosts × 2 ranks: transport auto picks NCCL; results equal the CPU reference`, {
    skip: skipFor(4, { nccl: true }),
    timeout: (JOB_TIMEOUT_S + 30) * 1000,
  }, async () => {
    const seed = Math.floor(seededRandom(`virtual hosts ${mode}`)() * 2 ** 31);
    const runs = await launchVirtualHosts(
      2,
      2,
      new URL(`./fixtures/${fixture}`, import.meta.url),
      [String(seed), 'quick', 'auto'],
      JOB_TIMEOUT_S,
    );
    const stdout = runs.map((r) => r.stdout).join('');
    process.stdout.write(`# 2 hosts × 2 ranks, ${name} ${seed} quick auto:\n${indent(stdout)}\n`);
    const detail = runs
      .map((r, h) => `\n--- host ${h} stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`)
      .join('');
    for (const [h, r] of runs.entries())
      assert.equal(r.code, 0, `host ${h}: exit ${r.code ?? r.signal}${detail}`);
    for (let rank = 0; rank < 4; rank++) {
      assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] ${name} transport nccl$`, 'm'), detail);
      assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] ${ok(rank)}$`, 'm'), detail);
    }
  });
}

onVirtualHosts('normal mode', 'normal-check.ts', 'normal-check', (r) => `normal all ok rank ${r}`);
onVirtualHosts('low-latency mode', 'll-check.ts', 'll-check', (r) => `ll all ok rank ${r}`);
