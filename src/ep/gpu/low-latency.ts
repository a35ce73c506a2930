// The low-latency (decode) path of the GPU backend: DeepEP's low_latency_dispatch / low_latency_combine
// over NVLink between the GPUs of one host, one process per GPU. docs/low-latency.md has the protocol,
// the buffer layout with byte counts, and how it differs from DeepEP; kernels/low_latency.cu the kernels.
//
// Nothing here waits for the GPU: every call only enqueues kernels on the runtime's stream. Sequence
// numbers, buffer halves and signals live on the device, so calls are capturable in a CUDA graph and
// replays stay correct. Output tensors come from a small ring per payload type (OUTPUT_RING sets), so the
// results of the last OUTPUT_RING dispatches (and combines) stay valid, as DeepEP keeps two buffers.

import { DeviceTensor } from '../../device/device-tensor.ts';
import { DeviceBuffer } from '../../device/memory.ts';
import type { Kernel } from '../../device/module.ts';
import { SymmetricBuffer } from '../../dist/symmetric.ts';
import { DisposedError, EpTimeoutError, TsepError, ValidationError } from '../../errors.ts';
import type {
  HandleOwner,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
  LowLatencyHandle,
  RecvHook,
} from '../types.ts';
import { deviceTimeoutNs } from './device-error.ts';
import type { GpuEvent } from './event.ts';
import { LL_RECORD, type LlLayout, llDefines, llLayout } from './ll-layout.ts';
import type { GpuRuntime } from './runtime.ts';

/** Output sets per payload type kept alive at once (a result is overwritten by the call this many later). */
export const OUTPUT_RING = 2;

const THREADS = 512;
const WARPS = THREADS / 32;
const FLAG_FP8 = 1;
const FLAG_ROUND = 2;
const FLAG_UE8M0 = 4;
const FLAG_IDX64 = 8;

const KERNEL_NAMES: Record<number, string> = {
  1: 'dispatch send',
  2: 'dispatch receive',
  3: 'combine send',
  4: 'combine receive',
  5: 'clean',
  6: 'gate',
};
const PHASES: Record<number, string> = {
  1: 'for rank {peer} to free its receive half (it has not finished the call two before this one)',
  2: "for rank {peer}'s data of this call",
  3: 'for rank {peer} at the clean barrier',
};

/** Launch shapes; defaults follow the SM count. Benchmarks may change them between calls. */
export interface LlTuning {
  /**
   * Without receive hooks, run the send and receive phases in one launch (default). Its grid is capped at
   * what fits on the GPU at once, so a block waiting in the receive phase never starves a send block.
   */
  fuse: boolean;
  /** Most blocks of the dispatch send phase (fewer when there are fewer token chunks). */
  dispatchSendBlocks: number;
  /** Blocks per local expert in the dispatch receive kernel. */
  dispatchRecvParts: number;
  combineSendBlocks: number;
  /** Most blocks of the combine receive phase. */
  combineRecvBlocks: number;
}

/** Names of the device timestamps (globaltimer ns) the kernels leave for {@link LowLatencyPath.stamps}. */
export const LL_STAMPS = [
  'dispatchSendStart',
  'dispatchSendReady',
  'dispatchSendSignal',
  'dispatchRecvStart',
  'dispatchRecvReady',
  'dispatchRecvEnd',
  'combineSendStart',
  'combineSendReady',
  'combineSendSignal',
  'combineRecvStart',
  'combineRecvReady',
  'combineRecvEnd',
] as const;

/** The GPU backend's low-latency handle: the public fields plus what the combine kernels need. */
export class GpuLowLatencyHandle implements LowLatencyHandle {
  readonly kind = 'low-latency';
  readonly owner: HandleOwner;
  readonly numTokens: number;
  readonly packedRecvSrcInfo: DeviceTensor;
  readonly packedRecvLayoutRange: DeviceTensor;
  /** [E_l, R·T_max] i32 (a bit mask): the source's top-k slots that chose this row's expert (bit k = slot k). */
  readonly recvKMask: DeviceTensor;
  /** The path that made it. */
  readonly path: LowLatencyPath;

