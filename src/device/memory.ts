// Device and pinned host memory. DeviceBuffer owns a cuMemAlloc region; HostBuffer owns pinned host memory
// mapped into the device's address space, so a running kernel can write a counter the host polls.

import { DisposedError, ValidationError } from '../errors.ts';
import { cu, hostAllocMapped, hostFree, viewNative } from '../native/cuda.ts';
import { Device } from './context.ts';
import type { Stream } from './stream.ts';

function checkRange(what: string, offset: number, bytes: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
    throw new ValidationError(
      what,
      `offset ${offset}, ${bytes} bytes`,
      'non-negative integer offset and size',
    );
  }
  if (offset + bytes > size) {
    throw new ValidationError(
      what,
      `bytes [${offset}, ${offset + bytes})`,
      `a range inside the ${size}-byte buffer`,
    );
  }
}

function hostBytes(src: ArrayBufferView): Uint8Array {
  return new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
}

/**
 * Copies host bytes to device memory and returns when they are there. A plain cuMemcpyHtoD from pageable
 * memory may return once the bytes are staged, before the DMA lands, and our streams are non-blocking, so
 * a kernel launched next could read the old bytes (seen: a layout computed from stale ids). Copying on
 * the legacy stream and waiting for that stream waits for the DMA itself.
 */
export function copyHostToDevice(dst: bigint, src: ArrayBufferView): void {
  cu('cuMemcpyHtoDAsync_v2', dst, hostBytes(src), src.byteLength, 0n);
  cu('cuStreamSynchronize', 0n);
}

/**
 * Sets `bytes` bytes at `dst` to `value`: in `stream`'s order, or, without a stream, done when the call
 * returns. CUDA's memsets run asynchronously even without a stream, and a kernel on one of our
 * non-blocking streams is not ordered after them (seen: a dispatch read ids that a memset was to set).
 */
export function setBytes(dst: bigint, value: number, bytes: number, stream?: Stream): void {
  cu('cuMemsetD8Async', dst, value & 0xff, bytes, stream?.handle ?? 0n);
  if (!stream) cu('cuStreamSynchronize', 0n);
}

const pooled = new Set<number>();

/**
 * Returns the memory the device's stream-ordered pool holds but no allocation uses to the driver (after
 * the frees have completed: synchronize first). For measurements of what is really in use, e.g. leak
 * checks; calls after it grow the pool again.
 */
export function trimPool(device: Device): void {
  device.makeCurrent();
  const pool = new BigUint64Array(1);
  cu('cuDeviceGetDefaultMemPool', pool, device.ordinal);
  cu('cuMemPoolTrimTo', pool[0]!, 0);
}

/** Keeps freed memory in the device's stream-ordered pool instead of returning it to the driver. */
function keepPoolMemory(device: Device): void {
  if (pooled.has(device.ordinal)) return;
  const pool = new BigUint64Array(1);
  cu('cuDeviceGetDefaultMemPool', pool, device.ordinal);
  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD (4): never trim the pool at synchronization points.
  cu('cuMemPoolSetAttribute', pool[0]!, 4, BigUint64Array.of(0xffffffffffffffffn));
  pooled.add(device.ordinal);
}

interface PoolAllocation {
  ptr: bigint;
  stream: Stream;
  device: Device;
}

// Frees of pool allocations whose stream is being captured into a graph wait here: a free issued during
// capture would become part of the graph (and run again at every replay).
const deferred: PoolAllocation[] = [];

/** Frees a pool allocation on its stream, later if that stream is capturing, synchronously if it is gone. */
function freePooled(a: PoolAllocation): void {
  a.device.makeCurrent();
  let stream: bigint;
  try {
    if (a.stream.isCapturing()) {
      deferred.push(a);
      return;
    }
    stream = a.stream.handle;
  } catch {
    cu('cuMemFree_v2', a.ptr); // the stream was disposed with its EpBuffer
    return;
  }
  cu('cuMemFreeAsync', a.ptr, stream);
}

/** Issues the frees deferred by a capture that has ended. */
function flushDeferredFrees(): void {
  for (let i = deferred.length - 1; i >= 0; i--) {
    const a = deferred[i]!;
    let capturing: boolean;
    try {
      capturing = a.stream.isCapturing();
    } catch {
      capturing = false;
    }
    if (capturing) continue;
    deferred.splice(i, 1);
    freePooled(a);
  }
}

// Pool allocations that were never disposed are freed when their DeviceBuffer is garbage-collected, on the
// stream they were made for. GC does not see GPU memory pressure, so dispose() remains the way to get
// memory back promptly.
const unreleased = new FinalizationRegistry<PoolAllocation>((a) => {
  try {
    freePooled(a);
  } catch {
    // The context is gone (process teardown): nothing left to free.
  }
});

