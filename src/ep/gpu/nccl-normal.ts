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
// Cached dispatch reuses the handle's positions and host counts (no host wait). The worst-case mode keeps
// the counts on the device: every block travels padded to T_max rows, and small kernels pack and unpack
// the padding (no host wait, capturable in a graph).

import { DeviceTensor } from '../../device/device-tensor.ts';
import { DeviceBuffer, HostBuffer } from '../../device/memory.ts';
import { HostTensor } from '../../device/tensor.ts';
import { NcclCommunicator } from '../../dist/nccl-comm.ts';
import { ValidationError } from '../../errors.ts';
import type {
  CombineRequest,
  CombineResult,
  DispatchLayout,
  DispatchRequest,
  DispatchResult,
  Tensor,
} from '../types.ts';
import { deviceTimeoutNs, hostWaitMs } from './device-error.ts';
import type { GpuEvent } from './event.ts';
import { checkNormalShape, type GpuDispatchHandle } from './normal.ts';
import {
  CallQueue,
  checkSamePayload,
  type DispatchInputs,
  type DispatchOutputs,
  dispatchInputs,
  dispatchOutputs,
  exclusivePrefix,
  type FailArgs,
  type LayoutKernels,
  launchLayout,
  launchMoveBlocks,
  launchNcclCounts,
  loadLayoutKernels,
  type NormalKernels,
  NormalModules,
  normalSms,
  payloadShape,
  readCountRows,
  uploadI32,
} from './normal-kernels.ts';
import { CTRL_ABORT, ERROR_RECORD, type NormalAreas, normalAreas, SIGNAL_BYTES } from './normal-layout.ts';
import type { GpuRuntime } from './runtime.ts';

/** What the host knows of a dispatch's routing over NCCL: rows per peer, both ways. */
export interface NcclCounts {
  /** Rows this rank sends to each rank (its tokens for that rank). */
  send: readonly number[];
  /** Rows this rank receives from each rank. */
  recv: readonly number[];
}

export interface NcclDispatchHandle extends GpuDispatchHandle {
  readonly transport: 'nccl';
  /** Exact-size dispatch: rows per peer, known on the host. */
  readonly counts?: NcclCounts;
  /** Worst-case dispatch: rows received from each rank, known on the device only ([R] i32). */
  readonly recvFrom?: DeviceTensor;
  /** [R] i32: first stage row of each rank's block in a combine (exact: prefix of send; worst: r·T_max). */
  readonly sendOffsets: DeviceTensor;
}

export class NcclNormalPath {
  private readonly rt: GpuRuntime;
  private comm: NcclCommunicator;
  private readonly layoutKernels: LayoutKernels;
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
  /** The error record, and the stage's control block for the abort word (no kernel here waits on a peer). */
  private readonly fail: FailArgs;
  /** [R] i32 = r·T_max: where each rank's padded block starts in the stage (worst-case mode). */
  private readonly paddedOffsets: DeviceTensor;
  numSms = normalSms();

