// The normal (high-throughput) mode of the GPU backend over NVLink: layout, dispatch, combine. The
// kernels are in kernels/layout.cu and kernels/normal.cu; the buffer layout in normal-layout.ts.
//
// A fresh dispatch enqueues notify (count exchange) and send (rows pushed into the receivers' buffers)
// at once, then reads the received row count from host-mapped memory while the rows are in flight,
// allocates exact-size outputs and enqueues the receive epilogue. Cached and worst-case dispatches skip
// the host read entirely. Calls are serialized on the host, in call order, like the stream they use.

import { DeviceTensor } from '../../device/device-tensor.ts';
import type { Kernel, Module } from '../../device/module.ts';
import { pollUntil } from '../../device/poll.ts';
import { SymmetricBuffer } from '../../dist/symmetric.ts';
import { ValidationError } from '../../errors.ts';
import type {
  CombineRequest,
  CombineResult,
  DispatchHandle,
  DispatchLayout,
  DispatchRequest,
  DispatchResult,
  Tensor,
} from '../types.ts';
import { clearDeviceError, deviceTimeoutNs, throwIfDeviceError } from './device-error.ts';
import {
  CTRL_BYTES,
  ERROR_RECORD,
  MAX_LOCAL_EXPERTS,
  MAX_RANKS,
  type NormalAreas,
  normalAreas,
  SIGNAL_BYTES,
  SIGNAL_EXPERTS,
  SIGNAL_ROWS,
  SIGNAL_SEQ,
} from './normal-layout.ts';
import type { GpuRuntime } from './runtime.ts';

/** Device state a GPU dispatch handle carries beyond the public fields. */
export interface GpuDispatchHandle extends DispatchHandle {
  /** [T, R] i32: position of each token among this rank's tokens for rank r, -1 if not sent. */
  readonly sendPos: DeviceTensor;
  /** [1] i32: rows actually received (≤ numRecvRows in worst-case mode). */
  readonly recvCount: DeviceTensor;
}

/** Threads per block of the send kernels; a block is one SM's worth of copy warps. */
const SEND_THREADS = 512;
/** SMs the send kernels use unless told otherwise (DeepEP's tests use 24). */
export const DEFAULT_NORMAL_SMS = 24;

export class NormalPath {
  private readonly rt: GpuRuntime;
  private readonly sym: SymmetricBuffer;
  private readonly areas: NormalAreas;
  private readonly layoutKernels: Record<'i32' | 'i64', Kernel>;
  private readonly modules = new Map<string, Promise<Module>>();
  private readonly timeoutNs = deviceTimeoutNs();
  private seq = 0;
  private queue: Promise<unknown> = Promise.resolve();
  /** SMs (blocks) the dispatch and combine send kernels use; the same on every rank. */
  numSms = Number(process.env.TSEP_NORMAL_SMS ?? DEFAULT_NORMAL_SMS);
  /** 16-byte loads per lane in flight in the send kernels' row copies (a tuning knob; TSEP_NORMAL_UNROLL). */
  private readonly unroll = Number(process.env.TSEP_NORMAL_UNROLL ?? 4);

  private constructor(
    rt: GpuRuntime,
    sym: SymmetricBuffer,
    areas: NormalAreas,
    layout: Record<'i32' | 'i64', Kernel>,
  ) {
    this.rt = rt;
    this.sym = sym;
    this.areas = areas;
    this.layoutKernels = layout;
  }

