// DeviceTensor: DLPack-shaped view of device memory (data pointer, device, dtype, shape, strides in
// elements). A tensor either owns its DeviceBuffer or views someone else's memory (e.g. a peer buffer).

import { ValidationError } from '../errors.ts';
import { cu } from '../native/cuda.ts';
import { Device } from './context.ts';
import { type DType, dtypeSize, elementView } from './dtypes.ts';
import { copyHostToDevice, DeviceBuffer, setBytes } from './memory.ts';
import type { Stream } from './stream.ts';
import {
  checkShape,
  contiguousStrides,
  describe,
  HostTensor,
  isContiguous,
  numel,
  storageExtent,
  type TensorDevice,
  type TensorMeta,
} from './tensor.ts';

/** TSEP_POISON_OUTPUTS, read at the first pool allocation (a script may set it before its first call). */
let poisonPool: boolean | undefined;

/**
 * The byte tests fill outputs with before a call: neither 0 nor 0xff, so it matches neither the zeros nor
 * the -1 (all bytes 0xff) that outputs hold as padding, in any dtype (as bf16 or f32 a small negative number).
 */
export const POISON_BYTE = 0xa5;

export class DeviceTensor<D extends DType = DType> implements TensorMeta {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly strides: readonly number[];
  readonly device: TensorDevice;
  /** Address of element [0, 0, ...]. */
  readonly ptr: bigint;
  /** The allocation this tensor owns, if any (disposed with the tensor). */
  readonly owner: DeviceBuffer | undefined;
  /** For views: the allocation they look into, kept reachable so it is not garbage-collected first. */
  private readonly keepAlive: DeviceBuffer | undefined;

  constructor(
    dtype: D,
    shape: readonly number[],
    ptr: bigint,
    options: {
      strides?: readonly number[];
      owner?: DeviceBuffer;
      device?: Device;
      keepAlive?: DeviceBuffer;
    } = {},
  ) {
    checkShape('shape', shape);
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.strides = Object.freeze([...(options.strides ?? contiguousStrides(shape))]);
    if (this.strides.length !== this.shape.length) {
      throw new ValidationError('strides', `${this.strides.length} strides`, `${this.shape.length}`);
    }
    const dev = options.owner?.device ?? options.device ?? Device.current();
    this.device = Object.freeze({ kind: 'cuda', ordinal: dev.ordinal });
    this.ptr = ptr;
    this.owner = options.owner;
    this.keepAlive = options.keepAlive;
  }

  /** A new row-major tensor with undefined contents. */
  static empty<D extends DType>(dtype: D, shape: readonly number[], device: Device = Device.current()) {
    checkShape('shape', shape);
    const buf = DeviceBuffer.alloc(numel(shape) * dtypeSize(dtype), device);
    return new DeviceTensor(dtype, shape, buf.ptr, { owner: buf });
  }

  /**
   * A new row-major tensor from the stream-ordered pool (see DeviceBuffer.allocAsync): cheap, and ready
   * for `stream`'s later work; `dispose()` frees it on `freeOn` (default: that stream). With
   * TSEP_POISON_OUTPUTS=1 (the GPU tests set it) it starts as POISON_BYTE bytes, in stream order, so a kernel that
   * leaves an element unwritten shows instead of passing on fresh pool memory that happens to be zero.
   */
  static emptyOn<D extends DType>(
    dtype: D,
    shape: readonly number[],
    stream: Stream,
    freeOn: Stream = stream,
  ) {
    checkShape('shape', shape);
    const bytes = numel(shape) * dtypeSize(dtype);
    const buf = DeviceBuffer.allocAsync(bytes, stream, freeOn);
    poisonPool ??= process.env.TSEP_POISON_OUTPUTS === '1';
    if (poisonPool && bytes > 0) buf.fill(POISON_BYTE, stream);
    return new DeviceTensor(dtype, shape, buf.ptr, { owner: buf });
  }

  /** A new row-major tensor filled with zero bytes. */
  static zeros<D extends DType>(dtype: D, shape: readonly number[], device: Device = Device.current()) {
    const t = DeviceTensor.empty(dtype, shape, device);
    t.owner!.fill(0);
    return t;
  }

