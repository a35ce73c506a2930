// Streams and events. Waits resolve Promises by polling, so the host event loop never blocks on the GPU.

import { DisposedError } from '../errors.ts';
import { cu, raw } from '../native/cuda.ts';
import { Device } from './context.ts';
import { type PollOptions, pollUntil } from './poll.ts';

const CUDA_ERROR_NOT_READY = 600;

function ready(call: 'cuStreamQuery' | 'cuEventQuery', handle: bigint): boolean {
  const status = raw(call)(handle) as number;
  if (status === CUDA_ERROR_NOT_READY) return false;
  cu(call, handle); // re-issue to raise a typed error for any other status
  return true;
}

/**
 * Graph captures begun through graph.ts and not yet ended in this process. tsep begins captures nowhere
 * else, so while none is open no stream can be capturing (a stream joins a capture only by waiting on a
 * capturing stream's event) and isCapturing() skips the driver query, which costs more than the event
 * record it guards on every call.
 */
let openCaptures = 0;

/** graph.ts: a capture began (after cuStreamBeginCapture succeeded) or ended. */
export function captureOpened(): void {
  openCaptures++;
}
export function captureClosed(): void {
  openCaptures--;
}

export class Stream {
  readonly device: Device;
  private h: bigint;
  private readonly owned: boolean;

  private constructor(device: Device, handle: bigint, owned: boolean) {
    this.device = device;
    this.h = handle;
    this.owned = owned;
  }

  /** A new non-blocking stream; `priority: 'high'` asks for the device's highest priority (for comms). */
  static create(device: Device = Device.current(), options: { priority?: 'normal' | 'high' } = {}): Stream {
    device.makeCurrent();
    let prio = 0;
    if (options.priority === 'high') {
      const least = new Int32Array(1);
      const greatest = new Int32Array(1);
      cu('cuCtxGetStreamPriorityRange', least, greatest);
      prio = greatest[0]!;
    }
    const out = new BigUint64Array(1);
    cu('cuStreamCreateWithPriority', out, 1 /* CU_STREAM_NON_BLOCKING */, prio);
    return new Stream(device, out[0]!, true);
  }

  /** The legacy default stream (handle 0) of a device. */
  static default(device: Device = Device.current()): Stream {
    return new Stream(device, 0n, false);
  }

  get handle(): bigint {
    if (this.h < 0n) throw new DisposedError('Stream');
    return this.h;
  }

  /** True when all work queued so far has finished. */
  query(): boolean {
    return ready('cuStreamQuery', this.handle);
  }

  /** Resolves when all work queued so far has finished (polls; never blocks the event loop). */
  async synchronize(options?: PollOptions): Promise<void> {
    const ev = Event.create(this.device);
    try {
      ev.record(this);
      await ev.synchronize(options);
    } finally {
      ev.dispose();
    }
  }

  /** Blocks the calling thread until the stream is idle. For scripts and benchmarks only. */
  synchronizeBlocking(): void {
    cu('cuStreamSynchronize', this.handle);
  }

  /** True while work enqueued on this stream is being captured into a graph instead of run. */
  isCapturing(): boolean {
    if (openCaptures === 0) return false;
    const status = new Int32Array(1);
    cu('cuStreamIsCapturing', this.handle, status);
    return status[0] !== 0;
  }

  /** Makes later work on this stream wait for `event` (no host wait). */
  waitEvent(event: Event): void {
    cu('cuStreamWaitEvent', this.handle, event.handle, 0);
  }

  dispose(): void {
    if (this.h >= 0n && this.owned) {
      this.device.makeCurrent();
      cu('cuStreamDestroy_v2', this.h);
    }
    this.h = -1n;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

export class Event {
  readonly device: Device;
  readonly timing: boolean;
  private h: bigint;

  private constructor(device: Device, handle: bigint, timing: boolean) {
    this.device = device;
    this.h = handle;
    this.timing = timing;
  }

  /** `timing: true` makes the event usable with `elapsedMs` (slightly costlier to record). */
  static create(device: Device = Device.current(), options: { timing?: boolean } = {}): Event {
    device.makeCurrent();
    const out = new BigUint64Array(1);
    // CU_EVENT_DISABLE_TIMING (2) keeps plain sync events cheap.
    cu('cuEventCreate', out, options.timing ? 0 : 2);
    return new Event(device, out[0]!, options.timing === true);
  }

  get handle(): bigint {
    if (this.h < 0n) throw new DisposedError('Event');
    return this.h;
  }

  record(stream: Stream): this {
    cu('cuEventRecord', this.handle, stream.handle);
    return this;
  }

  /** True once the work before the record point has finished. */
  query(): boolean {
    return ready('cuEventQuery', this.handle);
  }

  /** Resolves when the recorded work has finished, without blocking the event loop. */
  synchronize(options?: PollOptions): Promise<void> {
    return pollUntil(() => this.query(), { what: 'a CUDA event', ...options });
  }

  /** Blocks the calling thread until the event completes. For scripts and benchmarks only. */
  synchronizeBlocking(): void {
    cu('cuEventSynchronize', this.handle);
  }

  /** Milliseconds between two completed timing events. */
  static elapsedMs(start: Event, end: Event): number {
    const ms = new Float32Array(1);
    cu('cuEventElapsedTime_v2', ms, start.handle, end.handle);
    return ms[0]!;
  }

  dispose(): void {
    if (this.h >= 0n) cu('cuEventDestroy_v2', this.h);
    this.h = -1n;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
