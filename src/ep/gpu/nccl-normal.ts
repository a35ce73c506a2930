// The normal mode over NCCL, for GPUs without peer access to each other and (later) across hosts. Same
// semantics and outputs as the NVLink path; the data moves with NCCL point-to-point transfers instead of
// peer stores:
//   dispatch: counts all-gathered with NCCL and copied to pinned memory; the send kernel packs each
//   token's row once per destination into a local staging region per destination, in token order; the host
//   reads the counts (an event, no blocking), allocates exact-size outputs, and one NCCL group sends every
//   staging block to its rank and receives every source's block straight into the outputs at the source's
//   offset — which is the final order (source rank, then source token).
//   combine: each source's rows go back as one block; the owner receives rank r's block at its own offset
//   and the reduce kernel finds token t's row at offset(r) + sendPos[t][r].
// Cached dispatch reuses the handle's positions and host counts (no host wait). Worst-case mode is not
// available over NCCL yet (its counts are only on the device).

import { DeviceTensor } from '../../device/device-tensor.ts';
import { DeviceBuffer, HostBuffer } from '../../device/memory.ts';
import type { Kernel } from '../../device/module.ts';
import { NcclCommunicator } from '../../dist/nccl-comm.ts';
import { TsepError, ValidationError } from '../../errors.ts';
import type {
  CombineRequest,
  CombineResult,
  DispatchLayout,
  DispatchRequest,
  DispatchResult,
  Tensor,
} from '../types.ts';
import { deviceTimeoutNs } from './device-error.ts';
import { checkNormalShape, type GpuDispatchHandle } from './normal.ts';
import {
  CallQueue,
  DEFAULT_NORMAL_SMS,
  type DispatchInputs,
  dispatchInputs,
  dispatchOutputs,
  launchLayout,
  loadLayoutKernels,
  NormalModules,
} from './normal-kernels.ts';
import { ERROR_RECORD, type NormalAreas, normalAreas, SIGNAL_BYTES } from './normal-layout.ts';
import type { GpuRuntime } from './runtime.ts';

/** What the host knows of a dispatch's routing over NCCL: rows per peer, both ways. */
export interface NcclCounts {
  /** Rows this rank sends to each rank (its tokens for that rank). */
  send: readonly number[];
  /** Rows this rank receives from each rank. */
  recv: readonly number[];
}

export interface NcclDispatchHandle extends GpuDispatchHandle {
  readonly counts: NcclCounts;
  /** [R] i32 on the device: first stage row of each rank's block in a combine (exclusive prefix of send). */
  readonly sendOffsets: DeviceTensor;
}

const prefix = (v: readonly number[]): number[] => {
  const out: number[] = [];
  let acc = 0;
  for (const x of v) {
    out.push(acc);
    acc += x;
  }
  return out;
};

/** The parts of a dispatch's arguments that decide which transfers it makes, as one int32. */
function payloadShape(inp: DispatchInputs): number {
  return (
    (inp.elt === 1 ? 1 : 0) |
    (inp.scaleWords << 1) | // < 1024
    ((inp.scales?.dtype === 'i32' ? 1 : 0) << 11) |
    (inp.K << 12) | // ≤ 32
    ((inp.topk?.dtype === 'i64' ? 1 : 0) << 18) |
    ((inp.weights ? 1 : 0) << 19)
  );
}

function describeShape(v: number): string {
  const sw = (v >> 1) & 0x3ff;
  const scales = sw ? `${sw} ${(v >> 11) & 1 ? 'UE8M0' : 'f32'} scale words` : 'no scales';
  const ids = `top-k ${(v >> 12) & 0x3f}${(v >> 18) & 1 ? ' (i64)' : ''}`;
  return `${v & 1 ? 'fp8' : 'bf16'} x, ${scales}, ${ids}, ${(v >> 19) & 1 ? 'weights' : 'no weights'}`;
}

