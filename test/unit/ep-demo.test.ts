// The demo: its MoE round trips match the direct computation, and the CLI prints the table and exits
// with the check's verdict.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { describe, it } from 'node:test';
import { promisify } from 'node:util';
import { formatDemo, runDemo } from '../../src/cli/demo.ts';
import { BASE_SEED } from './helpers/seeds.ts';

const run = promisify(execFile);

describe('tsep demo', () => {
  it('both round trips match the direct computation', async () => {
    const rows = await runDemo({
      ranks: 4,
      tokens: 6,
      hidden: 256,
      experts: 8,
      topk: 3,
      seed: BASE_SEED,
      backend: 'cpu',
    });
    assert.deepEqual(
      rows.map((r) => r.path),
      ['normal, BF16', 'low-latency, FP8'],
    );
    for (const r of rows) {
      assert.ok(r.ok, `${r.path}: worst error ${r.worst} of tolerance (seed ${BASE_SEED})`);
      assert.ok(r.worst > 0, `${r.path}: rounding leaves some error, so the check compared real numbers`);
      assert.equal(r.backend, 'cpu');
    }
    assert.match(
      formatDemo(rows),
      /^path +ranks +tokens\/rank +hidden +experts +top-k +backend +time +max err\/tol +result\n/,
    );
  });

  it('8 ranks (the EP8 layout) round-trip too: nothing assumes 4 or fewer ranks', async () => {
    const rows = await runDemo({
      ranks: 8,
      tokens: 5,
      hidden: 256,
      experts: 64,
      topk: 8,
      seed: BASE_SEED + 8,
      backend: 'cpu',
    });
    for (const r of rows) {
      assert.equal(r.ranks, 8);
      assert.ok(r.ok, `${r.path}: worst error ${r.worst} of tolerance (seed ${BASE_SEED + 8})`);
      assert.ok(r.worst > 0, `${r.path}: rounding leaves some error, so the check compared real numbers`);
    }
  });

  it('the CLI prints the table and exits 0; a bad option exits non-zero', async () => {
    const main = new URL('../../src/cli/main.ts', import.meta.url).pathname;
    const { stdout } = await run(process.execPath, [
      main,
      'demo',
      '--tokens',
      '4',
      '--hidden',
      '128',
      '--seed',
      '7',
    ]);
    assert.match(stdout, /normal, BF16 .* ok\n/);
    assert.match(stdout, /low-latency, FP8 .* ok\n/);
    assert.match(stdout, /seed 7\n/);
    await assert.rejects(
      run(process.execPath, [main, 'demo', '--backend', 'gpu']),
      (e: { code?: number; stderr?: string }) => {
        assert.equal(e.code, 1);
        assert.match(e.stderr ?? '', /GPU backend/);
        return true;
      },
    );
    // A bad number is one line naming the option and what it needs, with the usage: no stack trace.
    for (const bad of [
      ['--ranks', '0'],
      ['--ranks', 'abc'],
      ['--seed', '0'],
    ]) {
      await assert.rejects(
        run(process.execPath, [main, 'demo', ...bad]),
        (e: { code?: number; stderr?: string }) => {
          assert.equal(e.code, 1);
          assert.match(
            e.stderr ?? '',
            new RegExp(`option '${bad[0]} <n>' argument '${bad[1]}' is invalid. need an integer in \\[1, `),
          );
          assert.doesNotMatch(e.stderr ?? '', /\n\s+at /);
          return true;
        },
      );
    }
  });
});
