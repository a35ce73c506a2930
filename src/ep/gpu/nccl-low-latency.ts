// The low-latency mode over NCCL, for GPUs without peer access and for ranks on several hosts: the same
// calls, outputs and handles as the NVLink path (low-latency.ts), bit for bit; the data moves with NCCL
// collectives between small kernels (kernels/ll_nccl.cu). docs/low-latency.md "Over NCCL" has the design
// and the byte counts.
//   dispatch: pack (quantize each token once into this rank's block: count, routing, messages),
//             all-gather of the blocks, unpack (per local expert, every source's rows in (source, token)
//             order into the outputs).
//   combine:  pack (each expert-side row into its owner's block at slot [token][k]), all-to-all of the
//             blocks, reduce (the k-ordered weighted sum, reading each slot from its expert's rank).
// Every transfer has a fixed size (ll-nccl-layout.ts) and carries its own counts, so nothing waits on the
// host and every call is capturable in a CUDA graph. Calls are ordered by the stream alone and NCCL
// kernels, not ours, do the waiting; every block carries its call's tag, so a block left from another call
// (a transfer that ended without a peer's data) is reported, and the call fails, instead of passing. A receive
// hook enqueues the unpack (or reduce); its NCCL transfer was enqueued by the send phase and holds SMs
// while the data is in flight, which is this transport's limit. Each call kind has two receive halves,
// so a hook may run after the next call of its kind, as over NVLink.

import { DeviceBuffer, HostBuffer } from '../../device/memory.ts';
import type { Kernel } from '../../device/module.ts';
import { NcclCommunicator } from '../../dist/nccl-comm.ts';
import { DisposedError, EpTimeoutError, TsepError, ValidationError } from '../../errors.ts';
import type {
  HandleOwner,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
  RecvHook,
} from '../types.ts';
import { deviceTimeoutNs, hostWaitMs } from './device-error.ts';
import type { GpuEvent, GpuEventOptions } from './event.ts';
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
import { callTag, type LlNcclLayout, llNcclDefines, llNcclLayout } from './ll-nccl-layout.ts';
import { LlOutputs } from './ll-outputs.ts';
import type { GpuRuntime } from './runtime.ts';

/** What every low-latency failure over NCCL tells the user to do. */
const SAME_CALLS =
  'Every rank must make the same low-latency calls in the same order, with the same payload options. The NCCL ' +
  'communicator was aborted so this rank can go on; call reset() on every rank before the next call ' +
  '(TSEP_TIMEOUT_S sets the bound).';

/** Sources the receive scan can take: it clears one counter per source with one thread each. */
const MAX_RANKS = LL_THREADS;

type CallKind = 'dispatch' | 'combine';

interface NcclLlKernels {
  dispatchPack: Kernel;
  dispatchUnpack: Kernel;
  combinePack: Kernel;
  combineReduce: Kernel;
  spin: Kernel;
}

export class NcclLowLatencyPath {
  readonly rt: GpuRuntime;
  readonly layout: LlNcclLayout;
  /** Launch shapes (see {@link LlGrids}); benchmarks may change them between calls. */
  readonly tuning: LlGrids;
  private comm: NcclCommunicator;
  private readonly owner: HandleOwner;
  private readonly k: NcclLlKernels;
  private readonly smem: { dispatchRecv: number; combineSend: number };
  private readonly outputs: LlOutputs;
  /** This rank's dispatch block; the all-gathered blocks, two halves; the combine blocks out and in. */
  private readonly dispatchSend: DeviceBuffer;
  private readonly dispatchRecv: DeviceBuffer;
  private readonly combineSend: DeviceBuffer;
  private readonly combineRecv: DeviceBuffer;
  /** One i32 that gate() all-reduces: a barrier of the ranks on their streams. */
  private readonly gateWord: DeviceBuffer;
  /** Host-mapped i32 [flag, rank, tag found, 0 dispatch / 1 combine]: a call found a block of another call. */
  private readonly stale: HostBuffer;
  private readonly staleWords: Int32Array;
  /** TSEP_TIMEOUT_S, read when the path is made. */
  private readonly timeoutNs = deviceTimeoutNs();
  private readonly timeoutMs = Number(this.timeoutNs / 1_000_000n);
  /** Every call's event: bounded by TSEP_TIMEOUT_S on the host (NCCL transfers have no bound of their own). */
  private readonly eventOptions: GpuEventOptions;
  /**
   * Calls made of each kind since the last reset() (which every rank makes, so the counts agree): call i
   * uses receive half i & 1, which call i + 2 overwrites.
   */
  private readonly calls = { dispatch: 0, combine: 0 };
  /** reset()s so far: a hook remembers the epoch of its call. */
  private epoch = 0;
  /** Set when a call did not complete in time (the communicator is aborted); cleared by reset(). */
  private failure: string | undefined;
  private destroyed = false;

