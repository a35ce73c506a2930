// The seeded PRNG: reproducible, in range, and varied.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';

describe('Rng', () => {
  it('repeats a sequence for a seed and differs between seeds', () => {
    const a = new Rng(42);
    const b = new Rng(42);
    const c = new Rng(43);
    const sa = Array.from({ length: 8 }, () => a.u32());
    assert.deepEqual(
      sa,
      Array.from({ length: 8 }, () => b.u32()),
    );
    assert.notDeepEqual(
      sa,
      Array.from({ length: 8 }, () => c.u32()),
    );
  });

  it('draws floats in [0, 1) and integers in [0, n) covering the range', () => {
    const rng = new Rng(0);
    const seen = new Set<number>();
    for (let i = 0; i < 2000; i++) {
      const f = rng.float();
      assert.ok(f >= 0 && f < 1);
      const k = rng.int(7);
      assert.ok(Number.isInteger(k) && k >= 0 && k < 7);
      seen.add(k);
    }
    assert.equal(seen.size, 7);
  });

  it('draws normals with mean ≈ 0 and variance ≈ 1', () => {
    const rng = new Rng(5);
    const n = 20000;
    let sum = 0;
    let sq = 0;
    for (let i = 0; i < n; i++) {
      const v = rng.normal();
      sum += v;
      sq += v * v;
    }
    assert.ok(Math.abs(sum / n) < 0.05);
    assert.ok(Math.abs(sq / n - 1) < 0.05);
  });

  it('draws k distinct integers from [0, n)', () => {
    const rng = new Rng(9);
    for (let i = 0; i < 100; i++) {
      const d = Array.from(rng.distinct(10, 4));
      assert.equal(new Set(d).size, 4);
      for (const v of d) assert.ok(v >= 0 && v < 10);
    }
  });
});