export class DeviceBuffer {
  readonly device: Device;
  readonly bytes: number;
  private p: bigint;
  /** Stream-ordered allocations are freed on this stream (after the work queued on it so far). */
  private readonly freeStream: Stream | undefined;
  /**
   * A stream-ordered allocation's stream: the memory and what that stream's work writes into it are
   * ready in its order only, so host copies wait for it first. Undefined for plain allocations.
   */
  readonly stream: Stream | undefined;

  /** Memory someone else allocated and frees (see {@link DeviceBuffer.wrap}). */
  private readonly borrowed: boolean;

  private constructor(
    device: Device,
    ptr: bigint,
    bytes: number,
    streams?: { alloc: Stream; free: Stream },
    borrowed = false,
  ) {
    this.device = device;
    this.p = ptr;
    this.bytes = bytes;
    this.stream = streams?.alloc;
    this.freeStream = streams?.free;
    this.borrowed = borrowed;
  }

  /**
   * A view of device memory another allocator owns (e.g. NVSHMEM's symmetric heap), with this class's
   * copies and fills; `dispose()` only drops the view, the owner frees the memory.
   */
  static wrap(ptr: bigint, bytes: number, device: Device): DeviceBuffer {
    if (ptr === 0n) throw new ValidationError('ptr', '0', 'a device address');
    return new DeviceBuffer(device, ptr, bytes, undefined, true);
  }

