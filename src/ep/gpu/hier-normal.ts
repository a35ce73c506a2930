// The normal mode across hosts (transport 'nvshmem'; docs/multi-host.md "Normal mode over NVSHMEM"): the
// same semantics and outputs as the single-host paths, with each token crossing to another host once per
// destination host. Kernels in kernels/hier.cu, buffer layout in hier-layout.ts.
//
//   dispatch  route (positions per rank and per host, counts) → count exchange (NVSHMEM, every rank's row
//             to every rank) → pack (one record per token and destination host) → send (NVSHMEM put of
//             each other host's records to the rank with this local index there, the "proxy") → the host
//             reads the counts (exact sizes) → receive (each rank reads its rows from its host's proxies over
//             NVLink, in source-rank then token order) → barrier (every rank done: buffers reusable).
//   combine   the expert-side rows into the buffer → each proxy sums its host's rows per token (float32,
//             ascending rank) and puts one partial row per token and host to the token's rank → that rank
//             adds bias and the hosts' partials (ascending host), one bf16 rounding → barrier.
// The combine's float32 sums group the ranks by host, so a combined value may differ from the single-host
// order by the rounding of that regrouping (at most one bf16 ulp after the final rounding; weights by a
// float32 rounding). Cached dispatch reuses the handle's positions and count matrix (no host wait), and the
// worst-case-tokens mode never waits on the host (outputs of the worst-case size, counts from the device):
// both are capturable in a CUDA graph.

import { DeviceTensor } from '../../device/device-tensor.ts';
import { DeviceBuffer, HostBuffer } from '../../device/memory.ts';
import type { Kernel } from '../../device/module.ts';
import type {
  CombineRequest,
  CombineResult,
  DispatchLayout,
  DispatchRequest,
  DispatchResult,
  Tensor,
} from '../types.ts';
import { clearDeviceError, deviceTimeoutNs, hostWaitMs, throwIfDeviceError } from './device-error.ts';
import { countsFromMatrix, HIER_CTRL, type HierLayout, hierDefines, hierLayout } from './hier-layout.ts';
import type { GpuDispatchHandle } from './normal.ts';
import {
  CallQueue,
  checkSamePayload,
  type DispatchInputs,
  dispatchInputs,
  dispatchOutputs,
  type LayoutKernels,
  launchLayout,
  loadLayoutKernels,
  normalSms,
  padDispatchOutputs,
  payloadShape,
  uploadI32,
} from './normal-kernels.ts';
import { joinNvshmem, loadEngineModule, NvshmemSymmetric } from './nvshmem-engine.ts';
import type { GpuRuntime } from './runtime.ts';

function layoutOf({ group, options }: GpuRuntime): HierLayout {
  return hierLayout({
    numRanks: group.size,
    ranksPerHost: options.ranksPerHost,
    hidden: options.hidden,
    maxTokensPerRank: options.maxTokensPerRank,
    numTopk: options.numTopk,
    numExperts: options.numExperts,
  });
}

/** The error record's place in the buffer's host-mapped page. */
const ERROR_AT = 0;

export interface HierDispatchHandle extends GpuDispatchHandle {
  readonly transport: 'nvshmem';
  /** [T, NH] i32: position of each token among this rank's tokens for host h, -1 if not sent there. */
  readonly hostPos: DeviceTensor;
  /** [R, R + NH + E + 1] i32: every rank's count row of the call. */
  readonly matrix: DeviceTensor;
  /** [records, 1 + P] i32: for the records this rank was proxy of, source token and host positions. */
  readonly keep: DeviceTensor;
}

interface HierKernels {
  route: Kernel;
  counts: Kernel;
  pack: Kernel;
  send: Kernel;
  recv: Kernel;
  barrier: Kernel;
  mark: Kernel;
  partial: Kernel;
  reduce: Kernel;
}