  static async create(rt: GpuRuntime): Promise<NormalPath> {
    const R = rt.group.size;
    const o = rt.options;
    if (rt.group.localSize !== R) {
      throw new ValidationError(
        'group',
        `${R} ranks over several hosts`,
        'one host for the NVLink normal mode',
      );
    }
    if (R > MAX_RANKS) throw new ValidationError('group size', String(R), `at most ${MAX_RANKS} ranks`);
    const EL = o.numExperts / R;
    if (EL > MAX_LOCAL_EXPERTS) {
      throw new ValidationError(
        'numExperts',
        String(o.numExperts),
        `at most ${MAX_LOCAL_EXPERTS} experts per rank`,
      );
    }
    const areas = normalAreas(R, o.maxTokensPerRank, o.hidden, o.numTopk);
    // Layout kernels are needed synchronously by getDispatchLayout, so they are compiled up front.
    const [m32, m64] = await Promise.all(
      [0, 1].map((idx64) => rt.kernels('layout.cu', { TSEP_R: R, TSEP_EL: EL, TSEP_IDX64: idx64 })),
    );
    const params = ['ptr', 'i32', 'i32', 'ptr', 'ptr', 'ptr'] as const;
    const layout = { i32: m32!.kernel('tsep_layout', params), i64: m64!.kernel('tsep_layout', params) };
    const sym = await SymmetricBuffer.create(rt.group, areas.bytes, rt.device, { signalBytes: SIGNAL_BYTES });
    return new NormalPath(rt, sym, areas, layout);
  }

  /** Bytes of communication memory per rank. */
  bytes(): number {
    return this.areas.bytes;
  }

  private get R(): number {
    return this.rt.group.size;
  }

  private get EL(): number {
    return this.rt.options.numExperts / this.R;
  }

  private get me(): number {
    return this.rt.group.localRank;
  }

  /** Throws EpTimeoutError when a kernel of this buffer gave up waiting (until `reset()`). */
  private readonly check = (): void => throwIfDeviceError(this.sym.signal, ERROR_RECORD);

  /**
   * Collective (every rank calls it): after a timeout, waits for this rank's work to end (every device
   * wait is bounded), then zeroes every rank's control block and error record between two barriers of the
   * group, so the next call starts from a clean state on all ranks.
   */
  async reset(): Promise<void> {
    await this.queue;
    await this.rt.stream.synchronize({ timeoutMs: Number(this.timeoutNs / 1_000_000n) + 5000 });
    await this.rt.group.barrier();
    this.sym.local.fill(0, this.rt.stream, 0, CTRL_BYTES);
    await this.rt.stream.synchronize();
    clearDeviceError(this.sym.signal, ERROR_RECORD);
    await this.rt.group.barrier();
  }

