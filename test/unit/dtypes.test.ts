import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  bf16ArrayToF32,
  bf16ToF32,
  bitsToF32,
  ceilPow2F32,
  dequantizeFp8,
  f32ArrayToBf16,
  f32Bits,
  f32ToBf16,
  f32ToFp8E4m3,
  fp8E4m3ToF32,
  packUe8m0,
  quantizeFp8,
  unpackUe8m0,
} from '../../src/device/dtypes.ts';

// Reference bf16 rounding by brute force: pick the nearer of the two neighbouring bf16 values, ties to
// the even code. Independent of the bit trick under test.
function bf16Reference(x: number): number {
  const bits = f32Bits(x);
  const down = bits >>> 16;
  const up = (down + 1) & 0xffff;
  const lo = bf16ToF32(down);
  // Past the largest finite bf16 the next step is 2^128 (which then rounds to infinity).
  const hi = Number.isFinite(bf16ToF32(up)) ? bf16ToF32(up) : Math.sign(x) * 2 ** 128;
  const dLo = Math.abs(x - lo);
  const dHi = Math.abs(hi - x);
  if (dLo < dHi) return down;
  if (dHi < dLo) return up;
  return down % 2 === 0 ? down : up;
}

test('every bf16 code round-trips through float32 exactly', () => {
  for (let c = 0; c < 65536; c++) {
    const v = bf16ToF32(c);
    if (Number.isNaN(v)) {
      assert.ok(Number.isNaN(bf16ToF32(f32ToBf16(v))), `code ${c}`);
      continue;
    }
    assert.equal(f32ToBf16(v), c, `code ${c} (${v})`);
  }
});

test('float32 -> bf16 rounds to nearest even, including every tie between neighbouring codes', () => {
  for (let c = 0; c < 65536; c++) {
    const exp = (c >> 7) & 0xff;
    if (exp === 0xff) continue; // NaN/Inf codes have no neighbour above to tie with
    for (const low of [0x0001, 0x7fff, 0x8000, 0x8001, 0xffff]) {
      const x = bitsToF32(((c << 16) | low) >>> 0);
      if (!Number.isFinite(x)) continue;
      const want = bf16Reference(x);
      assert.equal(f32ToBf16(x), want, `bits ${(((c << 16) | low) >>> 0).toString(16)}`);
    }
  }
  assert.equal(f32ToBf16(Number.POSITIVE_INFINITY), 0x7f80);
  assert.equal(f32ToBf16(Number.NEGATIVE_INFINITY), 0xff80);
  assert.ok(Number.isNaN(bf16ToF32(f32ToBf16(Number.NaN))));
  assert.equal(f32ToBf16(3.4e38), 0x7f80, 'a value past the largest bf16 rounds to infinity');
});

test('bulk bf16 conversions equal the scalar ones', () => {
  const x = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 10 ** ((i % 20) - 10));
  const codes = f32ArrayToBf16(x);
  const back = bf16ArrayToF32(codes);
  for (let i = 0; i < x.length; i++) {
    assert.equal(codes[i], f32ToBf16(x[i]!));
    assert.equal(back[i], bf16ToF32(codes[i]!));
  }
});

test('every fp8 e4m3 code decodes to its value and encodes back to itself', () => {
  const values = new Set<number>();
  for (let c = 0; c < 256; c++) {
    const v = fp8E4m3ToF32(c);
    if ((c & 0x7f) === 0x7f) {
      assert.ok(Number.isNaN(v), `code ${c} is NaN`);
      assert.equal(f32ToFp8E4m3(v) & 0x7f, 0x7f);
      continue;
    }
    const back = f32ToFp8E4m3(v);
    // +0 and -0 are distinct codes and must stay distinct.
    assert.equal(back, c, `code ${c} (${v})`);
    if (c < 0x80) values.add(v);
  }
  assert.equal(values.size, 127);
  assert.equal(fp8E4m3ToF32(0x7e), 448);
  assert.equal(fp8E4m3ToF32(0x01), 2 ** -9);
  assert.equal(fp8E4m3ToF32(0x08), 2 ** -6);
});