export class HierNormalPath {
  private readonly rt: GpuRuntime;
  private readonly L: HierLayout;
  private readonly mem: NvshmemSymmetric;
  private readonly k: HierKernels;
  private readonly layoutKernels: LayoutKernels;
  private readonly queue = new CallQueue();
  private readonly timeoutNs = deviceTimeoutNs();
  private readonly hostWaitMs = hostWaitMs(this.timeoutNs);
  /** Pinned copy of the count matrix, read by the host for exact-size outputs. */
  private readonly hostMatrix: HostBuffer;
  /** This rank's symmetric buffer (its address is the symmetric address every kernel computes from). */
  private readonly base: bigint;
  /** The host's P entries of the peer table (direct addresses of the host's buffers, by local index). */
  private readonly hostPeers: bigint;
  /** The kernels' last two arguments: the error record and the wait bound. */
  private readonly failArgs: [bigint, bigint];
  numSms = normalSms();

  private constructor(
    rt: GpuRuntime,
    L: HierLayout,
    mem: NvshmemSymmetric,
    k: HierKernels,
    layoutKernels: LayoutKernels,
  ) {
    this.rt = rt;
    this.L = L;
    this.mem = mem;
    this.k = k;
    this.layoutKernels = layoutKernels;
    this.hostMatrix = HostBuffer.alloc(4 * L.numRanks * L.countWords, rt.device);
    this.base = mem.local.ptr;
    this.hostPeers = mem.peerTable.ptr + BigInt(8 * (rt.group.rank - (rt.group.rank % L.ranksPerHost)));
    this.failArgs = [mem.signal.devicePtr + BigInt(ERROR_AT), this.timeoutNs];
  }

  /** Bytes of the symmetric buffer this path needs in NVSHMEM's heap. */
  static heapBytes(rt: GpuRuntime): number {
    return layoutOf(rt).totalBytes;
  }

  /** Collective: joins NVSHMEM, compiles the kernels and allocates the symmetric buffer. */
  static async create(rt: GpuRuntime): Promise<HierNormalPath> {
    const { group, options } = rt;
    const L = layoutOf(rt);
    const layoutKernels = await loadLayoutKernels(rt);
    await joinNvshmem(group, rt.device, L.totalBytes);
    const mod = await loadEngineModule(rt.device, 'hier.cu', hierDefines(L));
    const rec = ['i32', 'i32', 'i32', 'i32'] as const; // struct Rec
    const fail = ['ptr', 'u64'] as const; // error record, timeout
    const k: HierKernels = {
      route: mod.kernel('hier_route', ['ptr', 'i32', 'ptr', 'ptr', 'ptr', 'i32', 'i32', 'ptr']),
      counts: mod.kernel('hier_counts', ['ptr', 'i32', ...fail]),
      pack: mod.kernel('hier_pack', [
        'ptr',
        'ptr',
        'i64',
        'i64',
        'ptr',
        'ptr',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'i32',
        ...rec,
      ]),
      send: mod.kernel('hier_send', ['ptr', 'i32', 'ptr']),
      recv: mod.kernel('hier_recv', [
        'ptr',
        'ptr',
        'i32',
        'ptr',
        ...rec,
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        ...fail,
      ]),
      barrier: mod.kernel('hier_barrier', ['ptr', 'ptr', 'i32', 'i32', ...fail]),
      mark: mod.kernel('hier_mark', ['ptr']),
      partial: mod.kernel('hier_partial', ['ptr', 'ptr', 'i32', 'ptr', 'ptr', 'i32', 'i32', ...fail]),
      reduce: mod.kernel('hier_reduce', [
        'ptr',
        'i32',
        'i32',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        ...fail,
      ]),
    };
    const mem = await NvshmemSymmetric.create(group, rt.device, L.totalBytes, options.ranksPerHost);
    return new HierNormalPath(rt, L, mem, k, layoutKernels);
  }

  /** Bytes of communication memory per rank (the symmetric buffer). */
  bytes(): number {
    return this.L.totalBytes;
  }

  layout(topkIdx: Tensor): DispatchLayout {
    return launchLayout(this.rt, this.layoutKernels, topkIdx);
  }

  /**
   * Tokens and bytes this rank has put to other hosts so far (dispatch records), after the calls queued
   * so far.
   */
  crossHostTraffic(): Promise<{ tokens: number; bytes: number }> {
    return this.queue.run(async () => {
      const v = new BigUint64Array(this.hostMatrix.arrayBuffer, 0, 2);
      await this.readBack(v, HIER_CTRL.rdmaTokens, 'the cross-host traffic counters');
      return { tokens: Number(v[0]), bytes: Number(v[1]) };
    });
  }

