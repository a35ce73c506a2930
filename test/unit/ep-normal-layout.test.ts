// The GPU normal mode's buffer layout and dispatch chunking (host-side arithmetic the kernels rely on).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chunkCount } from '../../src/ep/gpu/normal-kernels.ts';
import { CTRL_BYTES, normalAreas } from '../../src/ep/gpu/normal-layout.ts';
import { intSetting } from '../../src/ep/gpu/settings.ts';
import { ValidationError } from '../../src/errors.ts';

test('chunk count: TSEP_NORMAL_CHUNKS (default 1024), never more than T_max; bad values refused by name', () => {
  const saved = process.env.TSEP_NORMAL_CHUNKS;
  try {
    delete process.env.TSEP_NORMAL_CHUNKS;
    assert.equal(chunkCount(4096), 1024);
    assert.equal(chunkCount(127), 127);
    assert.equal(chunkCount(1), 1);
    assert.equal(chunkCount(0), 1);
    process.env.TSEP_NORMAL_CHUNKS = '4096';
    assert.equal(chunkCount(4096), 4096);
    assert.equal(chunkCount(100_000), 4096);
    for (const bad of ['0', '-3', '2.5', 'many', '70000']) {
      process.env.TSEP_NORMAL_CHUNKS = bad;
      assert.throws(
        () => chunkCount(4096),
        (e: unknown) => e instanceof ValidationError && e.message.includes('TSEP_NORMAL_CHUNKS'),
        bad,
      );
    }
  } finally {
    if (saved === undefined) delete process.env.TSEP_NORMAL_CHUNKS;
    else process.env.TSEP_NORMAL_CHUNKS = saved;
  }
});

test('buffer areas are ordered, 256-byte aligned and large enough; no chunk words for numChunks 0', () => {
  for (const [R, T, H, K] of [
    [2, 127, 2560, 6],
    [4, 4096, 7168, 8],
    [8, 1, 4096, 1],
  ] as const) {
    const numChunks = chunkCount(T, 1024);
    const a = normalAreas(R, T, H, K, numChunks);
    const rows = R * T;
    assert.equal(a.rows, rows);
    assert.equal(a.chunks, CTRL_BYTES);
    assert.equal(a.combineChunks, CTRL_BYTES + R * numChunks * 8);
    const order: [number, number][] = [
      [a.chunks, R * numChunks * 8],
      [a.combineChunks, R * numChunks * 8],
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
    const none = normalAreas(R, T, H, K, 0);
    assert.equal(none.chunks, 0);
    assert.equal(none.combineChunks, 0);
    assert.equal(none.x, CTRL_BYTES);
  }
});

test('integer settings from the environment: default, bounds, refusal by name', () => {
  delete process.env.TSEP_TEST_KNOB;
  assert.equal(intSetting('TSEP_TEST_KNOB', 7, 1, 9), 7);
  process.env.TSEP_TEST_KNOB = '9';
  assert.equal(intSetting('TSEP_TEST_KNOB', 7, 1, 9), 9);
  process.env.TSEP_TEST_KNOB = '10';
  assert.throws(() => intSetting('TSEP_TEST_KNOB', 7, 1, 9), ValidationError);
  delete process.env.TSEP_TEST_KNOB;
});
