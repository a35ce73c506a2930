// Small conversions the reference and the CPU backend share: narrowing EP tensors to host tensors,
// reading index tensors of either integer width, building index tensors of a chosen width, and row
// copies between raw element arrays.

import { describe, HostTensor } from '../device/tensor.ts';
import type { Tensor } from '../ep/types.ts';
import { ValidationError } from '../errors.ts';

export type IndexDType = 'i32' | 'i64';

/** The CPU backend computes on host memory: `t` (the argument named `argument`) must be a HostTensor. */
export function hostTensor(argument: string, t: Tensor): HostTensor {
  if (!(t instanceof HostTensor)) {
    throw new ValidationError(argument, describe(t), 'a HostTensor: the CPU backend works on host memory');
  }
  return t;
}

/** `hostTensor` for an optional argument: undefined stays undefined. */
export function optionalHostTensor(argument: string, t: Tensor | undefined): HostTensor | undefined {
  return t === undefined ? undefined : hostTensor(argument, t);
}

/** Values of an i32 or i64 tensor in row-major order, as int32 (expert ids and token indices fit). */
export function indexValues(t: HostTensor): Int32Array {
  const c = t.contiguous();
  if (c.dtype === 'i32') return c.data as Int32Array;
  if (c.dtype !== 'i64') throw new TypeError(`expected an i32 or i64 tensor, got ${c.dtype}`);
  const src = c.data as BigInt64Array;
  const out = new Int32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = Number(src[i]!);
  return out;
}

/** A row-major index tensor of the given width holding `values`. */
export function indexTensor(dtype: IndexDType, shape: readonly number[], values: Int32Array): HostTensor {
  if (dtype === 'i32') return HostTensor.from('i32', shape, values);
  const out = HostTensor.empty('i64', shape);
  for (let i = 0; i < values.length; i++) out.data[i] = BigInt(values[i]!);
  return out;
}

/** The raw elements of a tensor in row-major order (no copy when it already is row-major). */
export function rowMajorData(t: HostTensor): HostTensor['data'] {
  return t.contiguous().data;
}

/** Copies row `srcRow` of a row-major [*, width] array into row `dstRow` of another. */
export function copyRow(
  src: HostTensor['data'],
  srcRow: number,
  dst: HostTensor['data'],
  dstRow: number,
  width: number,
): void {
  const from = srcRow * width;
  // Both sides always have the same element kind: they come from tensors of one dtype.
  (dst as Uint8Array).set((src as Uint8Array).subarray(from, from + width), dstRow * width);
}
