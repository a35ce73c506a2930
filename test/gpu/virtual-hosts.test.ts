// The NCCL transport across hosts (issue "NCCL transport"): the 4-GPU machine run as 2 virtual hosts of 2
// ranks (two `tsep launch --nnodes 2` on one machine, each seeing 2 GPUs), so 'auto' must pick NCCL and the
// normal-mode matrix must still match the CPU reference bit for bit.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRandom } from './gpu.ts';
import { indent, launchVirtualHosts, skipFor } from './ranks.ts';

const JOB_TIMEOUT_S = 400;

test('normal mode on 2 virtual hosts × 2 ranks: transport auto picks NCCL; results equal the CPU reference', {
  skip: skipFor(4),
  timeout: (JOB_TIMEOUT_S + 30) * 1000,
}, async () => {
  const seed = Math.floor(seededRandom('virtual hosts normal')() * 2 ** 31);
  const runs = await launchVirtualHosts(
    2,
    2,
    new URL('./fixtures/normal-check.ts', import.meta.url),
    [String(seed), 'quick', 'auto'],
    JOB_TIMEOUT_S,
  );
  const stdout = runs.map((r) => r.stdout).join('');
  process.stdout.write(`# 2 hosts × 2 ranks, normal-check ${seed} quick auto:\n${indent(stdout)}\n`);
  const detail = runs
    .map((r, h) => `\n--- host ${h} stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`)
    .join('');
  for (const [h, r] of runs.entries())
    assert.equal(r.code, 0, `host ${h}: exit ${r.code ?? r.signal}${detail}`);
  for (let rank = 0; rank < 4; rank++) {
    assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] normal-check transport nccl$`, 'm'), detail);
    assert.match(stdout, new RegExp(`^\\[rank ${rank}\\] normal all ok rank ${rank}$`, 'm'), detail);
  }
});
