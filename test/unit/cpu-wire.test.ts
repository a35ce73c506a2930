// The CPU backend's message format: tensors and scalars survive encode/decode bit for bit.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { decodeMessage, encodeMessage } from '../../src/cpu/wire.ts';
import { HostTensor } from '../../src/device/tensor.ts';
import { assertTensorEqual, bf16, bool, f32, i32, i64 } from './helpers/tensors.ts';

describe('wire messages', () => {
  const tensors = {
    a: bf16([2, 3], [1, -2, 3.5, 0, -0, 65504]),
    b: f32([3], [Number.NaN, -1e-30, 3]),
    c: i64([2, 1], [-1, 2 ** 40]),
    d: HostTensor.from('fp8_e4m3', [5], Uint8Array.from([1, 2, 3, 4, 5])),
    e: bool([1, 2], [1, 0]),
    empty: i32([0, 4], []),
  };

  it('round-trips every dtype, odd sizes included, and the scalars', () => {
    const msg = decodeMessage(encodeMessage({ n: 3, s: 'x', f: false }, { ...tensors, gone: undefined }));
    assert.deepEqual(msg.meta, { n: 3, s: 'x', f: false });
    assert.deepEqual(Object.keys(msg.tensors).sort(), ['a', 'b', 'c', 'd', 'e', 'empty']);
    for (const [name, t] of Object.entries(tensors)) assertTensorEqual(msg.tensors[name], t, name);
  });

  it('sends strided tensors in row-major order', () => {
    const colMajor = f32([3, 2], [1, 2, 3, 4, 5, 6]).transpose(0, 1);
    const got = decodeMessage(encodeMessage({}, { t: colMajor })).tensors.t!;
    assert.deepEqual(got.strides, [3, 1]);
    assert.deepEqual(Array.from(got.data as Float32Array), [1, 3, 5, 2, 4, 6]);
  });

  it('decodes a message that sits at an unaligned offset', () => {
    const bytes = encodeMessage({}, { c: tensors.c, b: tensors.b });
    const shifted = new Uint8Array(bytes.length + 3);
    shifted.set(bytes, 3);
    const msg = decodeMessage(shifted.subarray(3));
    assertTensorEqual(msg.tensors.c, tensors.c, 'c');
    assertTensorEqual(msg.tensors.b, tensors.b, 'b');
  });
});
