import assert from 'node:assert/strict';
import { test } from 'node:test';
import { contiguousStrides, HostTensor, isContiguous, storageExtent } from '../../src/device/tensor.ts';
import { ValidationError } from '../../src/errors.ts';

test('row-major strides and contiguity', () => {
  assert.deepEqual(contiguousStrides([2, 3, 4]), [12, 4, 1]);
  assert.ok(isContiguous({ shape: [2, 3], strides: [3, 1] }));
  assert.ok(!isContiguous({ shape: [2, 3], strides: [1, 2] }));
  assert.ok(isContiguous({ shape: [1, 3], strides: [99, 1] }), 'size-1 dims may have any stride');
  assert.equal(storageExtent([2, 3], [1, 2]), 6);
  assert.equal(storageExtent([0, 3], [3, 1]), 0);
});

test('a column-major view packs to the transposed order', () => {
  // Storage holds a [3, 2] row-major matrix; viewed as [2, 3] with strides [1, 2] it is its transpose.
  const t = HostTensor.from('f32', [2, 3], Float32Array.from([1, 2, 3, 4, 5, 6]), [1, 2]);
  assert.equal(t.isContiguous(), false);
  assert.deepEqual([...t.contiguous().data], [1, 3, 5, 2, 4, 6]);
  assert.deepEqual([...t.transpose(0, 1).contiguous().data], [1, 2, 3, 4, 5, 6]);
  assert.equal(t.data[t.offsetOf(1, 2)], 6);
});

test('int64 tensors and shared storage', () => {
  const t = HostTensor.empty('i64', [2, 2], { shared: true });
  assert.ok(t.data.buffer instanceof SharedArrayBuffer);
  t.data[3] = -1n;
  assert.equal(t.contiguous().data[3], -1n);
  assert.equal(t.byteLength, 32);
});

test('bad shapes and short storage are rejected', () => {
  assert.throws(() => HostTensor.empty('f32', [-1]), ValidationError);
  assert.throws(() => HostTensor.empty('f32', [1.5]), ValidationError);
  assert.throws(() => HostTensor.from('f32', [4], new Float32Array(3)), ValidationError);
  assert.throws(() => HostTensor.from('f32', [2, 2], new Float32Array(4), [2]), ValidationError);
});

test('factories refuse an unknown dtype and data of the wrong typed array kind (callers from JavaScript)', () => {
  const refuses = (f: () => unknown, argument: string, message: RegExp) =>
    assert.throws(f, (e: unknown) => {
      assert.ok(e instanceof ValidationError, String(e));
      assert.equal(e.argument, argument);
      assert.match(e.message, message);
      return true;
    });
  const js = HostTensor as unknown as {
    empty(dtype: string, shape: number[]): HostTensor;
    from(dtype: string, shape: number[], data: unknown): HostTensor;
  };
  refuses(() => js.empty('f64', [2, 4]), 'dtype', /got "f64"; need one of bf16, f16, f32/);
  refuses(() => js.from('f32', [2], new Int32Array(2)), 'data', /got Int32Array; need Float32Array/);
  refuses(
    () => js.from('bf16', [2], [1, 2]),
    'data',
    /got Array; need Uint16Array \(the raw elements of bf16\)/,
  );
  // Every dtype's own kind is taken (a Node Buffer is a Uint8Array).
  assert.equal(HostTensor.from('u8', [2], Buffer.alloc(2)).numel, 2);
  assert.equal(HostTensor.from('i64', [2], new BigInt64Array(2)).dtype, 'i64');
  assert.equal(HostTensor.empty('fp8_e4m3', [3]).data.length, 3);
});