  private constructor(rt: GpuRuntime, comm: NcclCommunicator, layout: LayoutKernels) {
    this.rt = rt;
    this.comm = comm;
    this.layoutKernels = layout;
    this.modules = new NormalModules(rt);
    const { maxTokensPerRank: T, hidden: H, numTopk: K, numExperts: E } = rt.options;
    const R = rt.group.size;
    const dev = rt.device;
    this.stagingAreas = normalAreas(1, T, H, K);
    this.staging = DeviceBuffer.alloc(R * this.stagingAreas.bytes, dev);
    this.staging.fill(0); // once: the padding rows that travel with every block are zeros, not stale memory
    this.stagingTable = DeviceBuffer.alloc(8 * R, dev);
    this.stagingTable.copyFromHost(
      BigUint64Array.from({ length: R }, (_, r) => this.staging.ptr + BigInt(r * this.stagingAreas.bytes)),
    );
    this.stageAreas = normalAreas(R, T, H, K);
    this.stage = DeviceBuffer.alloc(this.stageAreas.bytes, dev);
    this.stage.fill(0); // its control block holds the abort word this path's kernels check
    this.stageTable = DeviceBuffer.alloc(8 * R, dev);
    this.stageTable.copyFromHost(BigUint64Array.from({ length: R }, () => this.stage.ptr));
    this.counts = DeviceBuffer.alloc(4 * (R + E + 1), dev);
    this.allCounts = DeviceBuffer.alloc(4 * R * (R + E + 1), dev);
    this.hostCounts = HostBuffer.alloc(4 * R * (R + E + 1), dev);
    this.signal = HostBuffer.alloc(SIGNAL_BYTES, dev);
    this.fail = {
      err: this.signal.devicePtr + BigInt(ERROR_RECORD),
      abort: this.stage.ptr + BigInt(CTRL_ABORT),
    };
    this.paddedOffsets = DeviceTensor.fromHost(
      HostTensor.from(
        'i32',
        [R],
        Int32Array.from({ length: R }, (_, r) => r * T),
      ),
      dev,
    );
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

  layout(topkIdx: Tensor): DispatchLayout {
    return launchLayout(this.rt, this.layoutKernels, topkIdx);
  }

  /** Ends any NCCL transfer still waiting for a peer: aborts the communicator (reset() joins a new one). */
  abortTransfers(): void {
    this.comm.abort();
  }

  /**
   * Collective: after a failure (a timed-out wait, a peer that died), aborts the communicator — which
   * ends any NCCL kernel still waiting for a peer — and joins a new one. Queued like a call.
   */
  reset(): Promise<void> {
    return this.queue.run(async () => {
      this.abortTransfers();
      await this.rt.stream.synchronize({ timeoutMs: hostWaitMs(this.timeoutNs) });
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
    const worst = fresh ? req.worstCaseTokens : req.handle.worstCaseTokens;
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
    let sendPos: DeviceTensor;
    let isTokenInRank: DeviceTensor;
    let alignment: number;
    let perExpert: number[] = [];
    let counts: NcclCounts | undefined;
    let created:
      | {
          rankPrefix: DeviceTensor;
          recvCount: DeviceTensor;
          recvFrom?: DeviceTensor;
          sendOffsets?: DeviceTensor;
        }
      | undefined;
    let fromHandle: NcclDispatchHandle | undefined;
    if (fresh) {
      alignment = req.expertAlignment;
      isTokenInRank = rt.onDevice('layout.isTokenInRank', req.layout.isTokenInRank);
      const perRank = rt.onDevice('layout.numTokensPerRank', req.layout.numTokensPerRank);
      const perExpertDev = rt.onDevice('layout.numTokensPerExpert', req.layout.numTokensPerExpert);
      DeviceBuffer.copyAsync(this.counts.ptr, perRank.ptr, 4 * R, stream);
      DeviceBuffer.copyAsync(this.counts.ptr + BigInt(4 * R), perExpertDev.ptr, 4 * E, stream);
      // The call's shape travels with the counts: NCCL pairs every send with a receive, so ranks that pass
      // different optional tensors must fail together here, before any transfer (exact-size mode; the
      // worst-case mode never reads the counts on the host).
      const shape = payloadShape(inp);
      // A memset, not a host copy: it neither waits for the stream nor breaks a graph capture.
      this.counts.fill32(shape, stream, 4 * (R + E), 1);
      this.comm.allGather(this.counts.ptr, this.allCounts.ptr, R + E + 1, 'i32', stream);
      const pinned = new Int32Array(this.hostCounts.arrayBuffer, 0, R * (R + E + 1));
      const countsRead = worst === 0 ? this.readCounts(pinned) : undefined;
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
        timeoutNs: this.timeoutNs,
        fail: this.fail,
      });
      rt.mark('positions');
      this.pack(kernels, inp, sendPos);
      if (worst > 0) {
        created = {
          rankPrefix: DeviceTensor.emptyOn('i32', [R, R], stream),
          recvCount: DeviceTensor.emptyOn('i32', [1], stream),
          recvFrom: DeviceTensor.emptyOn('i32', [R], stream),
        };
        launchNcclCounts(kernels, stream, {
          all: this.allCounts.ptr,
          stride: R + E + 1,
          me,
          rankPrefix: created.rankPrefix.ptr,
          recvCount: created.recvCount.ptr,
          recvFrom: created.recvFrom!.ptr,
        });
      } else {
        // Bounded: a missing or dead peer leaves the all-gather waiting; then abort it, so the stream moves
        // on, and report (reset() joins a new communicator).
        try {
          await countsRead!.cuda.synchronize({
            timeoutMs: Number(this.timeoutNs / 1_000_000n),
            what: `the dispatch counts all-gather over NCCL (rank ${rt.group.rank})`,
          });
          this.comm.checkAsyncError();
        } catch (e) {
          this.comm.abort();
          throw e;
        }
        const rows = Array.from({ length: R }, (_, s) =>
          pinned.subarray(s * (R + E + 1), (s + 1) * (R + E + 1)),
        );
        checkSamePayload(rows, R + E, shape, me);
        const read = readCountRows(rows, me, EL, R, alignment);
        counts = { send: Array.from(rows[me]!.subarray(0, R)), recv: read.recv };
        perExpert = read.perExpert;
        // Uploaded before the exchange is enqueued, so the (possibly staged) host copies never wait behind
        // a transfer that needs the peers.
        created = {
          rankPrefix: uploadI32(rt, [R, R], read.rankPrefix),
          recvCount: uploadI32(rt, [1], [counts.recv.reduce((x, y) => x + y, 0)]),
          sendOffsets: uploadI32(rt, [R], exclusivePrefix(counts.send)),
        };
      }
    } else {
      fromHandle = req.handle as NcclDispatchHandle;
      if (fromHandle.transport !== 'nccl') {
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
    const rows = worst > 0 ? worst : counts!.recv.reduce((x, y) => x + y, 0);
    const out = dispatchOutputs(inp, rows, rt.options.hidden, stream, fresh);
    const recvFrom = fromHandle?.recvFrom ?? created?.recvFrom;
    if (worst > 0) this.exchangeDispatchPadded(kernels, inp, recvFrom!, out, rows);
    else this.exchangeDispatch(inp, counts!, out);
    rt.mark('nccl');
    let handle: NcclDispatchHandle;
    if (fromHandle) {
      handle = fromHandle; // it has the source indices; this call made none
    } else {
      const c = created!;
      const recvSrcIdx = out.recvSrcIdx!;
      const own = [
        c.rankPrefix,
        c.recvCount,
        recvSrcIdx,
        sendPos,
        ...(c.recvFrom ? [c.recvFrom] : []),
        ...(c.sendOffsets ? [c.sendOffsets] : []),
      ];
      handle = {
        kind: 'dispatch',
        transport: 'nccl',
        owner: rt.owner,
        numTokens: inp.T,
        numRecvRows: rows,
        worstCaseTokens: worst,
        expertAlignment: alignment,
        numRecvTokensPerExpert: perExpert,
        isTokenInRank,
        rankPrefixMatrix: c.rankPrefix,
        recvSrcIdx,
        sendPos,
        recvCount: c.recvCount,
        ...(counts ? { counts } : {}),
        ...(c.recvFrom ? { recvFrom: c.recvFrom } : {}),
        sendOffsets: c.sendOffsets ?? this.paddedOffsets,
        // The layout's isTokenInRank and the shared padded offsets are not the handle's to free.
        dispose: () => {
          for (const t of own) t.dispose();
        },
      };
    }
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

  /** Copies the all-gathered counts to pinned memory; the event says when the host may read them. */
  private readCounts(pinned: Int32Array): GpuEvent {
    this.allCounts.copyToHostAsync(pinned, this.rt.stream);
    return this.rt.record();
  }

  /** The arrays a dispatch moves: bytes per row, staging/stage area, output tensor, fill of unused rows. */
  private dispatchArrays(inp: DispatchInputs, out: DispatchOutputs) {
    return (
      [
        [this.rt.options.hidden * inp.elt, 'x', out.recvX, 0],
        [inp.scaleWords * 4, 'scales', out.recvScales, 0],
        [4, 'srcIdx', out.recvSrcIdx, 0xff],
        [inp.K * (inp.topk?.dtype === 'i64' ? 8 : 4), 'topk', out.recvTopkIdx, 0xff],
        [inp.K * 4, 'weights', out.recvTopkWeights, 0],
      ] as [number, keyof NormalAreas, DeviceTensor | undefined, number][]
    ).filter(([bytes, , dst]) => dst !== undefined && bytes > 0) as [
      number,
      keyof NormalAreas,
      DeviceTensor,
      number,
    ][];
  }

  /**
   * Worst-case mode: every staging region travels whole (T_max rows) into the stage at r·T_max, then the
   * used rows of each block are packed into the outputs and the rest filled (zeros, −1 ids).
   */
  private exchangeDispatchPadded(
    kernels: NormalKernels,
    inp: DispatchInputs,
    recvFrom: DeviceTensor,
    out: DispatchOutputs,
    rows: number,
  ): void {
    const T = this.rt.options.maxTokensPerRank;
    const arrays = this.dispatchArrays(inp, out);
    this.comm.exchange(
      arrays.flatMap(([bytes, area]) => this.paddedTransfers(area, bytes)),
      this.rt.stream,
    );
    for (const [bytes, area, dst, fill] of arrays) {
      launchMoveBlocks(kernels, this.rt.stream, this.rt.smCount, {
        count: recvFrom.ptr,
        gather: true,
        src: this.stage.ptr + BigInt(this.stageAreas[area]),
        dst: dst.ptr,
        blockStride: T * bytes,
        dstRows: rows,
        rowBytes: bytes,
        fill,
      });
    }
  }

  /**
   * Worst-case mode's transfers of one area (`bytes` per row): staging region r travels whole (T_max rows)
   * to rank r, whose region from this rank lands in the stage at r·T_max.
   */
  private paddedTransfers(area: keyof NormalAreas, bytes: number) {
    const T = this.rt.options.maxTokensPerRank;
    const a = this.stagingAreas;
    return Array.from({ length: this.R }, (_, r) => ({
      peer: r,
      send: this.staging.ptr + BigInt(r * a.bytes + a[area]),
      sendBytes: T * bytes,
      recv: this.stage.ptr + BigInt(this.stageAreas[area] + r * T * bytes),
      recvBytes: T * bytes,
    }));
  }

  /** The send kernel with the staging regions as its destinations (me = 0: row = position). */
  private pack(kernels: NormalKernels, inp: DispatchInputs, sendPos: DeviceTensor): void {
    kernels.send(this.rt.stream, this.numSms, {
      peers: this.stagingTable.ptr,
      me: 0,
      inp,
      sendPos: sendPos.ptr,
      rankPrefix: 0n,
      areas: this.stagingAreas,
      numChunks: this.rt.options.maxTokensPerRank, // one token per warp item: no announcements to pace
      fail: this.fail,
    });
    this.rt.mark('pack');
  }

  /** Every staging block to its rank, every source's block into the outputs at the source's offset. */
  private exchangeDispatch(inp: DispatchInputs, counts: NcclCounts, out: DispatchOutputs): void {
    const a = this.stagingAreas;
    const recvAt = exclusivePrefix(counts.recv);
    const transfers = [];
    for (const [bytes, area, dst] of this.dispatchArrays(inp, out)) {
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

  combine(req: CombineRequest): Promise<CombineResult> {
    return this.queue.run(() => this.runCombine(req));
  }

  private async runCombine(req: CombineRequest): Promise<CombineResult> {
    const rt = this.rt;
    const h = req.handle as NcclDispatchHandle;
    if (h.transport !== 'nccl') {
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
    const arrays = [
      [H * 2, x, 'x'],
      [K * 4, weights, 'weights'],
    ] as const;
    const transfers = [];
    if (h.counts) {
      // Rows received from source s sit at [prefix(recv)[s], +recv[s]) of x, in s's token order: send them
      // back as one block; rank r's block lands at prefix(send)[r] of the stage.
      const fromAt = exclusivePrefix(h.counts.recv);
      const toAt = exclusivePrefix(h.counts.send);
      for (const [bytes, src, area] of arrays) {
        if (!src || bytes === 0) continue;
        for (let r = 0; r < this.R; r++) {
          transfers.push({
            peer: r,
            send: src.ptr + BigInt(fromAt[r]! * bytes),
            sendBytes: h.counts.recv[r]! * bytes,
            recv: this.stage.ptr + BigInt(this.stageAreas[area] + toAt[r]! * bytes),
            recvBytes: h.counts.send[r]! * bytes,
          });
        }
      }
    } else {
      // Worst-case handle: the counts are on the device, so each source's rows are first spread into the
      // staging regions (padded to T_max rows), and every region travels whole into the stage at r·T_max.
      const a = this.stagingAreas;
      for (const [bytes, src, area] of arrays) {
        if (!src || bytes === 0) continue;
        launchMoveBlocks(kernels, stream, rt.smCount, {
          count: h.recvFrom!.ptr,
          gather: false,
          src: src.ptr,
          dst: this.staging.ptr + BigInt(a[area]),
          blockStride: a.bytes,
          dstRows: 0,
          rowBytes: bytes,
          fill: 0,
        });
        transfers.push(...this.paddedTransfers(area, bytes));
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
      rankPrefix: 0n, // no chunk waits: the stage has no chunk words (the rows came with NCCL)
      numChunks: 0,
      ownX: 0n, // every block, this rank's own too, is in the stage
      ownWeights: 0n,
      areas: this.stageAreas,
      timeoutNs: this.timeoutNs,
      fail: this.fail,
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
      this.layoutKernels.scratch,
    ])
      b.dispose();
    this.paddedOffsets.dispose();
    this.hostCounts.dispose();
    this.signal.dispose();
  }
}
