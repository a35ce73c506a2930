// Normal-mode dispatch and combine on the GPU backend, R = 2, 4 (and all visible GPUs), against the CPU
// reference, bit for bit: layout, fresh, cached and worst-case dispatch (BF16, FP8 with f32 row- and
// column-major scales and UE8M0), combine with 0-2 biases and weights, and 50 graph replays with new
// routing — over NVLink ('auto' here) and over NCCL. The cases and checks are in fixtures/normal-check.ts.
// TSEP_TEST_SEED replays a seed.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRandom } from './gpu.ts';
import { indent, launchRanks, rankCounts, skipFor } from './ranks.ts';

const JOB_TIMEOUT_S = 400;

for (const ranks of rankCounts) {
  for (const transport of ['auto', 'nccl']) {
    const name = `normal mode${transport === 'nccl' ? ' over NCCL' : ''}, ${ranks} ranks, against the CPU reference`;
    test(name, {
      skip: skipFor(ranks, { nccl: transport === 'nccl' }),
      timeout: (JOB_TIMEOUT_S + 30) * 1000,
    }, async () => {
      const seed = Math.floor(seededRandom(name)() * 2 ** 31);
      const args = [String(seed), 'full', transport];
      const run = await launchRanks(
        ranks,
        new URL('./fixtures/normal-check.ts', import.meta.url),
        args,
        JOB_TIMEOUT_S,
      );
      process.stdout.write(
        `# tsep launch -n ${ranks} normal-check ${args.join(' ')}:\n${indent(run.stdout)}\n`,
      );
      const detail = `\n--- stdout ---\n${run.stdout}\n--- stderr ---\n${run.stderr}`;
      assert.equal(run.code, 0, `exit ${run.code ?? run.signal}${detail}`);
      for (let r = 0; r < ranks; r++) {
        assert.match(run.stdout, new RegExp(`^\\[rank ${r}\\] normal all ok rank ${r}$`, 'm'), detail);
      }
    });
  }
}
