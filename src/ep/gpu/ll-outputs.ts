// The outputs of the low-latency calls (both transports): a small ring of device-memory sets per payload
// type, so the results of the last OUTPUT_RING dispatches (and combines) stay valid, as DeepEP keeps two
// buffers. Tensor views are made once per set and format and shared by the calls that use the set.

import { DeviceTensor } from '../../device/device-tensor.ts';
import { DeviceBuffer } from '../../device/memory.ts';
import type { Stream } from '../../device/stream.ts';
import type { LlPayload, LlShape } from './ll-layout.ts';
import type { GpuRuntime } from './runtime.ts';

/** Output sets per payload type kept alive at once (a result is overwritten by the call this many later). */
export const OUTPUT_RING = 2;

/** One set of dispatch outputs (device memory sized for the largest variant of its payload type). */
interface DispatchSlot {
  x: DeviceBuffer;
  scales: DeviceBuffer | undefined;
  count: DeviceBuffer;
  srcInfo: DeviceBuffer;
  range: DeviceBuffer;
  kmask: DeviceBuffer;
  /** Tensor views of the slot, made once per scale format (views are immutable, so calls share them). */
  views: Map<string, DispatchViews>;
}

/** A dispatch's outputs: the result's tensors and the handle's. */
export interface DispatchViews {
  readonly recvX: DeviceTensor;
  readonly recvScales: DeviceTensor | undefined;
  readonly recvCount: DeviceTensor;
  readonly srcInfo: DeviceTensor;
  readonly range: DeviceTensor;
  /** [E_l, R·T_max] i32 (a bit mask): the source's top-k slots that chose this row's expert. */
  readonly kmask: DeviceTensor;
}

interface CombineSlot {
  buffer: DeviceBuffer;
  views: Map<number, DeviceTensor>;
}

export class LlOutputs {
  private readonly rt: GpuRuntime;
  private readonly shape: LlShape;
  private readonly dispatchRings = new Map<LlPayload, DispatchSlot[]>();
  private readonly dispatchCalls = { fp8: 0, bf16: 0 };
  private readonly combineRing: CombineSlot[] = [];
  private combineCalls = 0;

  /** Allocates the buffer's default payload type's sets now, outside any graph capture. */
  constructor(rt: GpuRuntime, shape: LlShape, defaultKind: LlPayload) {
    this.rt = rt;
    this.shape = shape;
    for (let i = 0; i < OUTPUT_RING; i++) {
      this.dispatchSlot(defaultKind, i);
      this.combineSlot(i);
    }
  }

  /** The next dispatch set of `kind` in the ring (allocated on first use), as views for the scale format. */
  nextDispatch(kind: LlPayload, ue8m0: boolean): DispatchViews {
    const slot = this.dispatchSlot(kind, this.dispatchCalls[kind]++ % OUTPUT_RING);
    const key = kind === 'bf16' ? kind : ue8m0 ? 'fp8/ue8m0' : 'fp8/f32';
    let v = slot.views.get(key);
    if (!v) {
      v = this.views(slot, kind, ue8m0);
      slot.views.set(key, v);
    }
    return v;
  }

  /** The next combine set's [T, H] bf16 output view. */
  nextCombine(T: number): DeviceTensor {
    const slot = this.combineSlot(this.combineCalls++ % OUTPUT_RING);
    let v = slot.views.get(T);
    if (!v) {
      v = new DeviceTensor('bf16', [T, this.shape.hidden], slot.buffer.ptr, { device: this.rt.device });
      slot.views.set(T, v);
    }
    return v;
  }

  /** Bytes allocated so far. */
  bytes(): number {
    let n = 0;
    for (const b of this.buffers()) n += b.bytes;
    return n;
  }

  /** Fills every output allocated so far with `byte` (stream-ordered): tests poison outputs. */
  fill(byte: number, stream: Stream): void {
    for (const b of this.buffers()) b.fill(byte, stream);
  }

  dispose(): void {
    for (const b of this.buffers()) b.dispose();
  }

  private *buffers(): Generator<DeviceBuffer> {
    for (const ring of this.dispatchRings.values()) {
      for (const s of ring) {
        for (const b of [s.x, s.scales, s.count, s.srcInfo, s.range, s.kmask]) if (b) yield b;
      }
    }
    for (const c of this.combineRing) yield c.buffer;
  }

  private dispatchSlot(kind: LlPayload, i: number): DispatchSlot {
    let ring = this.dispatchRings.get(kind);
    if (!ring) {
      ring = [];
      this.dispatchRings.set(kind, ring);
    }
    let slot = ring[i];
    if (!slot) {
      const L = this.shape;
      const dev = this.rt.device;
      const rows = L.localExperts * L.numRanks * L.maxTokensPerRank;
      slot = {
        x: DeviceBuffer.alloc(rows * L.hidden * (kind === 'fp8' ? 1 : 2), dev),
        scales: kind === 'fp8' ? DeviceBuffer.alloc(rows * Math.ceil(L.hidden / 128) * 4, dev) : undefined,
        count: DeviceBuffer.alloc(L.localExperts * 4, dev),
        srcInfo: DeviceBuffer.alloc(rows * 4, dev),
        range: DeviceBuffer.alloc(L.localExperts * L.numRanks * 8, dev),
        kmask: DeviceBuffer.alloc(rows * 4, dev),
        views: new Map(),
      };
      ring[i] = slot;
    }
    return slot;
  }

  private views(slot: DispatchSlot, kind: LlPayload, ue8m0: boolean): DispatchViews {
    const L = this.shape;
    const El = L.localExperts;
    const RT = L.numRanks * L.maxTokensPerRank;
    const H = L.hidden;
    const device = this.rt.device;
    let recvScales: DeviceTensor | undefined;
    if (kind === 'fp8') {
      const cols = ue8m0 ? Math.ceil(Math.ceil(H / 128) / 4) : Math.ceil(H / 128);
      // Column-major in the last two dims: stored [E_l, cols, R·T_max].
      recvScales = new DeviceTensor(ue8m0 ? 'i32' : 'f32', [El, RT, cols], slot.scales!.ptr, {
        device,
        strides: [cols * RT, 1, RT],
      });
    }
    return {
      recvX: new DeviceTensor(kind === 'fp8' ? 'fp8_e4m3' : 'bf16', [El, RT, H], slot.x.ptr, { device }),
      recvScales,
      recvCount: new DeviceTensor('i32', [El], slot.count.ptr, { device }),
      srcInfo: new DeviceTensor('i32', [El, RT], slot.srcInfo.ptr, { device }),
      range: new DeviceTensor('i64', [El, L.numRanks], slot.range.ptr, { device }),
      kmask: new DeviceTensor('i32', [El, RT], slot.kmask.ptr, { device }),
    };
  }

  private combineSlot(i: number): CombineSlot {
    let b = this.combineRing[i];
    if (!b) {
      const L = this.shape;
      b = {
        buffer: DeviceBuffer.alloc(Math.max(1, L.maxTokensPerRank * L.hidden * 2), this.rt.device),
        views: new Map(),
      };
      this.combineRing[i] = b;
    }
    return b;
  }
}
