// Tensor metadata shared by host and device tensors (DLPack-shaped: dtype, shape, strides in elements,
// device), and HostTensor, the CPU-resident tensor the CPU backend and the tests work with.

import { ValidationError } from '../errors.ts';
import {
  DTYPES,
  type DType,
  dtypeSize,
  type ElementArray,
  elementArrayName,
  elementView,
  holdsElementsOf,
  isDType,
} from './dtypes.ts';

export type DeviceKind = 'cpu' | 'cuda';

export interface TensorDevice {
  readonly kind: DeviceKind;
  /** GPU ordinal for 'cuda', 0 for 'cpu'. */
  readonly ordinal: number;
}

export const CPU: TensorDevice = Object.freeze({ kind: 'cpu', ordinal: 0 });

/** What every tensor exposes, wherever its memory lives. Strides count elements, not bytes. */
export interface TensorMeta {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly strides: readonly number[];
  readonly device: TensorDevice;
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Row-major (C-order) strides for a shape. */
export function contiguousStrides(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  let s = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i] = s;
    s *= shape[i]!;
  }
  return strides;
}

/** True when the tensor's elements are laid out row-major without gaps (size-1 dims may have any stride). */
export function isContiguous(t: Pick<TensorMeta, 'shape' | 'strides'>): boolean {
  let expected = 1;
  for (let i = t.shape.length - 1; i >= 0; i--) {
    const d = t.shape[i]!;
    if (d !== 1 && t.strides[i] !== expected) return false;
    expected *= d;
  }
  return true;
}

/** Elements the storage must hold for the largest index reachable through shape and strides. */
export function storageExtent(shape: readonly number[], strides: readonly number[]): number {
  if (shape.some((d) => d === 0)) return 0;
  let last = 0;
  for (let i = 0; i < shape.length; i++) last += (shape[i]! - 1) * strides[i]!;
  return last + 1;
}

export function checkShape(argument: string, shape: readonly number[]): void {
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new ValidationError(argument, `shape [${shape.join(', ')}]`, 'non-negative integer dimensions');
    }
  }
}

/** Throws ValidationError unless `dtype` is one of DTYPES (callers from JavaScript pass any string). */
function checkDType(argument: string, dtype: unknown): asserts dtype is DType {
  if (!isDType(dtype))
    throw new ValidationError(argument, JSON.stringify(dtype), `one of ${DTYPES.join(', ')}`);
}

export function describe(t: TensorMeta): string {
  return `${t.dtype}[${t.shape.join(', ')}]${isContiguous(t) ? '' : ` strides [${t.strides.join(', ')}]`} on ${
    t.device.kind === 'cpu' ? 'cpu' : `cuda:${t.device.ordinal}`
  }`;
}

export interface HostTensorOptions {
  /** Back the tensor by a SharedArrayBuffer so worker threads can see it. */
  shared?: boolean;
}

/** A tensor in host memory. `data` views exactly the storage, in the dtype's raw element form. */
export class HostTensor<D extends DType = DType> implements TensorMeta {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly strides: readonly number[];
  readonly device: TensorDevice = CPU;
  /** Raw elements of the storage (bf16 as uint16 codes, fp8 and bool as bytes). */
  readonly data: ElementArray<D>;

  constructor(dtype: D, shape: readonly number[], data: ElementArray<D>, strides?: readonly number[]) {
    checkDType('dtype', dtype);
    checkShape('shape', shape);
    if (!holdsElementsOf(dtype, data)) {
      const got = (data as unknown as { constructor?: { name?: string } })?.constructor?.name ?? typeof data;
      throw new ValidationError('data', got, `${elementArrayName(dtype)} (the raw elements of ${dtype})`);
    }
    const st = strides ?? contiguousStrides(shape);
    if (st.length !== shape.length) {
      throw new ValidationError('strides', `${st.length} strides`, `${shape.length}, one per dimension`);
    }
    const need = storageExtent(shape, st);
    if (data.length < need) {
      throw new ValidationError(
        'data',
        `${data.length} elements`,
        `at least ${need} for shape [${shape.join(', ')}]`,
      );
    }
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.strides = Object.freeze([...st]);
    this.data = data;
  }

  static empty<D extends DType>(
    dtype: D,
    shape: readonly number[],
    options: HostTensorOptions = {},
  ): HostTensor<D> {
    checkDType('dtype', dtype);
    checkShape('shape', shape);
    const n = numel(shape);
    const bytes = n * dtypeSize(dtype);
    const buf = options.shared ? new SharedArrayBuffer(bytes) : new ArrayBuffer(bytes);
    return new HostTensor(dtype, shape, elementView(dtype, buf, 0, n));
  }

  /** Same as `empty`: host allocations are zero-filled. */
  static zeros<D extends DType>(
    dtype: D,
    shape: readonly number[],
    options: HostTensorOptions = {},
  ): HostTensor<D> {
    return HostTensor.empty(dtype, shape, options);
  }

  /** Wraps (does not copy) a typed array of raw elements, row-major unless strides are given. */
  static from<D extends DType>(
    dtype: D,
    shape: readonly number[],
    data: ElementArray<D>,
    strides?: readonly number[],
  ): HostTensor<D> {
    return new HostTensor(dtype, shape, data, strides);
  }

  get numel(): number {
    return numel(this.shape);
  }

  get byteLength(): number {
    return this.numel * dtypeSize(this.dtype);
  }

  isContiguous(): boolean {
    return isContiguous(this);
  }

  /** Storage index of a multi-index. */
  offsetOf(...index: number[]): number {
    let o = 0;
    for (let i = 0; i < index.length; i++) o += index[i]! * this.strides[i]!;
    return o;
  }

  /** A row-major copy (or this tensor when it already is row-major and tightly packed). */
  contiguous(options: HostTensorOptions = {}): HostTensor<D> {
    if (this.isContiguous() && this.data.length === this.numel && !options.shared) return this;
    const out = HostTensor.empty(this.dtype, this.shape, options);
    const n = this.numel;
    const idx = new Array<number>(this.shape.length).fill(0);
    const src = this.data as unknown as { [i: number]: number | bigint };
    const dst = out.data as unknown as { [i: number]: number | bigint };
    // Walk the index like an odometer, keeping the storage offset up to date (no per-element recompute).
    let offset = 0;
    for (let i = 0; i < n; i++) {
      dst[i] = src[offset]!;
      for (let d = idx.length - 1; d >= 0; d--) {
        offset += this.strides[d]!;
        if (++idx[d]! < this.shape[d]!) break;
        offset -= this.strides[d]! * this.shape[d]!;
        idx[d] = 0;
      }
    }
    return out;
  }

  /** The same storage seen with two dimensions swapped (no copy). */
  transpose(a: number, b: number): HostTensor<D> {
    const shape = [...this.shape];
    const strides = [...this.strides];
    [shape[a], shape[b]] = [shape[b]!, shape[a]!];
    [strides[a], strides[b]] = [strides[b]!, strides[a]!];
    return new HostTensor(this.dtype, shape, this.data, strides);
  }

  /** Raw bytes of the storage. */
  bytes(): Uint8Array {
    return new Uint8Array(this.data.buffer, this.data.byteOffset, this.data.byteLength);
  }
}