  /** Every wait is bounded on the device: nothing to abort. */
  abortTransfers(): void {}

  /**
   * Collective, after a timeout: waits for this GPU, clears the error record and the control block
   * (sequence numbers, signals, barrier words) on every rank between two barriers.
   */
  reset(): Promise<void> {
    return this.queue.run(async () => {
      await this.rt.stream.synchronize({ timeoutMs: this.hostWaitMs });
      await this.rt.group.barrier();
      this.mem.local.fill(0, this.rt.stream, 0, HIER_CTRL.bytes);
      await this.rt.stream.synchronize();
      clearDeviceError(this.mem.signal, ERROR_AT);
      await this.rt.group.barrier();
    });
  }

  dispatch(req: DispatchRequest): Promise<DispatchResult> {
    return this.queue.run(() => this.runDispatch(req));
  }

  combine(req: CombineRequest): Promise<CombineResult> {
    return this.queue.run(() => this.runCombine(req));
  }

  async destroy(): Promise<void> {
    await this.queue.idle();
    await this.rt.stream.synchronize();
    await this.mem.destroy();
    this.layoutKernels.scratch.dispose();
    this.hostMatrix.dispose();
  }

  // ---------------------------------------------------------------------------------------- internals

  private readonly check = (): void => throwIfDeviceError(this.mem.signal, ERROR_AT);

  private recArgs(inp: DispatchInputs): number[] {
    return [this.rt.options.hidden * inp.elt, inp.scaleWords, inp.K, inp.topk?.dtype === 'i64' ? 8 : 4];
  }

  private grid(items: number, perBlock: number): number {
    return Math.max(1, Math.min(Math.ceil(items / perBlock), 2 * this.rt.smCount));
  }

