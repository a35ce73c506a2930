// A rank that does not take part must not hang the others (issue "Reliability"): a rank that skips a
// dispatch makes every other rank raise EpTimeoutError naming it within the timeout + 2 s, after which
// reset() and a checked dispatch succeed; a rank killed mid-dispatch makes `tsep launch` stop the job and
// name it; malformed calls that only the GPU backend gets are refused with ValidationError before anything
// is enqueued, and the next call on the same buffer is exact. Runs on 2 ranks, and on 4 where there are 4 GPUs.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRandom } from './gpu.ts';
import { expectCleanExit, launchRanks, rankCounts, runDetail, skipFor, visibleGpus } from './ranks.ts';

const TIMEOUT_S = 2;
const fixture = new URL('./fixtures/failure-check.ts', import.meta.url);

for (const ranks of rankCounts.filter((r) => r <= 4)) {
  test(`${ranks} ranks: a rank that skips a dispatch is named by the others' EpTimeoutError; reset() recovers`, {
    skip: skipFor(ranks),
    timeout: 180_000,
  }, async () => {
    const seed = Math.floor(seededRandom(`failure skip ${ranks}`)() * 2 ** 31);
    const run = await launchRanks(ranks, fixture, [String(seed), 'skip'], 150, {
      TSEP_TIMEOUT_S: String(TIMEOUT_S),
    });
    const detail = expectCleanExit(`failure-check ${seed} skip`, run);
    for (let r = 0; r < ranks; r++) {
      assert.match(run.stdout, new RegExp(`^\\[rank ${r}\\] failure-check ok rank ${r}$`, 'm'), detail);
      if (r !== 1)
        assert.match(run.stdout, new RegExp(`^\\[rank ${r}\\] rank ${r}: EpTimeoutError after`, 'm'), detail);
    }
  });

  test(`${ranks} ranks: malformed GPU calls raise ValidationError before any launch; the next dispatch is exact`, {
    skip: skipFor(ranks),
    timeout: 180_000,
  }, async (t) => {
    const seed = Math.floor(seededRandom(`failure bad ${ranks}`)() * 2 ** 31);
    const run = await launchRanks(ranks, fixture, [String(seed), 'bad'], 150);
    const detail = expectCleanExit(`failure-check ${seed} bad`, run);
    const cases = [
      'x in host memory',
      'non-contiguous x',
      'non-contiguous topkIdx',
      'fp8 x with scales \\[T, S \\+ 1\\]',
      'a handle of another buffer',
      'a handle of a destroyed buffer',
    ];
    for (let r = 0; r < ranks; r++) {
      for (const c of cases)
        assert.match(
          run.stdout,
          new RegExp(`^\\[rank ${r}\\] bad input refused, next call exact: ${c} `, 'm'),
          detail,
        );
      assert.match(run.stdout, new RegExp(`^\\[rank ${r}\\] failure-check ok rank ${r}$`, 'm'), detail);
    }
    // Tensors on another GPU need two GPUs in the process (the fixture says when it leaves them out).
    await t.test(
      'tensors on another GPU of the process',
      { skip: visibleGpus > 1 ? false : `needs two GPUs visible to each rank; ${visibleGpus} visible` },
      () => {
        for (let r = 0; r < ranks; r++) {
          for (const c of ['x on another GPU', 'topkIdx on another GPU'])
            assert.match(
              run.stdout,
              new RegExp(`^\\[rank ${r}\\] bad input refused, next call exact: ${c} `, 'm'),
              detail,
            );
        }
      },
    );
  });

  test(`${ranks} ranks: a rank killed mid-dispatch makes tsep launch fail naming it`, {
    skip: skipFor(ranks),
    timeout: 120_000,
  }, async () => {
    const run = await launchRanks(ranks, fixture, ['7', 'kill'], 90, { TSEP_TIMEOUT_S: String(TIMEOUT_S) });
    const detail = runDetail(run);
    assert.equal(run.code, 128 + 9, `exit ${run.code ?? run.signal}${detail}`);
    assert.match(run.stderr, new RegExp(`first failure was rank ${ranks - 1} .*killed by SIGKILL`), detail);
  });
}