  /** Runs host phases one call at a time, in call order (they share the buffer and the signal page). */
  private serial<T>(work: () => Promise<T>): Promise<T> {
    const run = this.queue.then(work, work);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private module(defines: Record<string, number>): Promise<Module> {
    const key = JSON.stringify(defines);
    let m = this.modules.get(key);
    if (!m) {
      m = this.rt.kernels('normal.cu', defines);
      this.modules.set(key, m);
      m.catch(() => this.modules.delete(key));
    }
    return m;
  }

  private defines(
    elt: number,
    scaleWords: number,
    k: number,
    idx64: boolean,
    weights: boolean,
  ): Record<string, number> {
    return {
      TSEP_R: this.R,
      TSEP_EL: this.EL,
      TSEP_H: this.rt.options.hidden,
      TSEP_ELT: elt,
      TSEP_SW: scaleWords,
      TSEP_K: k,
      TSEP_IDX64: idx64 ? 1 : 0,
      TSEP_WEIGHTS: weights ? 1 : 0,
      TSEP_TMAX: this.rt.options.maxTokensPerRank,
      TSEP_UNROLL: this.unroll,
    };
  }

  private areaArgs(): bigint[] {
    const a = this.areas;
    return [a.x, a.scales, a.srcIdx, a.topk, a.weights].map(BigInt);
  }

  private get errorPtr(): bigint {
    return this.sym.signal.devicePtr + BigInt(ERROR_RECORD);
  }

  layout(topkIdxArg: Tensor): DispatchLayout {
    const topk = this.rt.onDevice('topkIdx', topkIdxArg);
    const [T, K] = topk.shape as [number, number];
    const R = this.R;
    const perRank = DeviceTensor.emptyOn('i32', [R], this.rt.stream);
    const perExpert = DeviceTensor.emptyOn('i32', [R * this.EL], this.rt.stream);
    const inRank = DeviceTensor.emptyOn('bool', [T, R], this.rt.stream);
    this.layoutKernels[topk.dtype === 'i64' ? 'i64' : 'i32'].launch(
      { grid: 1, block: 1024, stream: this.rt.stream },
      [topk.ptr, T, K, perRank.ptr, perExpert.ptr, inRank.ptr],
    );
    return {
      numTokensPerRank: perRank,
      numTokensPerExpert: perExpert,
      isTokenInRank: inRank,
    };
  }

  dispatch(req: DispatchRequest): Promise<DispatchResult> {
    return this.serial(() => this.runDispatch(req));
  }

  private async runDispatch(req: DispatchRequest): Promise<DispatchResult> {
    this.check();
    const rt = this.rt;
    const R = this.R;
    const x = rt.onDevice('x', req.x);
    if (!x.isContiguous())
      throw new ValidationError('x', 'a strided tensor', 'a row-major contiguous tensor');
    const T = x.shape[0]!;
    const H = rt.options.hidden;
    const elt = x.dtype === 'fp8_e4m3' ? 1 : 2;
    const scales = req.scales ? rt.onDevice('scales', req.scales) : undefined;
    const sw = scales ? scales.shape[1]! : 0;
    const fresh = req.kind === 'fresh';
    const topk = fresh && req.topkIdx ? rt.onDevice('topkIdx', req.topkIdx) : undefined;
    const weights = fresh && req.topkWeights ? rt.onDevice('topkWeights', req.topkWeights) : undefined;
    const K = topk ? topk.shape[1]! : 0;
    const mod = await this.module(this.defines(elt, sw, K, topk?.dtype === 'i64', weights !== undefined));
    const G = this.numSms;
    const errPtr = this.errorPtr;
    const peers = this.sym.peerTable.ptr;
    const stream = rt.stream;
    rt.after(req.previousEvent);
    rt.markStart();

    let rankPrefix: DeviceTensor;
    let sendPos: DeviceTensor;
    let recvCount: DeviceTensor;
    let isTokenInRank: DeviceTensor;
    let rows: number;
    let perExpert: number[];
    const worst = fresh ? req.worstCaseTokens : req.handle.worstCaseTokens;
    const alignment = fresh ? req.expertAlignment : req.handle.expertAlignment;
    if (fresh) {
      const layout = req.layout;
      isTokenInRank = rt.onDevice('layout.isTokenInRank', layout.isTokenInRank);
      rankPrefix = DeviceTensor.emptyOn('i32', [R, R], stream);
      sendPos = DeviceTensor.emptyOn('i32', [T, R], stream);
      recvCount = DeviceTensor.emptyOn('i32', [1], stream);
      const seq = ++this.seq;
      mod
        .kernel('tsep_notify', [
          'ptr',
          'i32',
          'i32',
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
          'u64',
          'ptr',
        ])
        .launch({ grid: R + 1, block: 256, stream }, [
          peers,
          this.me,
          T,
          isTokenInRank.ptr,
          rt.onDevice('layout.numTokensPerRank', layout.numTokensPerRank).ptr,
          rt.onDevice('layout.numTokensPerExpert', layout.numTokensPerExpert).ptr,
          rankPrefix.ptr,
          sendPos.ptr,
          recvCount.ptr,
          this.sym.signal.devicePtr,
          seq,
          alignment,
          G,
          this.timeoutNs,
          errPtr,
        ]);
      this.rt.mark('notify');
      this.launchSend(mod, x, scales, topk, weights, sendPos, rankPrefix, T);
      if (worst > 0) {
        rows = worst;
        perExpert = [];
      } else {
        const sig = this.sym.signal.int32();
        await pollUntil(
          () => {
            this.check();
            return Atomics.load(sig, SIGNAL_SEQ) === seq;
          },
          {
            timeoutMs: Number(this.timeoutNs / 1_000_000n) + 2000,
            what: `the dispatch counts (rank ${rt.group.rank})`,
          },
        );
        rows = Atomics.load(sig, SIGNAL_ROWS);
        perExpert = Array.from(sig.subarray(SIGNAL_EXPERTS, SIGNAL_EXPERTS + this.EL));
      }
    } else {
      const h = req.handle as GpuDispatchHandle;
      isTokenInRank = rt.onDevice('handle.isTokenInRank', h.isTokenInRank);
      rankPrefix = rt.onDevice('handle.rankPrefixMatrix', h.rankPrefixMatrix);
      sendPos = h.sendPos;
      recvCount = h.recvCount;
      rows = h.numRecvRows;
      perExpert = [...h.numRecvTokensPerExpert];
      this.launchPrepare(mod, 0);
      this.launchSend(mod, x, scales, undefined, undefined, sendPos, rankPrefix, T);
    }
    const recvX = DeviceTensor.emptyOn(x.dtype, [rows, H], stream);
    const recvScales = scales ? DeviceTensor.emptyOn(scales.dtype, [rows, sw], stream) : undefined;
    const recvSrcIdx = DeviceTensor.emptyOn('i32', [rows], stream);
    const recvTopkIdx = topk ? DeviceTensor.emptyOn(topk.dtype, [rows, K], stream) : undefined;
    const recvTopkWeights = weights ? DeviceTensor.emptyOn('f32', [rows, K], stream) : undefined;
    mod
      .kernel('tsep_dispatch_recv', [
        'ptr',
        'i32',
        'ptr',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'u64',
        'u64',
        'u64',
        'u64',
        'u64',
        'u64',
        'ptr',
      ])
      .launch({ grid: rt.smCount, block: 512, stream }, [
        peers,
        this.me,
        recvCount.ptr,
        rows,
        recvX.ptr,
        recvScales?.ptr ?? 0n,
        recvSrcIdx.ptr,
        recvTopkIdx?.ptr ?? 0n,
        recvTopkWeights?.ptr ?? 0n,
        ...this.areaArgs(),
        this.timeoutNs,
        errPtr,
      ]);
    this.rt.mark('receive');
    const handle: GpuDispatchHandle = {
      kind: 'dispatch',
      owner: rt.owner,
      numTokens: T,
      numRecvRows: rows,
      worstCaseTokens: worst,
      expertAlignment: alignment,
      numRecvTokensPerExpert: perExpert,
      isTokenInRank,
      rankPrefixMatrix: rankPrefix,
      recvSrcIdx,
      sendPos,
      recvCount,
    };
    const result: DispatchResult = {
      recvX,
      numRecvTokensPerExpert: perExpert,
      handle: fresh ? handle : req.handle,
      event: rt.record({ check: this.check }),
    };
    return {
      ...result,
      ...(recvScales ? { recvScales } : {}),
      ...(recvTopkIdx ? { recvTopkIdx } : {}),
      ...(recvTopkWeights ? { recvTopkWeights } : {}),
    };
  }

  private launchPrepare(mod: Module, which: 0 | 1): void {
    mod
      .kernel('tsep_prepare', ['ptr', 'i32', 'i32', 'i32', 'u64', 'ptr'])
      .launch({ grid: 1, block: 32, stream: this.rt.stream }, [
        this.sym.peerTable.ptr,
        this.me,
        which,
        this.numSms,
        this.timeoutNs,
        this.errorPtr,
      ]);
    this.rt.mark('barrier');
  }

  private launchSend(
    mod: Module,
    x: DeviceTensor,
    scales: DeviceTensor | undefined,
    topk: DeviceTensor | undefined,
    weights: DeviceTensor | undefined,
    sendPos: DeviceTensor,
    rankPrefix: DeviceTensor,
    T: number,
  ): void {
    mod
      .kernel('tsep_dispatch_send', [
        'ptr',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'i64',
        'i64',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'u64',
        'u64',
        'u64',
        'u64',
        'u64',
      ])
      .launch({ grid: this.numSms, block: SEND_THREADS, stream: this.rt.stream }, [
        this.sym.peerTable.ptr,
        this.me,
        T,
        x.ptr,
        scales?.ptr ?? 0n,
        scales?.strides[0] ?? 0,
        scales?.strides[1] ?? 0,
        topk?.ptr ?? 0n,
        weights?.ptr ?? 0n,
        sendPos.ptr,
        rankPrefix.ptr,
        ...this.areaArgs(),
      ]);
    this.rt.mark('send');
  }

  combine(req: CombineRequest): Promise<CombineResult> {
    return this.serial(() => this.runCombine(req));
  }

  private async runCombine(req: CombineRequest): Promise<CombineResult> {
    this.check();
    const rt = this.rt;
    const h = req.handle as GpuDispatchHandle;
    const x = rt.onDevice('x', req.x);
    if (!x.isContiguous())
      throw new ValidationError('x', 'a strided tensor', 'a row-major contiguous tensor');
    const weights = req.topkWeights ? rt.onDevice('topkWeights', req.topkWeights) : undefined;
    const bias = req.bias.map((b, i) => rt.onDevice(`bias[${i}]`, b));
    const recvSrcIdx = rt.onDevice('handle.recvSrcIdx', h.recvSrcIdx);
    const rankPrefix = rt.onDevice('handle.rankPrefixMatrix', h.rankPrefixMatrix);
    const isTokenInRank = rt.onDevice('handle.isTokenInRank', h.isTokenInRank);
    const K = weights ? weights.shape[1]! : 0;
    const mod = await this.module(this.defines(2, 0, K, false, weights !== undefined));
    const T = h.numTokens;
    const H = rt.options.hidden;
    const stream = rt.stream;
    rt.after(req.previousEvent);
    rt.markStart();
    this.launchPrepare(mod, 1);
    mod
      .kernel('tsep_combine_send', [
        'ptr',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'u64',
        'u64',
        'u64',
        'u64',
        'u64',
      ])
      .launch({ grid: this.numSms, block: SEND_THREADS, stream }, [
        this.sym.peerTable.ptr,
        this.me,
        x.ptr,
        recvSrcIdx.ptr,
        rankPrefix.ptr,
        weights?.ptr ?? 0n,
        ...this.areaArgs(),
      ]);
    this.rt.mark('combine send');
    const combinedX = DeviceTensor.emptyOn('bf16', [T, H], stream);
    const combinedW = weights ? DeviceTensor.emptyOn('f32', [T, K], stream) : undefined;
    mod
      .kernel('tsep_combine_reduce', [
        'ptr',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'u64',
        'u64',
        'u64',
        'u64',
        'u64',
        'u64',
        'ptr',
      ])
      .launch({ grid: rt.smCount, block: 512, stream }, [
        this.sym.peerTable.ptr,
        this.me,
        T,
        isTokenInRank.ptr,
        bias[0]?.ptr ?? 0n,
        bias[1]?.ptr ?? 0n,
        combinedX.ptr,
        combinedW?.ptr ?? 0n,
        ...this.areaArgs(),
        this.timeoutNs,
        this.errorPtr,
      ]);
    this.rt.mark('reduce');
    return {
      combinedX,
      ...(combinedW ? { combinedTopkWeights: combinedW } : {}),
      event: rt.record({ check: this.check }),
    };
  }

  async destroy(): Promise<void> {
    await this.queue;
    await this.rt.stream.synchronize();
    await this.sym.destroy();
  }
}
