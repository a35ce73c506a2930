// The GPU normal mode's buffer layout and dispatch chunking (host-side arithmetic the kernels rely on).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';
import { dispatchChunks } from '../../src/ep/gpu/normal-kernels.ts';
import { CTRL_BYTES, normalAreas } from '../../src/ep/gpu/normal-layout.ts';
import { intSetting } from '../../src/ep/gpu/settings.ts';
import { ValidationError } from '../../src/errors.ts';

test('dispatch chunks cover every token, at most 1024 per source, none wholly past T_max', () => {
  const rng = new Rng(Date.now() >>> 0);
  const sizes = [
    1,
    2,
    7,
    1023,
    1024,
    1025,
    4096,
    8191,
    100_000,
    ...Array.from({ length: 20 }, () => 1 + rng.int(200_000)),
  ];
  for (const T of sizes) {
    const { chunkTokens, numChunks } = dispatchChunks(T);
    assert.ok(Number.isInteger(chunkTokens) && chunkTokens >= 1, `T=${T}`);
    assert.ok(numChunks >= 1 && numChunks <= 1024, `T=${T}: ${numChunks} chunks`);
    assert.ok(chunkTokens * numChunks >= T, `T=${T}: chunks cover ${chunkTokens * numChunks}`);
    assert.ok((numChunks - 1) * chunkTokens < T, `T=${T}: last chunk starts past T_max`);
  }
});

test('buffer areas are ordered, 256-byte aligned and large enough; no chunk words for numChunks 0', () => {
  for (const [R, T, H, K] of [
    [2, 127, 2560, 6],
    [4, 4096, 7168, 8],
    [8, 1, 4096, 1],
  ] as const) {
    const { numChunks } = dispatchChunks(T);
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

test('TSEP_NORMAL_CHUNKS sets the chunk count; bad values of the integer knobs are refused by name', () => {
  const saved = process.env.TSEP_NORMAL_CHUNKS;
  try {
    process.env.TSEP_NORMAL_CHUNKS = '4096';
    assert.deepEqual(dispatchChunks(4096), { chunkTokens: 1, numChunks: 4096 });
    assert.deepEqual(dispatchChunks(10_000), { chunkTokens: 3, numChunks: 3334 });
    for (const bad of ['0', '-3', '2.5', 'many', '70000']) {
      process.env.TSEP_NORMAL_CHUNKS = bad;
      assert.throws(
        () => dispatchChunks(4096),
        (e: unknown) => e instanceof ValidationError && e.message.includes('TSEP_NORMAL_CHUNKS'),
        bad,
      );
    }
  } finally {
    if (saved === undefined) delete process.env.TSEP_NORMAL_CHUNKS;
    else process.env.TSEP_NORMAL_CHUNKS = saved;
  }
  delete process.env.TSEP_TEST_KNOB;
  assert.equal(intSetting('TSEP_TEST_KNOB', 7, 1, 9), 7);
  process.env.TSEP_TEST_KNOB = '9';
  assert.equal(intSetting('TSEP_TEST_KNOB', 7, 1, 9), 9);
  process.env.TSEP_TEST_KNOB = '10';
  assert.throws(() => intSetting('TSEP_TEST_KNOB', 7, 1, 9), ValidationError);
  delete process.env.TSEP_TEST_KNOB;
});