  private constructor(
    rt: GpuRuntime,
    layout: LlNcclLayout,
    comm: NcclCommunicator,
    owner: HandleOwner,
    kernels: NcclLlKernels,
  ) {
    this.rt = rt;
    this.layout = layout;
    this.comm = comm;
    this.owner = owner;
    this.k = kernels;
    this.tuning = defaultLlGrids(rt.smCount, layout.localExperts);
    this.smem = llSharedBytes(layout);
    this.eventOptions = {
      bound: { ms: this.timeoutMs, expire: () => this.expire() },
      check: () => this.throwIfFailed(),
    };
    const dev = rt.device;
    this.dispatchSend = DeviceBuffer.alloc(layout.dispatchSendBytes, dev);
    this.dispatchRecv = DeviceBuffer.alloc(2 * layout.dispatchRecvHalfBytes, dev);
    this.combineSend = DeviceBuffer.alloc(layout.combineSendBytes, dev);
    this.combineRecv = DeviceBuffer.alloc(2 * layout.combineRecvHalfBytes, dev);
    this.gateWord = DeviceBuffer.alloc(4, dev); // warmUp() writes it before any all-reduce
    this.stale = HostBuffer.alloc(16, dev);
    this.staleWords = this.stale.int32();
    // Tag 0 in this rank's blocks until its first call, never a call's tag: what a peer receives from them
    // then (warm-up) is recognised as no call's block.
    this.dispatchSend.fill(0);
    this.combineSend.fill(0);
    this.outputs = new LlOutputs(rt, layout, rt.options.fp8 ? 'fp8' : 'bf16');
  }

  /**
   * Collective: every rank of the runtime's group calls it. Compiles the kernels for the buffer's shape,
   * joins an NCCL communicator of the group and runs each transfer once. `owner` goes into every handle
   * (default: a label naming the rank).
   */
  static async create(rt: GpuRuntime, owner?: HandleOwner): Promise<NcclLowLatencyPath> {
    const { group, options } = rt;
    if (group.size > MAX_RANKS) {
      throw new ValidationError(
        'group size',
        String(group.size),
        `at most ${MAX_RANKS} ranks for the low-latency mode over NCCL`,
      );
    }
    const layout = llNcclLayout(llBufferShape(group.size, options));
    const mod = await rt.kernels('ll_nccl.cu', llNcclDefines(layout));
    const kernels: NcclLlKernels = {
      // x, topk, T, K, flags, block, msg, tag
      dispatchPack: mod.kernel('ll_nccl_dispatch_pack', [
        'ptr',
        'ptr',
        'i32',
        'i32',
        'i32',
        'ptr',
        'i32',
        'u32',
      ]),
      // gathered, block, msg, rank, flags, recvX, recvScales, recvCount, srcInfo, layoutRange, kmask, parts,
      // tag, stale
      dispatchUnpack: mod.kernel('ll_nccl_dispatch_unpack', [
        'ptr',
        'u64',
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
        'u32',
        'ptr',
      ]),
      // x, srcInfo, layoutRange, kmask, blocks, tag
      combinePack: mod.kernel('ll_nccl_combine_pack', ['ptr', 'ptr', 'ptr', 'ptr', 'ptr', 'u32']),
      // blocks, topk, weights, out, T, K, flags, tag, stale
      combineReduce: mod.kernel('ll_nccl_combine_reduce', [
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'i32',
        'i32',
        'i32',
        'u32',
        'ptr',
      ]),
      spin: mod.kernel('ll_nccl_spin', ['u64']),
    };
    const comm = await NcclCommunicator.create(group, rt.device);
    const path = new NcclLowLatencyPath(
      rt,
      layout,
      comm,
      owner ?? { label: `GPU low-latency path over NCCL (rank ${group.rank} of ${group.size})` },
      kernels,
    );
    await path.warmUp();
    return path;
  }

