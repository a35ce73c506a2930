// bench/stats.ts: the pure helpers every bench script uses (order statistics, bandwidth, the table printer,
// where results go). timeEvents needs a GPU and is exercised by the bench scripts themselves.

import assert from 'node:assert/strict';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { formatTable, gbPerS, median, percentile, resultPath, summarize } from '../../bench/stats.ts';

test('median: odd and even counts, unsorted input, input left untouched', () => {
  assert.equal(median([5]), 5);
  assert.equal(median([3, 1, 2]), 2);
  const even = [4, 1, 3, 2];
  assert.equal(median(even), 2.5);
  assert.deepEqual(even, [4, 1, 3, 2], 'median must not sort its argument in place');
  assert.equal(median([-1, -1, 7, -1]), -1);
  // Numeric order, not the default string order of Array.prototype.sort.
  assert.equal(median([10, 9, 100]), 10);
});

test('median and percentile reject empty lists and NaN', () => {
  assert.throws(() => median([]), RangeError);
  assert.throws(() => percentile([], 50), RangeError);
  assert.throws(() => median([1, Number.NaN, 2]), RangeError);
  assert.throws(() => summarize([]), RangeError);
});

test('percentile: linear interpolation between the nearest ranks (numpy default)', () => {
  const v = [4, 1, 3, 2];
  assert.equal(percentile(v, 0), 1);
  assert.equal(percentile(v, 100), 4);
  assert.equal(percentile(v, 50), median(v));
  assert.equal(percentile(v, 25), 1.75); // rank 0.75 between 1 and 2
  assert.equal(percentile(v, 90), 3.7); // rank 2.7 between 3 and 4
  assert.equal(percentile([7], 37), 7);
  const big = Array.from({ length: 101 }, (_, i) => 100 - i); // 0..100 reversed
  for (const p of [0, 1, 10, 33, 50, 99, 100]) assert.equal(percentile(big, p), p);
  for (const bad of [-1, 100.5, Number.NaN]) assert.throws(() => percentile(v, bad), RangeError);
});

test('summarize and gbPerS', () => {
  const s = summarize([2, 8, 4, 6]);
  assert.deepEqual(s, { n: 4, min: 2, p10: 2.6, median: 5, p90: 7.4, max: 8, mean: 5 });
  // 64 MiB in 0.25 ms = 268.4 GB/s (10^9 bytes per second).
  assert.ok(Math.abs(gbPerS(64 * 2 ** 20, 0.25) - 268.435456) < 1e-9);
});

test('formatTable: padded columns, numbers right-aligned with fixed digits, text left-aligned', () => {
  const out = formatTable(
    [{ header: 'name' }, { header: 'ms', digits: 3 }, { header: 'GB/s', digits: 1 }, 'note'],
    [
      ['64 MiB', 0.25, 268.435456, 'ok'],
      ['256 MiB', 1.5, 178.9, undefined],
    ],
  );
  assert.equal(
    out,
    [
      'name        ms   GB/s  note',
      '-------  -----  -----  ----',
      '64 MiB   0.250  268.4  ok',
      '256 MiB  1.500  178.9',
      '',
    ].join('\n'),
  );
});

test('formatTable: explicit alignment, empty tables, headers wider than cells, errors', () => {
  assert.equal(
    formatTable(
      [
        { header: 'r', align: 'left' },
        { header: 'value', align: 'right' },
      ],
      [[1, 'x']],
    ),
    'r  value\n-  -----\n1      x\n',
  );
  assert.equal(formatTable(['a', 'bb'], []), 'a  bb\n-  --\n');
  // Numbers without digits print as String() does; bigint counts as a number; null is an empty cell.
  assert.equal(
    formatTable(
      ['n', 'big'],
      [
        [0.1, 5n],
        [12, null],
      ],
    ),
    '  n  big\n---  ---\n0.1    5\n 12\n',
  );
  assert.throws(() => formatTable(['a'], [[1, 2]]), RangeError);
});

test('resultPath: TSEP_BENCH_OUT, else $OUT/<name>.json, else bench/out/<name>.json', () => {
  const benchDir = resolve(import.meta.dirname, '../../bench');
  assert.equal(resultPath('nccl', {}), join(benchDir, 'out', 'nccl.json'));
  assert.equal(resultPath('nccl', { OUT: '/tmp/o' }), '/tmp/o/nccl.json');
  assert.equal(resultPath('nccl', { OUT: '/tmp/o', TSEP_BENCH_OUT: '/r/x.json' }), '/r/x.json');
  assert.equal(resultPath('normal', { TSEP_BENCH_OUT: 'rel.json' }), resolve('rel.json'));
});
