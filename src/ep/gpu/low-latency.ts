// The low-latency (decode) path of the GPU backend: DeepEP's low_latency_dispatch / low_latency_combine
// over NVLink between the GPUs of one host, one process per GPU. docs/low-latency.md has the protocol,
// the buffer layout with byte counts, and how it differs from DeepEP; kernels/low_latency.cu the kernels.
//
// Nothing here waits for the GPU: every call only enqueues kernels on the runtime's stream. Sequence
// numbers, buffer halves and signals live on the device, so calls are capturable in a CUDA graph and
// replays stay correct. Outputs come from the ring of ll-outputs.ts; the host side of a call that does not
// depend on the transport (checks, flags, handle, hooks) is ll-call.ts.

import type { Kernel, Module } from '../../device/module.ts';
import { SymmetricBuffer } from '../../dist/symmetric.ts';
import { DisposedError, EpTimeoutError, TsepError, ValidationError } from '../../errors.ts';
import type {
  HandleOwner,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
  RecvHook,
} from '../types.ts';
import { deviceTimeoutNs } from './device-error.ts';
import type { GpuEvent } from './event.ts';
import {
  combineRecvGrid,
  defaultLlGrids,
  dispatchSendGrid,
  hookOnce,
  LL_THREADS,
  type LlGrids,
  llBufferShape,
  llCombineInputs,
  llCombineResult,
  llDispatchInputs,
  llDispatchResult,
  llSharedBytes,
} from './ll-call.ts';
import { LL_RECORD, type LlLayout, llDefines, llLayout, llMaxRanks } from './ll-layout.ts';
import { LlOutputs } from './ll-outputs.ts';
import { joinNvshmem, loadEngineModule, NvshmemSymmetric } from './nvshmem-engine.ts';
import type { GpuRuntime } from './runtime.ts';

/** The buffer layout of a path (with the combine outbox that ranks on other hosts are sent from). */
function layoutOf({ group, options }: GpuRuntime, acrossHosts: boolean): LlLayout {
  return llLayout(llBufferShape(group.size, options), { outbox: acrossHosts });
}

/** The peer-mapped memory of a path: CUDA IPC between the GPUs of a host, or NVSHMEM's symmetric heap. */
type LlMemory = Pick<SymmetricBuffer, 'local' | 'peerTable' | 'signal' | 'destroy'>;

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
export interface LlTuning extends LlGrids {
  /**
   * Without receive hooks, run the send and receive phases in one launch (default). Its grid is capped at
   * what fits on the GPU at once, so a block waiting in the receive phase never starves a send block.
   */
  fuse: boolean;
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

const PHASE_SEND = 1;
const PHASE_RECV = 2;

export class LowLatencyPath {
  readonly rt: GpuRuntime;
  readonly layout: LlLayout;
  private readonly sym: LlMemory;
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
  private readonly outputs: LlOutputs;
  private destroyed = false;
  /** Launch shapes (see {@link LlTuning}). */
  readonly tuning: LlTuning;

  private constructor(
    rt: GpuRuntime,
    layout: LlLayout,
    sym: LlMemory,
    owner: HandleOwner,
    kernels: Kernel[],
  ) {
    this.rt = rt;
    this.layout = layout;
    this.sym = sym;
    this.owner = owner;
    this.record = new Int32Array(sym.signal.arrayBuffer, 0, LL_RECORD.words);
    this.timeout = deviceTimeoutNs();
    // The peer table's index: every rank has an entry (over NVLink all ranks are on one host, where the
    // local rank is the rank, as SymmetricBuffer lays them out).
    this.rank = rt.group.rank;
    this.outputs = new LlOutputs(rt, layout, rt.options.fp8 ? 'fp8' : 'bf16');
    [this.kDispatch, this.kCombine, this.kClean, this.kGate] = kernels as [Kernel, Kernel, Kernel, Kernel];
    const sms = rt.smCount;
    const smem = llSharedBytes(layout);
    this.dispatchSmem = smem.dispatchRecv;
    this.combineSmem = smem.combineSend;
    this.dispatchResident = sms * Math.max(1, this.kDispatch.occupancy(LL_THREADS, this.dispatchSmem));
    this.combineResident = sms * Math.max(1, this.kCombine.occupancy(LL_THREADS, this.combineSmem));
    this.tuning = { fuse: true, ...defaultLlGrids(sms, layout.localExperts) };
  }

