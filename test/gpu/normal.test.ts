// Normal-mode dispatch and combine on the GPU backend, R = 1, 2, 4 (and all visible GPUs), against the CPU
// reference, bit for bit: layout, fresh, cached and worst-case dispatch (BF16, FP8 with f32 row- and
// column-major scales and UE8M0), combine with 0-2 biases and weights, and 50 graph replays with new
// routing — over NVLink ('auto' here) and over NCCL; over NVLink also a captured cached exact-size
// dispatch + combine replayed 30 times with new data, and the copy-engine combine
// (TSEP_NORMAL_COMBINE_PIECES). The cases and checks are in fixtures/normal-check.ts. TSEP_TEST_SEED
// replays a seed.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { rankCounts, runCheckFixture, skipFor } from './ranks.ts';

const JOB_TIMEOUT_S = 400;

/**
 * Runs fixtures/normal-check.ts (the full matrix) on `ranks` ranks over `transport` with `env` added
 * (runCheckFixture) and asserts every rank's "normal all ok". Returns its stdout and the detail to append
 * to further assertion messages.
 */
async function runNormalCheck(
  name: string,
  ranks: number,
  transport: string,
  env: Record<string, string> = {},
): Promise<{ stdout: string; detail: string }> {
  const { stdout, detail } = await runCheckFixture(
    'normal-check',
    name,
    ranks,
    transport,
    JOB_TIMEOUT_S,
    env,
  );
  for (let r = 0; r < ranks; r++) {
    assert.match(stdout, new RegExp(`^\\[rank ${r}\\] normal all ok rank ${r}$`, 'm'), detail);
  }
  return { stdout, detail };
}

// With TSEP_NORMAL_COMBINE_PIECES the exact-size combines move their rows with the copy engines; 'mixed'
// leaves odd ranks on the SM send, so owners see senders of both kinds in one combine.
for (const ranks of rankCounts) {
  for (const mixed of [false, true]) {
    const name = `normal mode with the copy-engine combine${mixed ? ' on even ranks' : ''}, ${ranks} ranks, against the CPU reference`;
    test(name, { skip: skipFor(ranks), timeout: (JOB_TIMEOUT_S + 30) * 1000 }, async () => {
      const env = { TSEP_NORMAL_COMBINE_PIECES: '3', ...(mixed ? { TSEP_TEST_MIXED_COMBINE: '1' } : {}) };
      const { stdout, detail } = await runNormalCheck(name, ranks, 'auto', env);
      for (let r = 0; r < ranks; r++) {
        // Every exact-size combine of a copy-engine rank went that way; none of an SM rank's did.
        const n = Number(
          stdout.match(new RegExp(`^\\[rank ${r}\\] normal-check copy-engine combines (\\d+)$`, 'm'))?.[1],
        );
        if (mixed && r % 2 === 1) assert.equal(n, 0, `rank ${r} (SM send) used the copy engines${detail}`);
        else assert.ok(n > 0, `rank ${r} made no copy-engine combine${detail}`);
      }
    });
  }
  for (const transport of ['auto', 'nccl']) {
    const name = `normal mode${transport === 'nccl' ? ' over NCCL' : ''}, ${ranks} ranks, against the CPU reference`;
    test(name, {
      skip: skipFor(ranks, { nccl: transport === 'nccl' }),
      timeout: (JOB_TIMEOUT_S + 30) * 1000,
    }, async () => {
      await runNormalCheck(name, ranks, transport);
    });
  }
}

// One rank: every row is the rank's own (a cached dispatch writes them straight into its outputs, the
// combine sends nothing and reduces on every SM), through the same matrix.
test('normal mode, 1 rank, against the CPU reference', {
  skip: skipFor(1),
  timeout: (JOB_TIMEOUT_S + 30) * 1000,
}, async () => {
  await runNormalCheck('normal mode, 1 rank, against the CPU reference', 1, 'auto');
});