export class NcclNormalPath {
  private readonly rt: GpuRuntime;
  private comm: NcclCommunicator;
  private readonly layoutKernels: Record<'i32' | 'i64', Kernel>;
  private readonly modules: NormalModules;
  private readonly queue = new CallQueue();
  private readonly timeoutNs = deviceTimeoutNs();
  /** R staging regions (one per destination, T_max rows each, the normal buffer layout with 1 source). */
  private readonly staging: DeviceBuffer;
  private readonly stagingAreas: NormalAreas;
  /** u64[R]: base of staging region r, as the send kernel's "peer" table. */
  private readonly stagingTable: DeviceBuffer;
  /** The combine stage: R·T_max rows; `stageTable` is u64[R] all pointing at it (the reduce reads [0]). */
  private readonly stage: DeviceBuffer;
  private readonly stageAreas: NormalAreas;
  private readonly stageTable: DeviceBuffer;
  /** This rank's [perRank | perExpert] counts, all ranks' after the all-gather, and a pinned copy. */
  private readonly counts: DeviceBuffer;
  private readonly allCounts: DeviceBuffer;
  private readonly hostCounts: HostBuffer;
  /** Error record and scratch for kernels that expect a signal page. */
  private readonly signal: HostBuffer;
  numSms = Number(process.env.TSEP_NORMAL_SMS ?? DEFAULT_NORMAL_SMS);

  private constructor(rt: GpuRuntime, comm: NcclCommunicator, layout: Record<'i32' | 'i64', Kernel>) {
    this.rt = rt;
    this.comm = comm;
    this.layoutKernels = layout;
    this.modules = new NormalModules(rt);
    const { maxTokensPerRank: T, hidden: H, numTopk: K, numExperts: E } = rt.options;
    const R = rt.group.size;
    const dev = rt.device;
    this.stagingAreas = normalAreas(1, T, H, K);
    this.staging = DeviceBuffer.alloc(R * this.stagingAreas.bytes, dev);
    this.staging.fill(0); // zero control blocks: the send kernel counts its blocks there, unread
    this.stagingTable = DeviceBuffer.alloc(8 * R, dev);
    this.stagingTable.copyFromHost(
      BigUint64Array.from({ length: R }, (_, r) => this.staging.ptr + BigInt(r * this.stagingAreas.bytes)),
    );
    this.stageAreas = normalAreas(R, T, H, K);
    this.stage = DeviceBuffer.alloc(this.stageAreas.bytes, dev);
    this.stage.fill(0); // zero control block: the reduce kernel's arrival wait passes at once
    this.stageTable = DeviceBuffer.alloc(8 * R, dev);
    this.stageTable.copyFromHost(BigUint64Array.from({ length: R }, () => this.stage.ptr));
    this.counts = DeviceBuffer.alloc(4 * (R + E + 1), dev);
    this.allCounts = DeviceBuffer.alloc(4 * R * (R + E + 1), dev);
    this.hostCounts = HostBuffer.alloc(4 * R * (R + E + 1), dev);
    this.signal = HostBuffer.alloc(SIGNAL_BYTES, dev);
  }

  static async create(rt: GpuRuntime): Promise<NcclNormalPath> {
    checkNormalShape(rt);
    const layout = await loadLayoutKernels(rt);
    const comm = await NcclCommunicator.create(rt.group, rt.device);
    return new NcclNormalPath(rt, comm, layout);
  }

  /** Bytes of communication memory per rank (staging and stage). */
  bytes(): number {
    return this.staging.bytes + this.stage.bytes;
  }

  private get R(): number {
    return this.rt.group.size;
  }

  private get errorPtr(): bigint {
    return this.signal.devicePtr + BigInt(ERROR_RECORD);
  }

  layout(topkIdx: Tensor): DispatchLayout {
    return launchLayout(this.rt, this.layoutKernels, topkIdx);
  }

  /** Nothing device-side to clear: NCCL calls carry no state between calls. */
  /**
   * Collective: after a failure (a timed-out wait, a peer that died), aborts the communicator — which
   * ends any NCCL kernel still waiting for a peer — and joins a new one. Queued like a call.
   */
  reset(): Promise<void> {
    return this.queue.run(async () => {
      this.comm.abort();
      await this.rt.stream.synchronize({ timeoutMs: Number(this.timeoutNs / 1_000_000n) + 5000 });
      this.comm = await NcclCommunicator.create(this.rt.group, this.rt.device);
    });
  }

  dispatch(req: DispatchRequest): Promise<DispatchResult> {
    return this.queue.run(() => this.runDispatch(req));
  }