  /** Bytes of the symmetric buffer this path needs in NVSHMEM's heap (transport 'nvshmem'). */
  static heapBytes(rt: GpuRuntime): number {
    return layoutOf(rt, true).totalBytes;
  }

  /**
   * Collective: every rank of the runtime's group calls it. Compiles the kernels for the buffer's shape
   * and maps the ranks' symmetric buffers. `owner` goes into every handle (default: a label naming the
   * rank). `acrossHosts`: transport 'nvshmem' (ranks on other hosts than `ranksPerHost` puts them on are
   * reached through NVSHMEM); otherwise every rank must be on this host.
   */
  static async create(rt: GpuRuntime, owner?: HandleOwner, acrossHosts = false): Promise<LowLatencyPath> {
    const { group, options } = rt;
    if (!acrossHosts && group.size !== group.localSize) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `The GPU low-latency mode over NVLink runs inside one host; this group has ${group.size} ranks, ${group.localSize} on this host (transport 'nvshmem' or 'nccl' spans hosts).`,
      );
    }
    const most = llMaxRanks(acrossHosts);
    if (group.size > most || group.size < 1) {
      throw new ValidationError(
        'group size',
        String(group.size),
        `1 to ${most} ranks (${acrossHosts ? 'across hosts' : 'one NVLink host'})`,
      );
    }
    const layout = layoutOf(rt, acrossHosts);
    let mod: Module;
    let sym: LlMemory;
    if (acrossHosts) {
      await joinNvshmem(group, rt.device, layout.totalBytes);
      const defines = { ...llDefines(layout), LL_ENGINE: 1, LL_RPH: options.ranksPerHost };
      mod = await loadEngineModule(rt.device, 'low_latency.cu', defines);
      sym = await NvshmemSymmetric.create(group, rt.device, layout.totalBytes, options.ranksPerHost);
    } else {
      mod = await rt.kernels('low_latency.cu', llDefines(layout));
      sym = await SymmetricBuffer.create(group, layout.totalBytes, rt.device);
    }
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
    return new LowLatencyPath(
      rt,
      layout,
      sym,
      owner ?? { label: `GPU low-latency path (rank ${group.rank} of ${group.size})` },
      kernels,
    );
  }

  /** Bytes of the symmetric (peer-mapped) buffer of this rank. */
  bytes(): number {
    return this.layout.totalBytes;
  }

  /** Bytes of the output rings allocated so far (device memory outside the symmetric buffer). */
  outputBytes(): number {
    return this.outputs.bytes();
  }

  // ------------------------------------------------------------------------------------------ dispatch

  dispatch(req: LowLatencyDispatchRequest): LowLatencyDispatchResult {
    this.checkUsable();
    const rt = this.rt;
    const L = this.layout;
    const { x, topk, T, K, flags, kind } = llDispatchInputs(rt, L, req);
    const views = this.outputs.nextDispatch(kind, req.ue8m0);

    const tn = this.tuning;
    const sendGrid = dispatchSendGrid(tn, T, L.hidden);
    const parts = tn.dispatchRecvParts;
    const recvGrid = L.localExperts * parts;
    const launch = (grid: number, phases: number): void => {
      this.kDispatch.launch({ grid, block: LL_THREADS, sharedBytes: this.dispatchSmem, stream: rt.stream }, [
        this.sym.peerTable.ptr,
        this.sym.signal.devicePtr,
        this.rank,
        this.timeout,
        x.ptr,
        topk.ptr,
        T,
        K,
        flags,
        views.recvX.ptr,
        views.recvScales?.ptr ?? 0n,
        views.recvCount.ptr,
        views.srcInfo.ptr,
        views.range.ptr,
        views.kmask.ptr,
        parts,
        phases,
      ]);
    };
    let hook: RecvHook | undefined;
    if (req.returnRecvHook) {
      launch(sendGrid, PHASE_SEND);
      hook = hookOnce('dispatch', this.alive, () => launch(recvGrid, PHASE_RECV));
    } else if (tn.fuse) {
      launch(Math.min(this.dispatchResident, Math.max(sendGrid, recvGrid)), PHASE_SEND | PHASE_RECV);
    } else {
      launch(sendGrid, PHASE_SEND);
      launch(recvGrid, PHASE_RECV);
    }
    return llDispatchResult(this, this.owner, T, views, this.event(), hook);
  }

  // ------------------------------------------------------------------------------------------- combine

  combine(req: LowLatencyCombineRequest): LowLatencyCombineResult {
    this.checkUsable();
    const rt = this.rt;
    const L = this.layout;
    const { x, topk, weights: w, T, K, flags, handle } = llCombineInputs(rt, L, req, this);
    const out = this.outputs.nextCombine(T);
    const srcInfo = handle.packedRecvSrcInfo;
    const range = handle.packedRecvLayoutRange;
    const tn = this.tuning;
    const recvGrid = combineRecvGrid(tn, T, L.hidden);
    const launch = (grid: number, phases: number): void => {
      this.kCombine.launch({ grid, block: LL_THREADS, sharedBytes: this.combineSmem, stream: rt.stream }, [
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
        flags,
        phases,
      ]);
    };
    let hook: RecvHook | undefined;
    if (req.returnRecvHook) {
      launch(tn.combineSendBlocks, PHASE_SEND);
      hook = hookOnce('combine', this.alive, () => launch(recvGrid, PHASE_RECV));
    } else if (tn.fuse) {
      launch(
        Math.min(this.combineResident, Math.max(tn.combineSendBlocks, recvGrid)),
        PHASE_SEND | PHASE_RECV,
      );
    } else {
      launch(tn.combineSendBlocks, PHASE_SEND);
      launch(recvGrid, PHASE_RECV);
    }
    return llCombineResult(out, this.event(), hook);
  }

  // ------------------------------------------------------------------------------------ maintenance

  /** Fills every output tensor allocated so far with `byte` (stream-ordered): tests poison outputs. */
  fillOutputs(byte: number): void {
    this.outputs.fill(byte, this.rt.stream);
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

  /** Nothing to abort: every wait of the NVLink kernels is bounded on the device. */
  abortTransfers(): void {}

  /** Collective: clean(), as the reset after a timeout (the backend then waits for the stream). */
  reset(): Promise<void> {
    this.clean();
    return Promise.resolve();
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
      'the same order, and call a hook at most two calls later. Call await buffer.reset() (or ' +
      'buffer.cleanLowLatencyBuffer()) on every rank before the next call (TSEP_TIMEOUT_S sets the bound).'
    );
  }

  /** Waits for the path's work, then collectively releases the symmetric buffer and the outputs. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await this.rt.stream.synchronize();
    await this.sym.destroy();
    this.outputs.dispose();
  }

  // ---------------------------------------------------------------------------------------- internals

  /** Throws once the path is destroyed (a hook of an earlier call may still be called). */
  private readonly alive = (): void => {
    if (this.destroyed) throw new DisposedError('LowLatencyPath');
  };

  private checkUsable(): void {
    if (this.destroyed) throw new DisposedError('LowLatencyPath');
    this.throwIfTimedOut();
  }

  /** Throws EpTimeoutError when a kernel of this path reported a timed-out wait. */
  private readonly throwIfTimedOut = (): void => {
    const msg = this.deviceError();
    if (msg !== undefined) throw new EpTimeoutError(msg);
  };

  /** Every call's event checks for a reported timeout when it completes (one options object for all). */
  private readonly eventOptions = { check: this.throwIfTimedOut };

  private event(): GpuEvent {
    return this.rt.record(this.eventOptions);
  }
}