  /** Bytes of communication memory of this rank (blocks and receive halves; NCCL's own come on top). */
  bytes(): number {
    return this.layout.totalBytes;
  }

  /** Bytes of the output rings allocated so far. */
  outputBytes(): number {
    return this.outputs.bytes();
  }

  // ------------------------------------------------------------------------------------------ dispatch

  dispatch(req: LowLatencyDispatchRequest): LowLatencyDispatchResult {
    this.checkUsable();
    const rt = this.rt;
    const L = this.layout;
    const stream = rt.stream;
    const { x, topk, T, K, flags, kind } = llDispatchInputs(rt, L, req);
    const views = this.outputs.nextDispatch(kind, req.ue8m0);
    const call = this.calls.dispatch++;
    const tag = callTag(this.epoch, call);
    const gathered = this.dispatchRecv.ptr + BigInt((call & 1) * L.dispatchRecvHalfBytes);
    const block = L.blockBytes[kind];
    const msg = L.msgBytes[kind];
    const g = this.tuning;
    const parts = g.dispatchRecvParts;
    this.k.dispatchPack.launch({ grid: dispatchSendGrid(g, T, L.hidden), block: LL_THREADS, stream }, [
      x.ptr,
      topk.ptr,
      T,
      K,
      flags,
      this.dispatchSend.ptr,
      msg,
      tag,
    ]);
    this.comm.allGather(this.dispatchSend.ptr, gathered, block, 'u8', stream);
    const unpack = (): void => {
      this.k.dispatchUnpack.launch(
        { grid: L.localExperts * parts, block: LL_THREADS, sharedBytes: this.smem.dispatchRecv, stream },
        [
          gathered,
          BigInt(block),
          msg,
          rt.group.rank, // the global rank: it owns experts [rank·E_l, (rank+1)·E_l) on any host
          flags,
          views.recvX.ptr,
          views.recvScales?.ptr ?? 0n,
          views.recvCount.ptr,
          views.srcInfo.ptr,
          views.range.ptr,
          views.kmask.ptr,
          parts,
          tag,
          this.stale.devicePtr,
        ],
      );
    };
    let hook: RecvHook | undefined;
    if (req.returnRecvHook) hook = hookOnce('dispatch', this.inTime('dispatch', call), unpack);
    else unpack();
    return llDispatchResult(this, this.owner, T, views, this.event(), hook);
  }

  // ------------------------------------------------------------------------------------------- combine

  combine(req: LowLatencyCombineRequest): LowLatencyCombineResult {
    this.checkUsable();
    const rt = this.rt;
    const L = this.layout;
    const stream = rt.stream;
    const { x, topk, weights, T, K, flags, handle } = llCombineInputs(rt, L, req, this);
    const out = this.outputs.nextCombine(T);
    const call = this.calls.combine++;
    const tag = callTag(this.epoch, call);
    const blocks = this.combineRecv.ptr + BigInt((call & 1) * L.combineRecvHalfBytes);
    const g = this.tuning;
    const recvGrid = combineRecvGrid(g, T, L.hidden);
    this.k.combinePack.launch(
      { grid: g.combineSendBlocks, block: LL_THREADS, sharedBytes: this.smem.combineSend, stream },
      [
        x.ptr,
        handle.packedRecvSrcInfo.ptr,
        handle.packedRecvLayoutRange.ptr,
        handle.recvKMask.ptr,
        this.combineSend.ptr,
        tag,
      ],
    );
    this.comm.allToAll(this.combineSend.ptr, blocks, L.combineBlockBytes, 'u8', stream);
    const reduce = (): void => {
      this.k.combineReduce.launch({ grid: recvGrid, block: LL_THREADS, stream }, [
        blocks,
        topk.ptr,
        weights.ptr,
        out.ptr,
        T,
        K,
        flags,
        tag,
        this.stale.devicePtr,
      ]);
    };
    let hook: RecvHook | undefined;
    if (req.returnRecvHook) hook = hookOnce('combine', this.inTime('combine', call), reduce);
    else reduce();
    return llCombineResult(out, this.event(), hook);
  }