  private async runDispatch(req: DispatchRequest): Promise<DispatchResult> {
    const rt = this.rt;
    const L = this.L;
    const R = L.numRanks;
    const NH = L.hosts;
    const me = rt.group.rank;
    const stream = rt.stream;
    const fresh = req.kind === 'fresh';
    const worst = fresh ? req.worstCaseTokens : req.handle.worstCaseTokens;
    const inp = dispatchInputs(rt, req);
    const shape = payloadShape(inp);
    const alignment = fresh ? req.expertAlignment : req.handle.expertAlignment;
    this.check();
    rt.after(req.previousEvent);
    let handle: HierDispatchHandle | undefined;
    let sendPos: DeviceTensor;
    let hostPos: DeviceTensor;
    let isTokenInRank: DeviceTensor | undefined; // a fresh dispatch's, for its handle
    let matrixPtr: bigint;
    let myCounts: bigint;
    if (fresh) {
      isTokenInRank = rt.onDevice('layout.isTokenInRank', req.layout.isTokenInRank);
      const perExpert = rt.onDevice('layout.numTokensPerExpert', req.layout.numTokensPerExpert);
      sendPos = DeviceTensor.emptyOn('i32', [inp.T, R], stream);
      hostPos = DeviceTensor.emptyOn('i32', [inp.T, NH], stream);
      this.k.route.launch({ grid: R + NH, block: 1024, stream }, [
        isTokenInRank.ptr,
        inp.T,
        sendPos.ptr,
        hostPos.ptr,
        perExpert.ptr,
        L.numExperts,
        shape,
        this.base,
      ]);
      this.k.counts.launch({ grid: 1, block: 32, stream }, [this.base, me, ...this.failArgs]);
      matrixPtr = this.base + BigInt(L.offMatrix);
      myCounts = this.base + BigInt(L.offCounts);
    } else {
      handle = req.handle as HierDispatchHandle; // validate.ts checked it is this buffer's
      sendPos = handle.sendPos;
      hostPos = handle.hostPos;
      matrixPtr = handle.matrix.ptr;
      myCounts = handle.matrix.ptr + BigInt(4 * me * L.countWords);
    }
    this.k.pack.launch({ grid: this.grid(inp.T * NH, 8), block: 256, stream }, [
      inp.x.ptr,
      inp.scales?.ptr ?? 0n,
      BigInt(inp.scales?.strides[0] ?? 0),
      BigInt(inp.scales?.strides[1] ?? 0),
      inp.topk?.ptr ?? 0n,
      inp.weights?.ptr ?? 0n,
      inp.T,
      sendPos.ptr,
      hostPos.ptr,
      this.base,
      Math.floor(me / L.ranksPerHost),
      ...this.recArgs(inp),
    ]);
    this.k.send.launch({ grid: NH, block: 256, stream }, [this.base, me, myCounts]);

    let rows: number;
    let perExpert: number[];
    let matrix: DeviceTensor | undefined;
    let rankPrefix: DeviceTensor | undefined;
    let recvCount: DeviceTensor | undefined;
    let keep: DeviceTensor;
    if (handle) {
      rows = handle.numRecvRows;
      perExpert = [...handle.numRecvTokensPerExpert];
      keep = handle.keep;
    } else if (worst > 0) {
      // No host wait: the receive kernel counts the rows and the rank prefixes from the device's matrix.
      rows = worst;
      perExpert = [];
      keep = DeviceTensor.emptyOn('i32', [NH * L.maxTokensPerRank, 1 + L.ranksPerHost], stream);
      rankPrefix = DeviceTensor.emptyOn('i32', [R, R], stream);
    } else {
      const m = await this.readMatrix();
      checkSamePayload(m, L.countWords - 1, shape, me);
      const c = countsFromMatrix(L, m, me, alignment);
      rows = c.rows;
      perExpert = c.perExpert;
      keep = DeviceTensor.emptyOn('i32', [Math.max(1, c.proxyRecords), 1 + L.ranksPerHost], stream);
      rankPrefix = uploadI32(rt, [R, R], c.rankPrefix);
    }
    if (!handle) {
      // The call's count matrix, for the receive and for a later cached dispatch or combine.
      recvCount = DeviceTensor.emptyOn('i32', [1], stream);
      matrix = DeviceTensor.emptyOn('i32', [R, L.countWords], stream);
      DeviceBuffer.copyAsync(matrix.ptr, matrixPtr, 4 * R * L.countWords, stream);
    }
    const out = dispatchOutputs(inp, rows, rt.options.hidden, stream, fresh);
    if (worst > 0) padDispatchOutputs(out, stream);
    this.k.recv.launch({ grid: this.grid(Math.max(rows, 1), 8), block: 256, stream }, [
      this.base,
      this.hostPeers,
      me,
      matrix?.ptr ?? matrixPtr,
      ...this.recArgs(inp),
      L.numExperts / R,
      out.recvX.ptr,
      out.recvScales?.ptr ?? 0n,
      out.recvTopkIdx?.ptr ?? 0n,
      out.recvTopkWeights?.ptr ?? 0n,
      out.recvSrcIdx?.ptr ?? 0n,
      recvCount?.ptr ?? 0n,
      keep.ptr,
      worst > 0 && !handle ? rankPrefix!.ptr : 0n,
      ...this.failArgs,
    ]);
    this.k.barrier.launch({ grid: 1, block: 32, stream }, [
      this.base,
      this.hostPeers,
      me,
      HIER_CTRL.dispatchEpoch,
      ...this.failArgs,
    ]);
    if (!handle) {
      const own = [sendPos, hostPos, matrix!, rankPrefix!, recvCount!, keep, out.recvSrcIdx!];
      handle = {
        kind: 'dispatch',
        transport: 'nvshmem',
        owner: rt.owner,
        numTokens: inp.T,
        numRecvRows: rows,
        worstCaseTokens: worst,
        expertAlignment: alignment,
        numRecvTokensPerExpert: perExpert,
        isTokenInRank: isTokenInRank!,
        rankPrefixMatrix: rankPrefix!,
        recvSrcIdx: out.recvSrcIdx!,
        sendPos,
        recvCount: recvCount!,
        hostPos,
        matrix: matrix!,
        keep,
        // The layout's isTokenInRank is not the handle's to free.
        dispose: () => {
          for (const t of own) t.dispose();
        },
      };
    }
    return {
      recvX: out.recvX,
      numRecvTokensPerExpert: perExpert,
      handle,
      event: rt.record({ check: this.check }),
      ...(out.recvScales ? { recvScales: out.recvScales } : {}),
      ...(out.recvTopkIdx ? { recvTopkIdx: out.recvTopkIdx } : {}),
      ...(out.recvTopkWeights ? { recvTopkWeights: out.recvTopkWeights } : {}),
    };
  }