  private async runDispatch(req: DispatchRequest): Promise<DispatchResult> {
    const rt = this.rt;
    const R = this.R;
    const me = rt.group.rank;
    const E = rt.options.numExperts;
    const EL = E / R;
    const stream = rt.stream;
    const fresh = req.kind === 'fresh';
    if ((fresh ? req.worstCaseTokens : req.handle.worstCaseTokens) > 0) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        "worstCaseTokens is not available with transport 'nccl' yet; use transport 'nvlink' or exact-size dispatch.",
      );
    }
    const inp = dispatchInputs(rt, req);
    const kernels = await this.modules.get({
      elt: inp.elt,
      scaleWords: inp.scaleWords,
      K: inp.K,
      idx64: inp.topk?.dtype === 'i64',
      weights: inp.weights !== undefined,
    });
    rt.after(req.previousEvent);
    rt.markStart();
    let counts: NcclCounts;
    let sendPos: DeviceTensor;
    let isTokenInRank: DeviceTensor;
    let perExpert: number[];
    let alignment: number;
    let rankPrefix: number[] = [];
    let fromHandle: NcclDispatchHandle | undefined;
    if (fresh) {
      alignment = req.expertAlignment;
      isTokenInRank = rt.onDevice('layout.isTokenInRank', req.layout.isTokenInRank);
      const perRank = rt.onDevice('layout.numTokensPerRank', req.layout.numTokensPerRank);
      const perExpertDev = rt.onDevice('layout.numTokensPerExpert', req.layout.numTokensPerExpert);
      DeviceBuffer.copyAsync(this.counts.ptr, perRank.ptr, 4 * R, stream);
      DeviceBuffer.copyAsync(this.counts.ptr + BigInt(4 * R), perExpertDev.ptr, 4 * E, stream);
      // The call's shape travels with the counts: NCCL pairs every send with a receive, so ranks that pass
      // different optional tensors must fail together here, before any transfer.
      const shape = payloadShape(inp);
      this.counts.copyFromHostAsync(Int32Array.of(shape), stream, 4 * (R + E));
      this.comm.allGather(this.counts.ptr, this.allCounts.ptr, R + E + 1, 'i32', stream);
      const pinned = new Int32Array(this.hostCounts.arrayBuffer, 0, R * (R + E + 1));
      this.allCounts.copyToHostAsync(pinned, stream);
      const countsRead = rt.record();
      rt.mark('counts');
      // Blocks 0..R-1 of notify only: number this rank's tokens per destination (no NVLink exchange).
      sendPos = DeviceTensor.emptyOn('i32', [inp.T, R], stream);
      kernels.notify(stream, R, {
        peers: this.stagingTable.ptr,
        me: 0,
        T: inp.T,
        inRank: isTokenInRank.ptr,
        perRank: perRank.ptr,
        perExpert: perExpertDev.ptr,
        rankPrefix: 0n,
        sendPos: sendPos.ptr,
        recvCount: 0n,
        host: this.signal.devicePtr,
        seq: 0,
        alignment,
        sendBlocks: this.numSms,
        timeoutNs: this.timeoutNs,
        err: this.errorPtr,
      });
      rt.mark('positions');
      this.pack(kernels, inp, sendPos);
      // Bounded: a missing or dead peer leaves the all-gather waiting; then abort it, so the stream moves
      // on, and report (reset() joins a new communicator).
      try {
        await countsRead.cuda.synchronize({
          timeoutMs: Number(this.timeoutNs / 1_000_000n),
          what: `the dispatch counts all-gather over NCCL (rank ${rt.group.rank})`,
        });
        this.comm.checkAsyncError();
      } catch (e) {
        this.comm.abort();
        throw e;
      }
      const row = (src: number) => pinned.subarray(src * (R + E + 1), (src + 1) * (R + E + 1));
      const other = Array.from({ length: R }, (_, s) => s).find((s) => row(s)[R + E] !== shape);
      if (other !== undefined) {
        throw new ValidationError(
          'dispatch arguments',
          `${describeShape(shape)} on rank ${me} but ${describeShape(row(other)[R + E]!)} on rank ${other}`,
          'the same payload type, scales, top-k width, index type and weights on every rank',
        );
      }
      counts = {
        send: Array.from(row(me).subarray(0, R)),
        recv: Array.from({ length: R }, (_, s) => row(s)[me]!),
      };
      // [i][j] = Σ_{i' ≤ i} tokens rank i' sends to rank j: every rank's counts arrived with the all-gather.
      rankPrefix = Array.from({ length: R * R }, (_, k) => {
        const [i, j] = [Math.floor(k / R), k % R];
        let acc = 0;
        for (let s = 0; s <= i; s++) acc += row(s)[j]!;
        return acc;
      });
      perExpert = Array.from({ length: EL }, (_, e) => {
        let c = 0;
        for (let s = 0; s < R; s++) c += row(s)[R + me * EL + e]!;
        return Math.ceil(c / alignment) * alignment;
      });
    } else {
      fromHandle = req.handle as NcclDispatchHandle;
      if (!('counts' in fromHandle)) {
        throw new ValidationError(
          'handle',
          'a handle from the NVLink transport',
          "a handle from this buffer's NCCL transport",
        );
      }
      alignment = fromHandle.expertAlignment;
      isTokenInRank = rt.onDevice('handle.isTokenInRank', fromHandle.isTokenInRank);
      sendPos = fromHandle.sendPos;
      counts = fromHandle.counts;
      perExpert = [...fromHandle.numRecvTokensPerExpert];
      this.pack(kernels, inp, sendPos);
    }
    const rows = counts.recv.reduce((a, b) => a + b, 0);
    const out = dispatchOutputs(inp, rows, rt.options.hidden, stream);
    // The handle's small tensors are uploaded before the exchange is enqueued, so the (possibly staged)
    // host copies never wait behind a transfer that needs the peers.
    const rankPrefixDev = fromHandle ? undefined : this.upload('i32', [R, R], rankPrefix);
    const recvCountDev = fromHandle ? undefined : this.upload('i32', [1], [rows]);
    const sendOffsets = fromHandle ? undefined : this.upload('i32', [R], prefix(counts.send));
    const handle: NcclDispatchHandle = fromHandle ?? {
      kind: 'dispatch',
      owner: rt.owner,
      numTokens: inp.T,
      numRecvRows: rows,
      worstCaseTokens: 0,
      expertAlignment: alignment,
      numRecvTokensPerExpert: perExpert,
      isTokenInRank,
      rankPrefixMatrix: rankPrefixDev!,
      recvSrcIdx: out.recvSrcIdx,
      sendPos,
      recvCount: recvCountDev!,
      counts,
      sendOffsets: sendOffsets!,
      // The layout's isTokenInRank stays the caller's; the rest was allocated for this handle.
      dispose: () => {
        for (const t of [rankPrefixDev!, out.recvSrcIdx, sendPos, recvCountDev!, sendOffsets!]) t.dispose();
      },
    };
    this.exchangeDispatch(inp, counts, out);
    rt.mark('nccl');
    // A cached dispatch keeps its handle's source indices; the fresh copy is not needed (stream-ordered free).
    if (fromHandle) out.recvSrcIdx.dispose();
    return {
      recvX: out.recvX,
      numRecvTokensPerExpert: perExpert,
      handle,
      event: rt.record({ check: () => this.comm.checkAsyncError() }),
      ...(out.recvScales ? { recvScales: out.recvScales } : {}),
      ...(out.recvTopkIdx ? { recvTopkIdx: out.recvTopkIdx } : {}),
      ...(out.recvTopkWeights ? { recvTopkWeights: out.recvTopkWeights } : {}),
    };
  }

  /** The send kernel with the staging regions as its destinations (me = 0: row = position). */
  private pack(
    kernels: Awaited<ReturnType<NormalModules['get']>>,
    inp: DispatchInputs,
    sendPos: DeviceTensor,
  ): void {
    kernels.send(this.rt.stream, this.numSms, {
      peers: this.stagingTable.ptr,
      me: 0,
      inp,
      sendPos: sendPos.ptr,
      rankPrefix: 0n,
      areas: this.stagingAreas,
      err: this.errorPtr,
    });
    this.rt.mark('pack');
  }

  /** Every staging block to its rank, every source's block into the outputs at the source's offset. */
  private exchangeDispatch(
    inp: DispatchInputs,
    counts: NcclCounts,
    out: ReturnType<typeof dispatchOutputs>,
  ): void {
    const a = this.stagingAreas;
    const recvAt = prefix(counts.recv);
    const rowBytes: [number, keyof NormalAreas, DeviceTensor | undefined][] = [
      [this.rt.options.hidden * inp.elt, 'x', out.recvX],
      [inp.scaleWords * 4, 'scales', out.recvScales],
      [4, 'srcIdx', out.recvSrcIdx],
      [inp.K * (inp.topk?.dtype === 'i64' ? 8 : 4), 'topk', out.recvTopkIdx],
      [inp.K * 4, 'weights', out.recvTopkWeights],
    ];
    const transfers = [];
    for (const [bytes, area, dst] of rowBytes) {
      if (!dst || bytes === 0) continue;
      for (let r = 0; r < this.R; r++) {
        transfers.push({
          peer: r,
          send: this.staging.ptr + BigInt(r * a.bytes + a[area]),
          sendBytes: counts.send[r]! * bytes,
          recv: dst.ptr + BigInt(recvAt[r]! * bytes),
          recvBytes: counts.recv[r]! * bytes,
        });
      }
    }
    this.comm.exchange(transfers, this.rt.stream);
  }

  private upload(dtype: 'i32', shape: number[], values: readonly number[]): DeviceTensor {
    const t = DeviceTensor.emptyOn(dtype, shape, this.rt.stream);
    t.owner!.copyFromHostAsync(Int32Array.from(values), this.rt.stream);
    return t;
  }

  combine(req: CombineRequest): Promise<CombineResult> {
    return this.queue.run(() => this.runCombine(req));
  }

  private async runCombine(req: CombineRequest): Promise<CombineResult> {
    const rt = this.rt;
    const h = req.handle as NcclDispatchHandle;
    if (!('counts' in h)) {
      throw new ValidationError(
        'handle',
        'a handle from the NVLink transport',
        "a handle from this buffer's NCCL transport",
      );
    }
    const x = rt.onDevice('x', req.x);
    const weights = req.topkWeights ? rt.onDevice('topkWeights', req.topkWeights) : undefined;
    const bias = req.bias.map((b, i) => rt.onDevice(`bias[${i}]`, b));
    const K = weights ? weights.shape[1]! : 0;
    const kernels = await this.modules.get({
      elt: 2,
      scaleWords: 0,
      K,
      idx64: false,
      weights: weights !== undefined,
    });
    const T = h.numTokens;
    const H = rt.options.hidden;
    const stream = rt.stream;
    rt.after(req.previousEvent);
    rt.markStart();
    // Rows received from source s sit at [prefix(recv)[s], +recv[s]) of x, in s's token order: send them
    // back as one block; rank r's block lands at prefix(send)[r] of the stage.
    const fromAt = prefix(h.counts.recv);
    const toAt = prefix(h.counts.send);
    const a = this.stageAreas;
    const transfers = [];
    for (const [bytes, src, area] of [
      [H * 2, x, 'x'],
      [K * 4, weights, 'weights'],
    ] as const) {
      if (!src || bytes === 0) continue;
      for (let r = 0; r < this.R; r++) {
        transfers.push({
          peer: r,
          send: src.ptr + BigInt(fromAt[r]! * bytes),
          sendBytes: h.counts.recv[r]! * bytes,
          recv: this.stage.ptr + BigInt(a[area] + toAt[r]! * bytes),
          recvBytes: h.counts.send[r]! * bytes,
        });
      }
    }
    this.comm.exchange(transfers, stream);
    rt.mark('nccl');
    const combinedX = DeviceTensor.emptyOn('bf16', [T, H], stream);
    const combinedW = weights ? DeviceTensor.emptyOn('f32', [T, K], stream) : undefined;
    kernels.reduce(stream, rt.smCount, {
      peers: this.stageTable.ptr,
      me: 0,
      T,
      inRank: rt.onDevice('handle.isTokenInRank', h.isTokenInRank).ptr,
      bias,
      out: combinedX.ptr,
      outWeights: combinedW?.ptr ?? 0n,
      sendPos: h.sendPos.ptr,
      rowBase: h.sendOffsets.ptr,
      areas: this.stageAreas,
      timeoutNs: this.timeoutNs,
      err: this.errorPtr,
    });
    rt.mark('reduce');
    return {
      combinedX,
      ...(combinedW ? { combinedTopkWeights: combinedW } : {}),
      event: rt.record({ check: () => this.comm.checkAsyncError() }),
    };
  }

  async destroy(): Promise<void> {
    await this.queue.idle();
    await this.rt.stream.synchronize();
    this.comm.destroy();
    for (const b of [
      this.staging,
      this.stagingTable,
      this.stage,
      this.stageTable,
      this.counts,
      this.allCounts,
    ])
      b.dispose();
    this.hostCounts.dispose();
    this.signal.dispose();
  }
}