  /** Copies a host tensor to the device (row-major result; strided inputs are packed first). */
  static fromHost<D extends DType>(host: HostTensor<D>, device: Device = Device.current()): DeviceTensor<D> {
    const t = DeviceTensor.empty(host.dtype, host.shape, device);
    t.copyFromHost(host);
    return t;
  }

  /** Copies a host tensor's storage as is, keeping its strides (e.g. a column-major view stays one). */
  static fromHostStorage<D extends DType>(
    host: HostTensor<D>,
    device: Device = Device.current(),
  ): DeviceTensor<D> {
    const bytes = storageExtent(host.shape, host.strides) * dtypeSize(host.dtype);
    const buf = DeviceBuffer.alloc(bytes, device);
    buf.copyFromHost(host.bytes().subarray(0, bytes));
    return new DeviceTensor(host.dtype, host.shape, buf.ptr, { owner: buf, strides: host.strides });
  }

  /** Copies a host tensor of the same dtype and shape into this (contiguous) tensor, synchronously. */
  copyFromHost(host: HostTensor): void {
    if (host.dtype !== this.dtype || host.shape.join() !== this.shape.join()) {
      throw new ValidationError('source tensor', describe(host), `${this.dtype}[${this.shape.join(', ')}]`);
    }
    if (!this.isContiguous()) throw new ValidationError('destination', describe(this), 'a contiguous tensor');
    if (this.byteLength === 0) return;
    this.deviceObject();
    this.settle();
    copyHostToDevice(this.ptr, host.contiguous().bytes().subarray(0, this.byteLength));
  }

  get numel(): number {
    return numel(this.shape);
  }

  get byteLength(): number {
    return this.numel * dtypeSize(this.dtype);
  }

  /** Bytes from `ptr` to one past the last reachable element. */
  get extentBytes(): number {
    return storageExtent(this.shape, this.strides) * dtypeSize(this.dtype);
  }

  isContiguous(): boolean {
    return isContiguous(this);
  }

  /** Before a synchronous copy or fill: a pool tensor's stream has done its earlier work (DeviceBuffer.settle). */
  private settle(): void {
    (this.owner ?? this.keepAlive)?.settle();
  }

  private deviceObject(): Device {
    return Device.get(this.device.ordinal);
  }

  /**
   * Copies to a new host tensor with the same shape and strides layout packed row-major. A pool tensor
   * (a layout or normal-mode output) is read after its stream's work; for any other tensor (low-latency
   * outputs, memory you allocated) wait for the work that writes it first (e.g. `await result.event.wait()`):
   * a synchronous copy joins no stream of ours.
   */
  toHost(): HostTensor<D> {
    const extent = storageExtent(this.shape, this.strides);
    const host = new Uint8Array(extent * dtypeSize(this.dtype));
    if (host.byteLength > 0) {
      this.deviceObject();
      this.settle();
      cu('cuMemcpyDtoH_v2', host, this.ptr, host.byteLength);
    }
    const data = elementView(this.dtype, host.buffer, 0, extent);
    return new HostTensor(this.dtype, this.shape, data, this.strides).contiguous();
  }

  /**
   * Sets every byte of the tensor (contiguous tensors only): in `stream`'s order, or, without a stream,
   * after a pool tensor's stream and done when the call returns.
   */
  fillBytes(value: number, stream?: Stream): void {
    if (!this.isContiguous()) throw new ValidationError('tensor', describe(this), 'a contiguous tensor');
    if (this.byteLength === 0) return;
    this.deviceObject();
    if (!stream) this.settle();
    setBytes(this.ptr, value, this.byteLength, stream);
  }

  /** A view of the same memory with another shape (contiguous tensors only). */
  view(shape: readonly number[]): DeviceTensor<D> {
    if (!this.isContiguous() || numel(shape) !== this.numel) {
      throw new ValidationError(
        'shape',
        `[${shape.join(', ')}] for ${describe(this)}`,
        'the same element count',
      );
    }
    return new DeviceTensor(this.dtype, shape, this.ptr, {
      device: this.deviceObject(),
      keepAlive: this.owner ?? this.keepAlive,
    });
  }

  /** Frees the memory if this tensor owns it. Views are not affected by their own dispose. */
  dispose(): void {
    this.owner?.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
