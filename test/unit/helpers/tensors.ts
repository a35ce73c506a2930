// Tensor builders and an exact comparison for tests.

import assert from 'node:assert/strict';
import { dtypeSize, f32ToBf16 } from '../../../src/device/dtypes.ts';
import { HostTensor } from '../../../src/device/tensor.ts';
import type { Tensor } from '../../../src/ep/types.ts';

/** `t` as a HostTensor, asserting it is one (the CPU backend's results are). */
export function asHost(t: Tensor, what = 'tensor'): HostTensor {
  assert.ok(t instanceof HostTensor, `${what}: expected a HostTensor`);
  return t;
}

/** A bf16 tensor from float values (rounded to bf16). */
export function bf16(shape: readonly number[], values: readonly number[]): HostTensor<'bf16'> {
  return HostTensor.from('bf16', shape, Uint16Array.from(values, f32ToBf16));
}

export function i32(shape: readonly number[], values: readonly number[]): HostTensor<'i32'> {
  return HostTensor.from('i32', shape, Int32Array.from(values));
}

export function i64(shape: readonly number[], values: readonly number[]): HostTensor<'i64'> {
  return HostTensor.from(
    'i64',
    shape,
    BigInt64Array.from(values, (v) => BigInt(v)),
  );
}

export function f32(shape: readonly number[], values: readonly number[]): HostTensor<'f32'> {
  return HostTensor.from('f32', shape, Float32Array.from(values));
}

export function bool(shape: readonly number[], values: readonly number[]): HostTensor<'bool'> {
  return HostTensor.from('bool', shape, Uint8Array.from(values));
}

/** Logical elements in row-major order (strides honoured), as numbers; `t` must be a HostTensor. */
export function values(t: Tensor): number[] {
  return Array.from(asHost(t).contiguous().data as ArrayLike<number | bigint>, Number);
}

/**
 * Same dtype, shape and every element bit for bit (compared in logical row-major order); both must be
 * HostTensors.
 */
export function assertTensorEqual(
  actual: Tensor | undefined,
  expected: Tensor | undefined,
  what: string,
): void {
  if (expected === undefined) {
    assert.equal(actual, undefined, `${what}: expected no tensor`);
    return;
  }
  assert.ok(actual, `${what}: missing`);
  assert.equal(actual.dtype, expected.dtype, `${what}: dtype`);
  assert.deepEqual(actual.shape, expected.shape, `${what}: shape`);
  // Compare raw bytes: bit for bit (NaN payloads, -0) rather than by value.
  const a = asHost(actual, what).contiguous();
  const e = asHost(expected, `${what} (expected)`).contiguous();
  const ab = a.bytes();
  const eb = e.bytes();
  const size = dtypeSize(expected.dtype);
  for (let i = 0; i < eb.length; i++) {
    if (ab[i] !== eb[i]) {
      const at = Math.floor(i / size);
      const av = (a.data as ArrayLike<number | bigint>)[at];
      const ev = (e.data as ArrayLike<number | bigint>)[at];
      assert.fail(
        `${what}: element ${at} of ${e.numel} (shape [${expected.shape}]) is ${av}, expected ${ev}`,
      );
    }
  }
}