  /**
   * Allocates from the device's stream-ordered pool: no device synchronization, memory reused across
   * calls, usable by `stream`'s later work at once. `dispose()` frees it on `freeOn` (default: the same
   * stream), so it may be called while that stream still uses the memory (work on other streams must be
   * ordered by the caller; a `freeOn` other than `stream` must already wait for `stream`'s use of it, as a
   * stream that joined `stream` does). While `stream` is being captured into a graph this falls back to a
   * plain allocation.
   */
  static allocAsync(bytes: number, stream: Stream, freeOn: Stream = stream): DeviceBuffer {
    if (stream.isCapturing()) return DeviceBuffer.alloc(bytes, stream.device);
    flushDeferredFrees();
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new ValidationError('bytes', String(bytes), 'a non-negative integer');
    }
    stream.device.makeCurrent();
    keepPoolMemory(stream.device);
    const out = new BigUint64Array(1);
    cu('cuMemAllocAsync', out, Math.max(bytes, 1), stream.handle);
    const buf = new DeviceBuffer(stream.device, out[0]!, bytes, { alloc: stream, free: freeOn });
    unreleased.register(buf, { ptr: out[0]!, stream: freeOn, device: stream.device }, buf);
    return buf;
  }

  /** Allocates `bytes` of device memory (contents undefined). */
  static alloc(bytes: number, device: Device = Device.current()): DeviceBuffer {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new ValidationError('bytes', String(bytes), 'a non-negative integer');
    }
    device.makeCurrent();
    const out = new BigUint64Array(1);
    // cuMemAlloc rejects 0 bytes; a 0-byte buffer still gets a valid, distinct address.
    cu('cuMemAlloc_v2', out, Math.max(bytes, 1));
    return new DeviceBuffer(device, out[0]!, bytes);
  }

  /** Device address of the first byte. */
  get ptr(): bigint {
    if (this.p === 0n) throw new DisposedError('DeviceBuffer');
    return this.p;
  }

  get disposed(): boolean {
    return this.p === 0n;
  }

  /**
   * Sets `bytes` bytes from `offset` to `value`: in `stream`'s order, or, without a stream, after this
   * allocation's stream (see `settle`) and done when the call returns.
   */
  fill(value: number, stream?: Stream, offset = 0, bytes = this.bytes - offset): void {
    checkRange('fill range', offset, bytes, this.bytes);
    if (stream) this.device.makeCurrent();
    else this.settle();
    setBytes(this.ptr + BigInt(offset), value, bytes, stream);
  }

  /** Stream-ordered fill of `count` 32-bit words from `offset` (bytes, 4-aligned) with `value`. */
  fill32(value: number, stream: Stream, offset: number, count: number): void {
    checkRange('fill range', offset, 4 * count, this.bytes);
    this.device.makeCurrent();
    cu('cuMemsetD32Async', this.ptr + BigInt(offset), value >>> 0, count, stream.handle);
  }

  /**
   * Copies host bytes in, synchronously (the call returns when the copy is done). A stream-ordered
   * allocation's stream is waited for first (see `settle`).
   */
  copyFromHost(src: ArrayBufferView, offset = 0): void {
    checkRange('copy destination', offset, src.byteLength, this.bytes);
    if (src.byteLength === 0) return;
    this.settle();
    copyHostToDevice(this.ptr + BigInt(offset), src);
  }

  /** Copies bytes out into `dst`, synchronously, after the work queued so far on `stream`, if any. */
  copyToHost(dst: ArrayBufferView, offset = 0): void {
    checkRange('copy source', offset, dst.byteLength, this.bytes);
    if (dst.byteLength === 0) return;
    this.settle();
    cu('cuMemcpyDtoH_v2', hostBytes(dst), this.ptr + BigInt(offset), dst.byteLength);
  }

  /**
   * Before a synchronous copy: makes the device current and, for a stream-ordered allocation, waits for its
   * stream. Synchronous copies run in no stream's order, so without the wait a copy could read the memory
   * before that stream's kernels wrote it (the stream is non-blocking), or write it while earlier work of
   * that stream still uses the memory for a freed allocation. Blocks the thread, as the copy itself does.
   * While that stream is being captured into a graph there is nothing to wait for (waiting would end the
   * capture): the caller must pass the stream so the copy or fill is captured too.
   */
  settle(): void {
    this.device.makeCurrent();
    if (this.stream?.isCapturing()) {
      throw new ValidationError(
        'host copy or fill',
        'one without a stream, of memory whose stream is being captured into a graph',
        'the stream-ordered form on that stream (fill or fillBytes with the stream, copyFromHostAsync, copyToHostAsync)',
      );
    }
    this.stream?.synchronizeBlocking();
  }

  /**
   * Stream-ordered copy from host memory. The host memory must stay alive and unchanged until the stream
   * reaches the copy; pass pinned memory (HostBuffer.view) for a truly asynchronous copy.
   */
  copyFromHostAsync(src: ArrayBufferView, stream: Stream, offset = 0): void {
    checkRange('copy destination', offset, src.byteLength, this.bytes);
    if (src.byteLength === 0) return;
    cu('cuMemcpyHtoDAsync_v2', this.ptr + BigInt(offset), hostBytes(src), src.byteLength, stream.handle);
  }

  /** Stream-ordered copy to host memory (pinned memory recommended); read `dst` only after the stream. */
  copyToHostAsync(dst: ArrayBufferView, stream: Stream, offset = 0): void {
    checkRange('copy source', offset, dst.byteLength, this.bytes);
    if (dst.byteLength === 0) return;
    cu('cuMemcpyDtoHAsync_v2', hostBytes(dst), this.ptr + BigInt(offset), dst.byteLength, stream.handle);
  }

  /** Stream-ordered device-to-device copy (peer addresses allowed). */
  static copyAsync(dst: bigint, src: bigint, bytes: number, stream: Stream): void {
    if (bytes > 0) cu('cuMemcpyDtoDAsync_v2', dst, src, bytes, stream.handle);
  }

  dispose(): void {
    if (this.p === 0n) return;
    this.device.makeCurrent();
    if (this.freeStream) {
      freePooled({ ptr: this.p, stream: this.freeStream, device: this.device });
      unreleased.unregister(this);
    } else if (!this.borrowed) {
      cu('cuMemFree_v2', this.p); // borrowed memory is its owner's to free
    }
    this.p = 0n;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Pinned host memory, mapped into the device: `view` for the host, `devicePtr` for kernels. */
export class HostBuffer {
  readonly bytes: number;
  readonly devicePtr: bigint;
  private external: unknown;
  private buffer: ArrayBuffer | undefined;

  private constructor(external: unknown, devicePtr: bigint, bytes: number) {
    this.external = external;
    this.devicePtr = devicePtr;
    this.bytes = bytes;
    this.buffer = viewNative(external, Math.max(bytes, 1));
  }

  static alloc(bytes: number, device: Device = Device.current()): HostBuffer {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new ValidationError('bytes', String(bytes), 'a non-negative integer');
    }
    device.makeCurrent();
    const { external } = hostAllocMapped(Math.max(bytes, 1));
    const dptr = new BigUint64Array(1);
    cu('cuMemHostGetDevicePointer_v2', dptr, external, 0);
    const hb = new HostBuffer(external, dptr[0]!, bytes);
    new Uint8Array(hb.arrayBuffer).fill(0);
    return hb;
  }

  /** The memory as an ArrayBuffer; reads see what kernels wrote once their stores reach system scope. */
  get arrayBuffer(): ArrayBuffer {
    if (!this.buffer) throw new DisposedError('HostBuffer');
    return this.buffer;
  }

  /** An Int32Array over the memory, for counters and flags. */
  int32(): Int32Array {
    return new Int32Array(this.arrayBuffer, 0, this.bytes >> 2);
  }

  dispose(): void {
    if (!this.buffer) return;
    this.buffer = undefined;
    hostFree(this.external);
    this.external = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
