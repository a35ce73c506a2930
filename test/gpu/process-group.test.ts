// GPU tests of the process group: `tsep launch` starts R ranks of test/gpu/fixtures/pg-peers.ts, one per
// GPU; each rank writes a seed- and rank-tagged pattern into every peer's symmetric buffer through the peer
// pointer table and checks what every peer wrote into its own, then checks NCCL allReduce, allToAll and
// allToAllv element by element (see the fixture for the details). R = 2, 4 and, where more GPUs are
// visible, all of them; a size needs that many GPUs. Fresh seed per run; TSEP_TEST_SEED replays one.
// Also: two ranks put on one GPU (CUDA_VISIBLE_DEVICES=0) get a ValidationError from the NCCL
// communicator naming them, not NCCL's failure.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { gpuSkip, seededRandom } from './gpu.ts';
import { indent, launchRanks, rankCounts, runDetail, skipFor } from './ranks.ts';

/** The launcher's own bound on the job (it stops every rank and exits 124 after it). */
const JOB_TIMEOUT_S = 240;
const FIXTURE = new URL('./fixtures/pg-peers.ts', import.meta.url);

for (const ranks of rankCounts) {
  test(`${ranks} ranks: peer writes through symmetric buffers, NCCL allReduce/allToAll/allToAllv`, {
    skip: skipFor(ranks, { nccl: true }),
    timeout: (JOB_TIMEOUT_S + 30) * 1000,
  }, async () => {
    const rand = seededRandom(`process group, ${ranks} ranks`);
    const seed = Math.floor(rand() * 2 ** 31);
    const run = await launchRanks(ranks, FIXTURE, [String(seed)], JOB_TIMEOUT_S);
    process.stdout.write(`# tsep launch -n ${ranks} (seed ${seed}) output:\n${indent(run.stdout)}\n`);
    const detail = runDetail(run);
    assert.equal(run.signal, null, `the launcher was killed by ${run.signal}${detail}`);
    assert.equal(run.code, 0, `tsep launch exited with ${run.code}${detail}`);
    for (let r = 0; r < ranks; r++) {
      const ok = new RegExp(`^\\[rank ${r}\\] pg-peers rank ${r}/${ranks} OK`, 'm');
      assert.match(run.stdout, ok, `rank ${r} did not print its OK line${detail}`);
    }
  });
}

test('2 ranks on one GPU: the NCCL communicator refuses with a ValidationError naming both ranks', {
  skip: gpuSkip,
  timeout: 90_000,
}, async () => {
  const fixture = new URL('./fixtures/nccl-shared.ts', import.meta.url);
  const run = await launchRanks(2, fixture, [], 60, { CUDA_VISIBLE_DEVICES: '0' });
  const detail = runDetail(run);
  assert.equal(run.code, 0, `tsep launch exited with ${run.code}${detail}`);
  for (let r = 0; r < 2; r++) {
    assert.match(
      run.stdout,
      new RegExp(`^\\[rank ${r}\\] nccl-shared rank ${r} OK`, 'm'),
      `rank ${r}${detail}`,
    );
  }
});