  /** Its tensors are views into the path's output ring, which the path owns: nothing to free. */
  dispose(): void {}

  constructor(
    path: LowLatencyPath,
    owner: HandleOwner,
    numTokens: number,
    srcInfo: DeviceTensor,
    layoutRange: DeviceTensor,
    kmask: DeviceTensor,
  ) {
    this.path = path;
    this.owner = owner;
    this.numTokens = numTokens;
    this.packedRecvSrcInfo = srcInfo;
    this.packedRecvLayoutRange = layoutRange;
    this.recvKMask = kmask;
  }
}

/** One set of dispatch outputs (device memory sized for the largest variant of its payload type). */
interface DispatchSlot {
  x: DeviceBuffer;
  scales: DeviceBuffer | undefined;
  count: DeviceBuffer;
  srcInfo: DeviceBuffer;
  range: DeviceBuffer;
  kmask: DeviceBuffer;
  /** Tensor views of the slot, made once per scale format (views are immutable, so calls share them). */
  views: Map<string, SlotViews>;
}

interface SlotViews {
  recvX: DeviceTensor;
  recvScales: DeviceTensor | undefined;
  recvCount: DeviceTensor;
  srcInfo: DeviceTensor;
  range: DeviceTensor;
  kmask: DeviceTensor;
}

const PHASE_SEND = 1;
const PHASE_RECV = 2;

export class LowLatencyPath {
  readonly rt: GpuRuntime;
  readonly layout: LlLayout;
  private readonly sym: SymmetricBuffer;
  private readonly owner: HandleOwner;
  private readonly record: Int32Array;
  private readonly timeout: bigint;
  private readonly rank: number;
  private readonly kDispatch: Kernel;
  private readonly kCombine: Kernel;
  private readonly kClean: Kernel;
  private readonly kGate: Kernel;
  private readonly dispatchSmem: number;
  private readonly combineSmem: number;
  /** Blocks of each kernel that fit on the GPU at once (the cap of a fused launch). */
  private readonly dispatchResident: number;
  private readonly combineResident: number;
  private readonly dispatchRings = new Map<'fp8' | 'bf16', DispatchSlot[]>();
  private dispatchCalls = { fp8: 0, bf16: 0 };
  private readonly combineRing: { buffer: DeviceBuffer; views: Map<number, DeviceTensor> }[] = [];
  private combineCalls = 0;
  private destroyed = false;
  /** Launch shapes (see {@link LlTuning}). */
  readonly tuning: LlTuning;

  private constructor(
    rt: GpuRuntime,
    layout: LlLayout,
    sym: SymmetricBuffer,
    owner: HandleOwner,
    kernels: Kernel[],
  ) {
    this.rt = rt;
    this.layout = layout;
    this.sym = sym;
    this.owner = owner;
    this.record = new Int32Array(sym.signal.arrayBuffer, 0, LL_RECORD.words);
    this.timeout = deviceTimeoutNs();
    this.rank = rt.group.localRank;
    [this.kDispatch, this.kCombine, this.kClean, this.kGate] = kernels as [Kernel, Kernel, Kernel, Kernel];
    const sms = rt.smCount;
    this.dispatchSmem = 8 * layout.numRanks * layout.maxTokensPerRank;
    this.combineSmem = 4 * (2 * layout.localExperts * layout.numRanks + layout.localExperts + 1);
    this.dispatchResident = sms * Math.max(1, this.kDispatch.occupancy(THREADS, this.dispatchSmem));
    this.combineResident = sms * Math.max(1, this.kCombine.occupancy(THREADS, this.combineSmem));
    this.tuning = {
      fuse: true,
      dispatchSendBlocks: 2 * sms,
      // About two resident 512-thread blocks per SM in all.
      dispatchRecvParts: Math.max(1, Math.floor((2 * sms) / layout.localExperts)),
      combineSendBlocks: sms,
      combineRecvBlocks: 4 * sms,
    };
  }