test('float32 -> fp8 e4m3: nearest even between neighbours, saturating at ±448', () => {
  const positive = Array.from({ length: 127 }, (_, c) => fp8E4m3ToF32(c));
  for (let c = 0; c < 126; c++) {
    const lo = positive[c]!;
    const hi = positive[c + 1]!;
    const mid = (lo + hi) / 2;
    const evenCode = c % 2 === 0 ? c : c + 1;
    assert.equal(f32ToFp8E4m3(mid), evenCode, `tie between ${lo} and ${hi}`);
    assert.equal(f32ToFp8E4m3(-mid), 0x80 | evenCode);
    assert.equal(f32ToFp8E4m3(lo + (hi - lo) * 0.25), c);
    assert.equal(f32ToFp8E4m3(lo + (hi - lo) * 0.75), c + 1);
  }
  for (const big of [448, 449, 464, 500, 1e6, Number.POSITIVE_INFINITY]) {
    assert.equal(f32ToFp8E4m3(big), 0x7e, `${big}`);
    assert.equal(f32ToFp8E4m3(-big), 0xfe, `-${big}`);
  }
  assert.equal(f32ToFp8E4m3(2 ** -10), 0, 'half the smallest subnormal ties to even (0)');
  assert.equal(f32ToFp8E4m3(1.5 * 2 ** -9), 2, '1.5 steps ties to even (2)');
});

test('power-of-two ceiling', () => {
  assert.equal(ceilPow2F32(1), 1);
  assert.equal(ceilPow2F32(1.0000001), 2);
  assert.equal(ceilPow2F32(0.3), 0.5);
  assert.equal(ceilPow2F32(2 ** -20), 2 ** -20);
});

test('per-128-channel FP8 quantization: scales, codes, round trip and UE8M0 packing', () => {
  const rows = 3;
  const hidden = 300; // two full blocks and a partial one
  const x = new Float32Array(rows * hidden);
  for (let i = 0; i < x.length; i++)
    x[i] = Math.fround(Math.sin(i * 0.37) * (1 + (i % 7)) * (i % 128 === 5 ? 50 : 1));
  const q = quantizeFp8(x, rows, hidden);
  assert.equal(q.scales.length, rows * 3);
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < 3; b++) {
      let amax = 0;
      for (let c = b * 128; c < Math.min(hidden, (b + 1) * 128); c++)
        amax = Math.max(amax, Math.abs(x[r * hidden + c]!));
      assert.equal(q.scales[r * 3 + b], Math.fround(Math.max(amax, Math.fround(1e-4)) / 448));
    }
  }
  const back = dequantizeFp8(q.data, q.scales, rows, hidden);
  for (let i = 0; i < x.length; i++) {
    const s = q.scales[Math.floor(i / hidden) * 3 + Math.floor((i % hidden) / 128)]!;
    // e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for normals, absolute ≤ half a subnormal step.
    assert.ok(
      Math.abs(back[i]! - x[i]!) <= Math.max(Math.abs(x[i]!) / 16, s * 2 ** -10) + 1e-12,
      `element ${i}`,
    );
  }
  const u = quantizeFp8(x, rows, hidden, { ue8m0: true });
  for (const s of u.scales) assert.equal(ceilPow2F32(s), s, 'UE8M0 implies power-of-two scales');
  assert.deepEqual(unpackUe8m0(u.packed!, rows, 3), u.scales);
  assert.deepEqual(packUe8m0(u.scales, rows, 3), u.packed);
  assert.equal(u.packed!.length, rows * 1);
});

test('all-zero blocks use the 1e-4 amax floor (no division by zero)', () => {
  const q = quantizeFp8(new Float32Array(128), 1, 128);
  assert.equal(q.scales[0], Math.fround(Math.fround(1e-4) / 448));
  assert.ok(q.data.every((c) => c === 0));
});
