// The GPU normal mode's buffer layout and dispatch chunking (host-side arithmetic the kernels rely on).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  checkSamePayload,
  chunkCounts,
  combinePieces,
  readCountRows,
  smShares,
} from '../../src/ep/gpu/normal-kernels.ts';
import { CTRL_BYTES, normalAreas } from '../../src/ep/gpu/normal-layout.ts';
import { intSetting } from '../../src/ep/gpu/settings.ts';
import { ValidationError } from '../../src/errors.ts';

/** Runs `body` with the named settings unset first, restoring them after. */
function withSettings(names: readonly string[], body: () => void): void {
  const saved = names.map((n) => process.env[n]);
  try {
    for (const n of names) delete process.env[n];
    body();
  } finally {
    names.forEach((n, i) => {
      if (saved[i] === undefined) delete process.env[n];
      else process.env[n] = saved[i];
    });
  }
}

/** Each bad value of each setting, alone, makes `read` throw a ValidationError naming the setting. */
function refusesBadValues(names: readonly string[], bad: readonly string[], read: () => unknown): void {
  for (const n of names) {
    for (const value of bad) {
      for (const m of names) delete process.env[m];
      process.env[n] = value;
      assert.throws(
        read,
        (e: unknown) => e instanceof ValidationError && e.message.includes(n),
        `${n}=${value}`,
      );
    }
  }
}

test('chunk counts: dispatch 4096 and combine 1024 by default, never more than T_max; bad values refused by name', () => {
  const names = ['TSEP_NORMAL_DISPATCH_CHUNKS', 'TSEP_NORMAL_COMBINE_CHUNKS'];
  withSettings(names, () => {
    assert.deepEqual(chunkCounts(4096), { dispatch: 4096, combine: 1024 });
    assert.deepEqual(chunkCounts(127), { dispatch: 127, combine: 127 });
    assert.deepEqual(chunkCounts(1), { dispatch: 1, combine: 1 });
    assert.deepEqual(chunkCounts(0), { dispatch: 1, combine: 1 });
    assert.deepEqual(chunkCounts(100_000), { dispatch: 4096, combine: 1024 });
    process.env.TSEP_NORMAL_DISPATCH_CHUNKS = '512';
    process.env.TSEP_NORMAL_COMBINE_CHUNKS = '8192';
    assert.deepEqual(chunkCounts(4096), { dispatch: 512, combine: 4096 });
    assert.deepEqual(chunkCounts(100_000), { dispatch: 512, combine: 8192 });
    refusesBadValues(names, ['0', '-1', '1.5', 'many', '65537'], () => chunkCounts(4096));
  });
});

test('SM shares beside the sends: 33 % receive and 33 % reduce by default; settable; bad values refused by name', () => {
  const names = ['TSEP_NORMAL_RECV_PCT', 'TSEP_NORMAL_REDUCE_PCT'];
  withSettings(names, () => {
    assert.deepEqual(smShares(), { recvPct: 33, reducePct: 33 });
    process.env.TSEP_NORMAL_RECV_PCT = '25';
    process.env.TSEP_NORMAL_REDUCE_PCT = '40';
    assert.deepEqual(smShares(), { recvPct: 25, reducePct: 40 });
    refusesBadValues(names, ['0', '91', '12.5', 'half'], () => smShares());
  });
});

test('copy-engine combine pieces: 0 (the SM send) by default, at most the combine chunk count; bad values refused', () => {
  const names = ['TSEP_NORMAL_COMBINE_PIECES'];
  withSettings(names, () => {
    assert.equal(combinePieces({ dispatch: 4096, combine: 1024 }), 0);
    process.env.TSEP_NORMAL_COMBINE_PIECES = '4';
    assert.equal(combinePieces({ dispatch: 4096, combine: 1024 }), 4);
    // The pieces' words sit in the combine word array: never more pieces than it has room for per source.
    assert.equal(combinePieces({ dispatch: 3, combine: 3 }), 3);
    refusesBadValues(names, ['-1', '2.5', 'all', '1025'], () =>
      combinePieces({ dispatch: 4096, combine: 1024 }),
    );
  });
});

test('buffer areas are ordered, 256-byte aligned and large enough; no chunk words without chunk counts (NCCL)', () => {
  for (const [R, T, H, K] of [
    [2, 127, 2560, 6],
    [4, 4096, 7168, 8],
    [8, 1, 4096, 1],
  ] as const) {
    const numChunks = chunkCounts(T, 2048, 1024);
    const a = normalAreas(R, T, H, K, numChunks);
    const rows = R * T;
    assert.equal(a.rows, rows);
    assert.equal(a.chunks, CTRL_BYTES);
    assert.equal(a.combineChunks, CTRL_BYTES + R * numChunks.dispatch * 8);
    const order: [number, number][] = [
      [a.chunks, R * numChunks.dispatch * 8],
      [a.combineChunks, R * numChunks.combine * 8],
      [a.x, rows * H * 2],
      [a.scales, rows * Math.ceil(H / 128) * 4],
      [a.srcIdx, rows * 4],
      [a.topk, rows * K * 8],
      [a.weights, rows * K * 4],
    ];
    for (let i = 0; i < order.length; i++) {
      const [at, size] = order[i]!;
      const next = i + 1 < order.length ? order[i + 1]![0] : a.bytes;
      assert.ok(at + size <= next, `area ${i} overlaps the next (R=${R} T=${T})`);
      if (i >= 2) assert.equal(at % 256, 0, `area ${i} is not 256-byte aligned`);
    }
    const none = normalAreas(R, T, H, K);
    assert.equal(none.chunks, 0);
    assert.equal(none.combineChunks, 0);
    assert.equal(none.x, CTRL_BYTES);
  }
});

test('integer settings from the environment: default, bounds, refusal by name', () => {
  withSettings(['TSEP_TEST_KNOB'], () => {
    assert.equal(intSetting('TSEP_TEST_KNOB', 7, 1, 9), 7);
    process.env.TSEP_TEST_KNOB = '9';
    assert.equal(intSetting('TSEP_TEST_KNOB', 7, 1, 9), 9);
    process.env.TSEP_TEST_KNOB = '10';
    assert.throws(() => intSetting('TSEP_TEST_KNOB', 7, 1, 9), ValidationError);
  });
});

test('gathered count rows: rows per source, rank prefix matrix, aligned per-expert counts, payload agreement', () => {
  // 3 ranks, 2 experts each: per-rank counts in columns 0..2, per-expert from column 3, shape word last.
  const rows = [
    [1, 2, 3, /* experts */ 1, 0, 2, 0, 3, 0, /* shape */ 5],
    [4, 0, 1, 2, 2, 0, 0, 1, 0, 5],
    [0, 5, 2, 0, 0, 4, 1, 2, 0, 5],
  ];
  const r = readCountRows(rows, 1, 2, 3, 4);
  assert.deepEqual(r.recv, [2, 0, 5]);
  assert.deepEqual(r.rankPrefix, [1, 2, 3, 5, 2, 4, 5, 7, 6]);
  // Rank 1's experts are global 2 and 3: 2+0+4 = 6 -> 8, 0+0+1 = 1 -> 4.
  assert.deepEqual(r.perExpert, [8, 4]);
  checkSamePayload(rows, 9, 5, 1);
  assert.throws(
    () => checkSamePayload([rows[0]!, [...rows[1]!.slice(0, 9), 7], rows[2]!], 9, 5, 0),
    (e: unknown) => e instanceof ValidationError && /on rank 0 but .* on rank 1/.test(e.message),
  );
});