  /**
   * Collective: every rank of the runtime's group calls it. Compiles the kernels for the buffer's shape
   * and maps the ranks' symmetric buffers. `owner` goes into every handle (default: a label naming the
   * rank).
   */
  static async create(rt: GpuRuntime, owner?: HandleOwner): Promise<LowLatencyPath> {
    const { group, options } = rt;
    if (group.size !== group.localSize) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `The GPU low-latency mode runs over NVLink inside one host; this group has ${group.size} ranks, ${group.localSize} on this host.`,
      );
    }
    if (group.size > 8 || group.size < 1) {
      throw new ValidationError('group size', String(group.size), '1 to 8 ranks (one NVLink host)');
    }
    if (options.maxTokensPerRank > 65535 || group.size * options.maxTokensPerRank > 16384) {
      throw new ValidationError(
        'maxTokensPerRank',
        String(options.maxTokensPerRank),
        `at most 65535 and ranks × maxTokensPerRank ≤ 16384 for the low-latency mode (${group.size} ranks)`,
      );
    }
    const layout = llLayout({
      numRanks: group.size,
      localExperts: options.numExperts / group.size,
      hidden: options.hidden,
      maxTokensPerRank: options.maxTokensPerRank,
      numTopk: options.numTopk,
    });
    const mod = await rt.kernels('low_latency.cu', llDefines(layout));
    const common = ['ptr', 'ptr', 'i32', 'u64'] as const;
    const kernels = [
      // x, topk, T, K, flags, recvX, recvScales, recvCount, srcInfo, layoutRange, kmask, parts, phases
      mod.kernel('ll_dispatch', [
        ...common,
        'ptr',
        'ptr',
        'i32',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'i32',
        'i32',
      ]),
      // x, srcInfo, layoutRange, kmask, topk, weights, out, T, K, flags, phases
      mod.kernel('ll_combine', [
        ...common,
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'i32',
        'i32',
        'i32',
        'i32',
      ]),
      mod.kernel('ll_clean', [...common]),
      mod.kernel('ll_gate', [...common, 'u64']),
    ];
    const sym = await SymmetricBuffer.create(group, layout.totalBytes, rt.device);
    const path = new LowLatencyPath(
      rt,
      layout,
      sym,
      owner ?? { label: `GPU low-latency path (rank ${group.rank} of ${group.size})` },
      kernels,
    );
    // The buffer's default payload type gets its outputs now, outside any graph capture.
    for (let i = 0; i < OUTPUT_RING; i++) {
      path.dispatchSlot(options.fp8 ? 'fp8' : 'bf16', i);
      path.combineSlot(i);
    }
    return path;
  }

  /** Bytes of the symmetric (peer-mapped) buffer of this rank. */
  bytes(): number {
    return this.layout.totalBytes;
  }

  /** Bytes of the output rings allocated so far (device memory outside the symmetric buffer). */
  outputBytes(): number {
    let n = 0;
    for (const ring of this.dispatchRings.values()) {
      for (const s of ring)
        n +=
          s.x.bytes +
          (s.scales?.bytes ?? 0) +
          s.count.bytes +
          s.srcInfo.bytes +
          s.range.bytes +
          s.kmask.bytes;
    }
    for (const b of this.combineRing) n += b.buffer.bytes;
    return n;
  }

  // ------------------------------------------------------------------------------------------ dispatch

  dispatch(req: LowLatencyDispatchRequest): LowLatencyDispatchResult {
    this.checkUsable();
    const rt = this.rt;
    const x = rt.onDevice('x', req.x);
    const topk = rt.onDevice('topkIdx', req.topkIdx);
    const [T, K] = topk.shape as [number, number];
    const L = this.layout;
    this.checkShape(x, T, K);
    const flags =
      (req.fp8 ? FLAG_FP8 : 0) |
      (req.roundScale || req.ue8m0 ? FLAG_ROUND : 0) |
      (req.ue8m0 ? FLAG_UE8M0 : 0) |
      (topk.dtype === 'i64' ? FLAG_IDX64 : 0);
    const kind = req.fp8 ? 'fp8' : 'bf16';
    const slot = this.dispatchSlot(kind, this.dispatchCalls[kind]++ % OUTPUT_RING);
    const views = this.slotViews(slot, kind, req.ue8m0);

    const tn = this.tuning;
    const sendGrid = Math.max(
      1,
      Math.min(tn.dispatchSendBlocks, Math.ceil((T * Math.ceil(L.hidden / 512)) / WARPS)),
    );
    const parts = tn.dispatchRecvParts;
    const recvGrid = L.localExperts * parts;
    const launch = (grid: number, phases: number): void => {
      this.kDispatch.launch({ grid, block: THREADS, sharedBytes: this.dispatchSmem, stream: rt.stream }, [
        this.sym.peerTable.ptr,
        this.sym.signal.devicePtr,
        this.rank,
        this.timeout,
        x.ptr,
        topk.ptr,
        T,
        K,
        flags,
        slot.x.ptr,
        slot.scales?.ptr ?? 0n,
        slot.count.ptr,
        slot.srcInfo.ptr,
        slot.range.ptr,
        slot.kmask.ptr,
        parts,
        phases,
      ]);
    };
    let hook: RecvHook | undefined;
    if (req.returnRecvHook) {
      launch(sendGrid, PHASE_SEND);
      hook = this.hookOnce('dispatch', () => launch(recvGrid, PHASE_RECV));
    } else if (tn.fuse) {
      launch(Math.min(this.dispatchResident, Math.max(sendGrid, recvGrid)), PHASE_SEND | PHASE_RECV);
    } else {
      launch(sendGrid, PHASE_SEND);
      launch(recvGrid, PHASE_RECV);
    }
    const handle = new GpuLowLatencyHandle(this, this.owner, T, views.srcInfo, views.range, views.kmask);
    return {
      recvX: views.recvX,
      ...(views.recvScales ? { recvScales: views.recvScales } : {}),
      recvCount: views.recvCount,
      handle,
      event: this.event(),
      ...(hook ? { hook } : {}),
    };
  }

  // ------------------------------------------------------------------------------------------- combine

  combine(req: LowLatencyCombineRequest): LowLatencyCombineResult {
    this.checkUsable();
    const handle = req.handle;
    if (!(handle instanceof GpuLowLatencyHandle) || handle.path !== this) {
      throw new ValidationError(
        'handle',
        'a handle from another buffer or backend',
        "the handle of this buffer's lowLatencyDispatch",
      );
    }
    const rt = this.rt;
    const x = rt.onDevice('x', req.x);
    const topk = rt.onDevice('topkIdx', req.topkIdx);
    const w = rt.onDevice('topkWeights', req.topkWeights);
    const [T, K] = topk.shape as [number, number];
    const L = this.layout;
    this.checkShape(undefined, T, K);
    if (x.shape.join() !== [L.localExperts, L.numRanks * L.maxTokensPerRank, L.hidden].join()) {
      throw new ValidationError(
        'x',
        `shape [${x.shape.join(', ')}]`,
        'the dispatch layout [E_l, R·T_max, H]',
      );
    }
    const out = this.combineOut(this.combineCalls++ % OUTPUT_RING, T);
    const srcInfo = handle.packedRecvSrcInfo;
    const range = handle.packedRecvLayoutRange;
    const tn = this.tuning;
    const recvGrid = Math.max(1, Math.min(tn.combineRecvBlocks, Math.ceil((T * (L.hidden / 8)) / THREADS)));
    const launch = (grid: number, phases: number): void => {
      this.kCombine.launch({ grid, block: THREADS, sharedBytes: this.combineSmem, stream: rt.stream }, [
        this.sym.peerTable.ptr,
        this.sym.signal.devicePtr,
        this.rank,
        this.timeout,
        x.ptr,
        srcInfo.ptr,
        range.ptr,
        handle.recvKMask.ptr,
        topk.ptr,
        w.ptr,
        out.ptr,
        T,
        K,
        topk.dtype === 'i64' ? FLAG_IDX64 : 0,
        phases,
      ]);
    };
    let hook: RecvHook | undefined;
    if (req.returnRecvHook) {
      launch(tn.combineSendBlocks, PHASE_SEND);
      hook = this.hookOnce('combine', () => launch(recvGrid, PHASE_RECV));
    } else if (tn.fuse) {
      launch(
        Math.min(this.combineResident, Math.max(tn.combineSendBlocks, recvGrid)),
        PHASE_SEND | PHASE_RECV,
      );
    } else {
      launch(tn.combineSendBlocks, PHASE_SEND);
      launch(recvGrid, PHASE_RECV);
    }
    return {
      combinedX: out,
      event: this.event(),
      ...(hook ? { hook } : {}),
    };
  }

  // ------------------------------------------------------------------------------------ maintenance

  /** Fills every output tensor allocated so far with `byte` (stream-ordered): tests poison outputs. */
  fillOutputs(byte: number): void {
    const stream = this.rt.stream;
    for (const ring of this.dispatchRings.values()) {
      for (const s of ring) {
        for (const b of [s.x, s.scales, s.count, s.srcInfo, s.range, s.kmask]) b?.fill(byte, stream);
      }
    }
    for (const b of this.combineRing) b.buffer.fill(byte, stream);
  }

  /**
   * Collective (every rank calls it): resets every signal, sequence number and the timeout state on the
   * device, behind a device-side barrier of the ranks. Needed only after a timeout; enqueued, no host wait.
   */
  clean(): void {
    if (this.destroyed) throw new DisposedError('LowLatencyPath');
    this.record.fill(0);
    this.kClean.launch({ grid: 1, block: 32, stream: this.rt.stream }, [
      this.sym.peerTable.ptr,
      this.sym.signal.devicePtr,
      this.rank,
      this.timeout,
    ]);
  }

  /**
   * Collective, for benchmarks: enqueues a kernel that keeps the GPU busy for `spinNs` nanoseconds, then
   * waits for every rank to reach the same point (a device-side barrier), so work enqueued after it
   * starts together on all ranks and is not delayed by host enqueue time.
   */
  gate(spinNs = 0): void {
    this.checkUsable();
    this.kGate.launch({ grid: 1, block: 32, stream: this.rt.stream }, [
      this.sym.peerTable.ptr,
      this.sym.signal.devicePtr,
      this.rank,
      this.timeout,
      BigInt(Math.max(0, Math.round(spinNs))),
    ]);
  }

  /**
   * The globaltimer stamps (ns) the kernels of the latest dispatch and combine left, by name. Reads device
   * memory synchronously: call after the work finished (for benchmarks and debugging).
   */
  stamps(): Record<(typeof LL_STAMPS)[number], bigint> {
    const v = new BigUint64Array(LL_STAMPS.length);
    this.sym.local.copyToHost(v, this.layout.offState + 64);
    return Object.fromEntries(LL_STAMPS.map((n, i) => [n, v[i]!])) as Record<
      (typeof LL_STAMPS)[number],
      bigint
    >;
  }

  /** The timeout a kernel of this path reported, as the message of an EpTimeoutError; undefined if none. */
  deviceError(): string | undefined {
    const r = this.record;
    if (Atomics.load(r, LL_RECORD.flag) !== 1) return undefined;
    const kernel = KERNEL_NAMES[r[LL_RECORD.kernel]!] ?? `kernel ${r[LL_RECORD.kernel]}`;
    const peer = r[LL_RECORD.peer]!;
    const phase = (PHASES[r[LL_RECORD.phase]!] ?? 'for rank {peer}').replace('{peer}', String(peer));
    const seconds = Number(this.timeout) / 1e9;
    return (
      `Low-latency ${kernel} kernel on rank ${r[LL_RECORD.rank]} timed out after ${seconds} s waiting ${phase} ` +
      `(expected sequence ≥ ${r[LL_RECORD.expected]! >>> 0}, saw ${r[LL_RECORD.seen]! >>> 0}; block ${r[LL_RECORD.block]}). ` +
      'A rank is missing, stuck or made a different call. Every rank must make the same low-latency calls in ' +
      'the same order, and call a hook at most two calls later. Call clean() on every rank before the next call ' +
      '(TSEP_TIMEOUT_S sets the bound).'
    );
  }

  /** Waits for the path's work, then collectively releases the symmetric buffer and the outputs. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await this.rt.stream.synchronize();
    await this.sym.destroy();
    for (const ring of this.dispatchRings.values()) {
      for (const s of ring) {
        for (const b of [s.x, s.scales, s.count, s.srcInfo, s.range, s.kmask]) b?.dispose();
      }
    }
    for (const b of this.combineRing) b.buffer.dispose();
  }

  // ---------------------------------------------------------------------------------------- internals

  private checkUsable(): void {
    if (this.destroyed) throw new DisposedError('LowLatencyPath');
    const msg = this.deviceError();
    if (msg !== undefined) throw new EpTimeoutError(msg);
  }

  // EpBuffer validates requests; these checks only keep the kernels inside their buffers.
  private checkShape(x: DeviceTensor | undefined, T: number, K: number): void {
    const L = this.layout;
    if (T > L.maxTokensPerRank)
      throw new ValidationError('tokens', String(T), `at most ${L.maxTokensPerRank}`);
    if (K < 1 || K > L.numTopk) throw new ValidationError('topk', String(K), `1 to ${L.numTopk}`);
    if (x && (x.shape.length !== 2 || x.shape[0] !== T || x.shape[1] !== L.hidden)) {
      throw new ValidationError('x', `shape [${x.shape.join(', ')}]`, `[${T}, ${L.hidden}]`);
    }
  }

  private event(): GpuEvent {
    return this.rt.record({
      check: () => {
        const msg = this.deviceError();
        if (msg !== undefined) throw new EpTimeoutError(msg);
      },
    });
  }

  private hookOnce(what: string, recv: () => void): RecvHook {
    let called = false;
    return () => {
      if (called)
        throw new TsepError('TSEP_UNSUPPORTED', `This low-latency ${what} hook was already called.`);
      if (this.destroyed) throw new DisposedError('LowLatencyPath');
      called = true;
      recv();
    };
  }

  private dispatchSlot(kind: 'fp8' | 'bf16', i: number): DispatchSlot {
    let ring = this.dispatchRings.get(kind);
    if (!ring) {
      ring = [];
      this.dispatchRings.set(kind, ring);
    }
    let slot = ring[i];
    if (!slot) {
      const L = this.layout;
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

  private slotViews(slot: DispatchSlot, kind: 'fp8' | 'bf16', ue8m0: boolean): SlotViews {
    const key = kind === 'bf16' ? kind : `${kind}/${ue8m0}`;
    let v = slot.views.get(key);
    if (!v) {
      const L = this.layout;
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
      v = {
        recvX: new DeviceTensor(kind === 'fp8' ? 'fp8_e4m3' : 'bf16', [El, RT, H], slot.x.ptr, { device }),
        recvScales,
        recvCount: new DeviceTensor('i32', [El], slot.count.ptr, { device }),
        srcInfo: new DeviceTensor('i32', [El, RT], slot.srcInfo.ptr, { device }),
        range: new DeviceTensor('i64', [El, L.numRanks], slot.range.ptr, { device }),
        kmask: new DeviceTensor('i32', [El, RT], slot.kmask.ptr, { device }),
      };
      slot.views.set(key, v);
    }
    return v;
  }

  private combineSlot(i: number): { buffer: DeviceBuffer; views: Map<number, DeviceTensor> } {
    let b = this.combineRing[i];
    if (!b) {
      const L = this.layout;
      b = {
        buffer: DeviceBuffer.alloc(Math.max(1, L.maxTokensPerRank * L.hidden * 2), this.rt.device),
        views: new Map(),
      };
      this.combineRing[i] = b;
    }
    return b;
  }

  /** The [T, H] bf16 output view of combine ring slot `i`. */
  private combineOut(i: number, T: number): DeviceTensor {
    const slot = this.combineSlot(i);
    let v = slot.views.get(T);
    if (!v) {
      v = new DeviceTensor('bf16', [T, this.layout.hidden], slot.buffer.ptr, { device: this.rt.device });
      slot.views.set(T, v);
    }
    return v;
  }
}