  // ------------------------------------------------------------------------------------ maintenance

  /** Fills every output tensor allocated so far with `byte` (stream-ordered): tests poison outputs. */
  fillOutputs(byte: number): void {
    this.outputs.fill(byte, this.rt.stream);
  }

  /**
   * Over NCCL there is no device state to clean: the stream orders the calls. After a timeout the
   * communicator is gone, which only reset() (async, collective) can replace, so clean() says so.
   */
  clean(): void {
    if (this.destroyed) throw new DisposedError('NcclLowLatencyPath');
    if (this.failure !== undefined) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `${this.failure} Over NCCL, cleanLowLatencyBuffer() cannot rejoin the ranks: call await buffer.reset() on every rank.`,
      );
    }
  }

  /** Ends any NCCL transfer still waiting for a peer: aborts the communicator (reset() joins a new one). */
  abortTransfers(): void {
    this.comm.abort();
  }

  /**
   * Collective, after a timeout: aborts this rank's communicator (which ends any transfer still waiting
   * for a peer), waits for the stream, and joins a new communicator with every rank.
   */
  async reset(): Promise<void> {
    if (this.destroyed) throw new DisposedError('NcclLowLatencyPath');
    this.abortTransfers();
    ++this.epoch; // hooks of calls made before the reset are refused: warmUp() overwrites their halves
    // Every rank counts calls from here again, so the tags agree even if one rank skipped a call before.
    this.calls.dispatch = this.calls.combine = 0;
    await this.rt.stream.synchronize({
      timeoutMs: hostWaitMs(this.timeoutNs),
      what: 'the low-latency calls of this rank after its NCCL communicator was aborted',
    });
    this.comm = await NcclCommunicator.create(this.rt.group, this.rt.device);
    this.staleWords.fill(0);
    this.failure = undefined;
    await this.warmUp();
  }

  /**
   * Collective, for benchmarks: keeps the GPU busy for `spinNs` nanoseconds, then an all-reduce of one
   * word lines the ranks up, so work enqueued after it starts together on all ranks and is not delayed by
   * host enqueue time.
   */
  gate(spinNs = 0): void {
    this.checkUsable();
    const stream = this.rt.stream;
    this.k.spin.launch({ grid: 1, block: 1, stream }, [BigInt(Math.max(0, Math.round(spinNs)))]);
    this.comm.allReduce(this.gateWord.ptr, this.gateWord.ptr, 1, 'i32', 'max', stream);
  }

  /** The timeout this path reported, as the message of an EpTimeoutError; undefined if none. */
  deviceError(): string | undefined {
    this.noteStale(); // graph replays pass no event check
    return this.failure;
  }

  /** Waits (bounded) for the path's work, then releases the communicator and the memory. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await this.drain();
    this.comm.destroy();
    for (const b of [this.dispatchSend, this.dispatchRecv, this.combineSend, this.combineRecv, this.gateWord])
      b.dispose();
    this.stale.dispose();
    this.outputs.dispose();
  }

  // ---------------------------------------------------------------------------------------- internals

  /**
   * NCCL connects peers on a communicator's first transfers: do each transfer once now, so neither the
   * first call's time nor a CUDA-graph capture includes that.
   */
  private async warmUp(): Promise<void> {
    const L = this.layout;
    const stream = this.rt.stream;
    for (const block of new Set([L.blockBytes.fp8, L.blockBytes.bf16]))
      this.comm.allGather(this.dispatchSend.ptr, this.dispatchRecv.ptr, block, 'u8', stream);
    this.comm.allToAll(this.combineSend.ptr, this.combineRecv.ptr, L.combineBlockBytes, 'u8', stream);
    // The ranks agree on the reset count (the tags' top bits): the largest, should a reset have failed on
    // one rank after counting.
    this.gateWord.copyFromHost(Int32Array.of(this.epoch));
    this.comm.allReduce(this.gateWord.ptr, this.gateWord.ptr, 1, 'i32', 'max', stream);
    // Connecting may take longer than a call may (TSEP_TIMEOUT_S can be small): at least a minute.
    await this.drain(Math.max(this.timeoutMs, 60_000));
    this.throwIfFailed();
    const agreed = new Int32Array(1);
    this.gateWord.copyToHost(agreed);
    this.epoch = agreed[0]!;
  }

  /** Waits for the stream; a transfer that never completes (a missing peer) aborts the communicator. */
  private async drain(timeoutMs = this.timeoutMs): Promise<void> {
    try {
      await this.rt.stream.synchronize({ timeoutMs });
    } catch (e) {
      if (!(e instanceof EpTimeoutError)) throw e;
      this.expire(timeoutMs);
      await this.rt.stream.synchronize({ timeoutMs: this.timeoutMs });
    }
  }

  private checkUsable(): void {
    if (this.destroyed) throw new DisposedError('NcclLowLatencyPath');
    this.noteStale();
    if (this.failure !== undefined) throw new EpTimeoutError(this.failure);
  }

  private throwIfFailed(): void {
    this.noteStale();
    if (this.failure !== undefined) throw new EpTimeoutError(this.failure);
    this.comm.checkAsyncError();
  }

  /** A call that found another call's block from a rank (its transfer ended without it) fails. */
  private noteStale(): void {
    const v = this.staleWords;
    if (v[0] === 0) return;
    const { rank } = this.rt.group;
    this.fail(
      `Low-latency ${v[3] === 1 ? 'combine' : 'dispatch'} over NCCL on rank ${rank} received no block of this ` +
        `call from rank ${v[1]} (found call tag ${v[2]! >>> 0}): its transfer ended without that rank's data. ` +
        SAME_CALLS,
    );
  }

  /** Records the failure and aborts the communicator (its waiting transfers end); the error to throw. */
  private expire(waitedMs = this.timeoutMs): EpTimeoutError {
    const { rank } = this.rt.group;
    return this.fail(
      `Low-latency call over NCCL on rank ${rank} did not complete within ${waitedMs / 1000} s. ` +
        `A rank is missing, stuck or made a different call (NCCL cannot say which). ${SAME_CALLS}`,
    );
  }

  private fail(message: string): EpTimeoutError {
    if (this.failure === undefined) {
      this.failure = message;
      this.comm.abort();
    }
    return new EpTimeoutError(this.failure);
  }

  private event(): GpuEvent {
    return this.rt.record(this.eventOptions);
  }

  /** A hook's data must still be in its receive half, which the call two later of its kind overwrites. */
  private inTime(kind: CallKind, call: number): () => void {
    const epoch = this.epoch;
    return () => {
      this.checkUsable();
      if (this.epoch !== epoch) {
        throw new TsepError(
          'TSEP_UNSUPPORTED',
          `This low-latency ${kind} hook belongs to a call made before reset(), whose data reset() discarded. ` +
            'Make the call again.',
        );
      }
      if (this.calls[kind] > call + 2) {
        throw new TsepError(
          'TSEP_UNSUPPORTED',
          `This low-latency ${kind} hook came after two later ${kind} calls, which overwrote the data it would ` +
            `receive. Call each hook before the second later ${kind} call.`,
        );
      }
    };
  }
}