  /**
   * Bytes at `offset` of this rank's buffer into pinned `view`, in the stream's order (after the calls
   * queued so far), with a bounded host wait.
   */
  private async readBack(view: ArrayBufferView, offset: number, what: string): Promise<void> {
    this.mem.local.copyToHostAsync(view, this.rt.stream, offset);
    await this.rt.record().cuda.synchronize({
      timeoutMs: this.hostWaitMs,
      what: `${what} (rank ${this.rt.group.rank})`,
    });
  }

  /** The count matrix, once every rank's row has arrived (a bounded wait on the device, then the host's). */
  private async readMatrix(): Promise<Int32Array[]> {
    const L = this.L;
    const pinned = new Int32Array(this.hostMatrix.arrayBuffer, 0, L.numRanks * L.countWords);
    await this.readBack(pinned, L.offMatrix, 'the dispatch count exchange over NVSHMEM');
    this.check();
    return Array.from({ length: L.numRanks }, (_, s) =>
      pinned.slice(s * L.countWords, (s + 1) * L.countWords),
    );
  }

  private async runCombine(req: CombineRequest): Promise<CombineResult> {
    const rt = this.rt;
    const L = this.L;
    const h = req.handle as HierDispatchHandle; // validate.ts checked it is this buffer's
    const x = rt.onDevice('x', req.x);
    const weights = req.topkWeights ? rt.onDevice('topkWeights', req.topkWeights) : undefined;
    const bias = req.bias.map((b, i) => rt.onDevice(`bias[${i}]`, b));
    const K = weights ? weights.shape[1]! : 0;
    const H = rt.options.hidden;
    const T = h.numTokens;
    const stream = rt.stream;
    const me = rt.group.rank;
    this.check();
    rt.after(req.previousEvent);
    // A worst-case handle's rows past the received ones are not read: at most R·T_max rows are real.
    const rows = Math.min(h.numRecvRows, L.numRanks * L.maxTokensPerRank);
    DeviceBuffer.copyAsync(this.base + BigInt(L.offCombineRows), x.ptr, rows * 2 * H, stream);
    if (weights)
      DeviceBuffer.copyAsync(this.base + BigInt(L.offCombineWeights), weights.ptr, rows * 4 * K, stream);
    this.k.mark.launch({ grid: 1, block: 32, stream }, [this.base]);
    this.k.partial.launch({ grid: this.grid(L.hosts * T, 8), block: 256, stream }, [
      this.base,
      this.hostPeers,
      me,
      h.matrix.ptr,
      h.keep.ptr,
      H,
      K,
      ...this.failArgs,
    ]);
    const combinedX = DeviceTensor.emptyOn('bf16', [T, H], stream);
    const combinedW = weights ? DeviceTensor.emptyOn('f32', [T, K], stream) : undefined;
    this.k.reduce.launch({ grid: this.grid(Math.max(1, T * (H / 8)), 256), block: 256, stream }, [
      this.base,
      me,
      T,
      H,
      K,
      h.hostPos.ptr,
      bias[0]?.ptr ?? 0n,
      bias[1]?.ptr ?? 0n,
      combinedX.ptr,
      combinedW?.ptr ?? 0n,
      ...this.failArgs,
    ]);
    this.k.barrier.launch({ grid: 1, block: 32, stream }, [
      this.base,
      this.hostPeers,
      me,
      HIER_CTRL.combineEpoch,
      ...this.failArgs,
    ]);
    return {
      combinedX,
      ...(combinedW ? { combinedTopkWeights: combinedW } : {}),
      event: rt.record({ check: this.check }),
    };
  }
}
