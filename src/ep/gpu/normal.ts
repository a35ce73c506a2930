// The normal (high-throughput) mode of the GPU backend over NVLink: layout, dispatch, combine. The
// kernels are in kernels/layout.cu and kernels/normal.cu (launchers in normal-kernels.ts); the buffer
// layout in normal-layout.ts.
//
// A fresh dispatch enqueues notify (count exchange) and send (rows pushed into the receivers' buffers)
// at once, then reads the received row count from host-mapped memory while the rows are in flight,
// allocates exact-size outputs and enqueues the receive kernel. Cached and worst-case dispatches skip
// the host read entirely. The receive kernel runs on a second stream, on SMs of its own, at the same
// time as the send kernel: it copies each chunk out as soon as its senders announce it; the call's stream
// then waits for it. Calls are serialized on the host, in call order, like the stream they use.

import { DeviceTensor } from '../../device/device-tensor.ts';
import { DeviceBuffer } from '../../device/memory.ts';
import { pollUntil } from '../../device/poll.ts';
import { Event, Stream } from '../../device/stream.ts';
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
import { clearDeviceError, deviceTimeoutNs, hostWaitMs, throwIfDeviceError } from './device-error.ts';
import {
  CallQueue,
  chunkCounts,
  combinePieces,
  type DispatchOutputs,
  dispatchInputs,
  dispatchOutputs,
  exclusivePrefix,
  type FailArgs,
  type LayoutKernels,
  launchLayout,
  loadLayoutKernels,
  type NormalKernels,
  NormalModules,
  normalSms,
  padDispatchOutputs,
  smShares,
} from './normal-kernels.ts';
import {
  type ChunkCounts,
  CTRL_ABORT,
  ERROR_RECORD,
  MAX_LOCAL_EXPERTS,
  MAX_RANKS,
  MAX_TOKENS_PER_RANK,
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
  /** Exact-size dispatch: rows received from each rank, known on the host (the copy-engine combine's sizes). */
  readonly recvPerSource?: readonly number[];
}

/** Checks shared by both transports: ranks and local experts the control block and kernels support. */
export function checkNormalShape(rt: GpuRuntime): void {
  const R = rt.group.size;
  if (R > MAX_RANKS) throw new ValidationError('group size', String(R), `at most ${MAX_RANKS} ranks`);
  const T = rt.options.maxTokensPerRank;
  if (T > MAX_TOKENS_PER_RANK) {
    throw new ValidationError(
      'maxTokensPerRank',
      String(T),
      `at most ${MAX_TOKENS_PER_RANK} (normal mode on the GPU)`,
    );
  }
  const EL = rt.options.numExperts / R;
  if (EL > MAX_LOCAL_EXPERTS) {
    throw new ValidationError(
      'numExperts',
      String(rt.options.numExperts),
      `at most ${MAX_LOCAL_EXPERTS} experts per rank`,
    );
  }
}

export class NormalPath {
  private readonly rt: GpuRuntime;
  private readonly sym: SymmetricBuffer;
  private readonly areas: NormalAreas;
  private readonly layoutKernels: LayoutKernels;
  private readonly modules: NormalModules;
  private readonly timeoutNs = deviceTimeoutNs();
  private readonly queue = new CallQueue();
  private readonly numChunks: ChunkCounts;
  /** Where this rank's kernels report a timeout (the same every call: computed once). */
  private readonly fail: FailArgs;
  /**
   * The receive / reduce kernel's stream, forked from the call's stream after notify or prepare and joined
   * back before the call's event, through two events of its own (re-recorded every call: a stream wait
   * takes the event's latest record, so reuse is safe, costs no event creation and leaks none in graphs).
   * High priority like the call's stream: its kernels are on the call's critical path.
   */
  private readonly recvStream: Stream;
  private readonly forkEvent: Event;
  private readonly joinEvent: Event;
  /**
   * Copy-engine combine (TSEP_NORMAL_COMBINE_PIECES > 0): pieces per source block, one stream per
   * destination rank (copies to different ranks run at once) and the events that join them back.
   */
  private readonly pieces: number;
  private readonly copyStreams: Stream[] = [];
  private readonly copyJoins: Event[] = [];
  private seq = 0;
  /** Combines that took the copy-engine path (diagnostics and tests). */
  copyEngineCombines = 0;
  /**
   * SMs (blocks) a dispatch or a combine uses, its send kernel and the receive or reduce kernel beside it
   * together (see split()); the same on every rank.
   */
  numSms = normalSms();
  /** Percent of those SMs for the kernel beside the sends (see smShares). */
  private readonly shares = smShares();

  private constructor(
    rt: GpuRuntime,
    sym: SymmetricBuffer,
    areas: NormalAreas,
    layout: LayoutKernels,
    numChunks: ChunkCounts,
  ) {
    this.rt = rt;
    this.sym = sym;
    this.areas = areas;
    this.layoutKernels = layout;
    this.modules = new NormalModules(rt);
    this.numChunks = numChunks;
    this.fail = {
      err: sym.signal.devicePtr + BigInt(ERROR_RECORD),
      abort: sym.local.ptr + BigInt(CTRL_ABORT),
    };
    this.recvStream = Stream.create(rt.device, { priority: 'high' });
    this.forkEvent = Event.create(rt.device);
    this.joinEvent = Event.create(rt.device);
    this.pieces = combinePieces(numChunks);
    if (this.pieces > 0) {
      for (let r = 0; r < rt.group.size; r++) {
        this.copyStreams.push(Stream.create(rt.device, { priority: 'high' }));
        this.copyJoins.push(Event.create(rt.device));
      }
    }
  }

  /** Makes the receive stream wait for the work enqueued on the call's stream so far. */
  private fork(): void {
    this.forkEvent.record(this.rt.stream);
    this.recvStream.waitEvent(this.forkEvent);
  }

  /** Makes the call's stream wait for the work enqueued on the receive stream so far. */
  private join(): void {
    this.joinEvent.record(this.recvStream);
    this.rt.stream.waitEvent(this.joinEvent);
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
    checkNormalShape(rt);
    const numChunks = chunkCounts(o.maxTokensPerRank);
    // The chunk counts place every area of every rank's buffer: a rank with other chunk settings would
    // write rows at the wrong offsets of its peers.
    const mine = Int32Array.of(numChunks.dispatch, numChunks.combine);
    const counts = (await rt.group.allGather(new Uint8Array(mine.buffer))).map(
      (b) => new Int32Array(new Uint8Array(b).buffer),
    );
    if (counts.some((n) => n[0] !== mine[0] || n[1] !== mine[1])) {
      throw new ValidationError(
        'TSEP_NORMAL_DISPATCH_CHUNKS / TSEP_NORMAL_COMBINE_CHUNKS',
        `chunk counts (dispatch, combine) ${counts.map((n) => `(${n[0]}, ${n[1]})`).join(', ')} on ranks 0..${R - 1}`,
        'the same values on every rank',
      );
    }
    const areas = normalAreas(R, o.maxTokensPerRank, o.hidden, o.numTopk, numChunks);
    const layout = await loadLayoutKernels(rt);
    const sym = await SymmetricBuffer.create(rt.group, areas.bytes, rt.device, { signalBytes: SIGNAL_BYTES });
    return new NormalPath(rt, sym, areas, layout, numChunks);
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

  private get peers(): bigint {
    return this.sym.peerTable.ptr;
  }

  /**
   * The call's SMs between the send kernel and the kernel beside it, `pct` percent for the latter: by
   * default a third for the dispatch receive (plain local copies), half for the combine reduce (it reads
   * every source's row of a token).
   */
  private split(pct: number): { send: number; recv: number } {
    // Both grids must be resident at once (the receive side waits for this rank's own sends).
    const sms = Math.min(this.numSms, this.rt.smCount);
    const recv = Math.max(1, Math.round((sms * pct) / 100));
    return { send: Math.max(1, sms - recv), recv };
  }

  /** Throws EpTimeoutError when a kernel of this buffer gave up waiting (until `reset()`). */
  private readonly check = (): void => throwIfDeviceError(this.sym.signal, ERROR_RECORD);

  /**
   * Collective (every rank calls it): after a timeout, waits for this rank's work to end (every device
   * wait is bounded), then zeroes every rank's control block, chunk words and error record between two
   * barriers of the group, so the next call starts from a clean state on all ranks.
   */
  reset(): Promise<void> {
    // Queued like a call, so no dispatch of this rank can touch a control block while it is cleared.
    return this.queue.run(async () => {
      const timeoutMs = hostWaitMs(this.timeoutNs);
      await this.rt.stream.synchronize({ timeoutMs });
      await this.recvStream.synchronize({ timeoutMs });
      await this.rt.group.barrier();
      this.sym.local.fill(0, this.rt.stream, 0, this.areas.x);
      await this.rt.stream.synchronize();
      clearDeviceError(this.sym.signal, ERROR_RECORD);
      await this.rt.group.barrier();
    });
  }

  /** Nothing to abort: every wait of the NVLink kernels is bounded on the device. */
  abortTransfers(): void {}

  layout(topkIdx: Tensor): DispatchLayout {
    return launchLayout(this.rt, this.layoutKernels, topkIdx);
  }

  dispatch(req: DispatchRequest): Promise<DispatchResult> {
    return this.queue.run(() => this.runDispatch(req));
  }

  private async runDispatch(req: DispatchRequest): Promise<DispatchResult> {
    this.check();
    const rt = this.rt;
    const R = this.R;
    const inp = dispatchInputs(rt, req);
    const { T } = inp;
    const kernels = await this.modules.get({
      elt: inp.elt,
      scaleWords: inp.scaleWords,
      K: inp.K,
      idx64: inp.topk?.dtype === 'i64',
      weights: inp.weights !== undefined,
    });
    const G = this.split(this.shares.recvPct);
    const stream = rt.stream;
    rt.after(req.previousEvent);
    rt.markStart();

    let rankPrefix: DeviceTensor;
    let sendPos: DeviceTensor;
    let recvCount: DeviceTensor;
    let isTokenInRank: DeviceTensor;
    let rows: number;
    let perExpert: number[];
    let recvPerSource: number[] | undefined;
    const fresh = req.kind === 'fresh';
    // A cached exact-size dispatch's outputs (allocated below, before its kernels): the send puts this
    // rank's own rows straight there, so they skip the buffer and the receive's copy.
    let own: DispatchOutputs | undefined;
    // Rows go out as soon as the routing is known; a fresh dispatch then reads the counts meanwhile. The
    // receive stream forks here: its kernel may start once notify or prepare has run.
    const send = (positions: DeviceTensor, prefix: DeviceTensor) => {
      this.fork();
      kernels.send(stream, G.send, {
        peers: this.peers,
        me: this.me,
        inp,
        sendPos: positions.ptr,
        rankPrefix: prefix.ptr,
        areas: this.areas,
        ...(own ? { own } : {}),
        numChunks: this.numChunks.dispatch,
        fail: this.fail,
      });
      rt.mark('send');
    };
    const worst = fresh ? req.worstCaseTokens : req.handle.worstCaseTokens;
    const alignment = fresh ? req.expertAlignment : req.handle.expertAlignment;
    if (fresh) {
      const layout = req.layout;
      isTokenInRank = rt.onDevice('layout.isTokenInRank', layout.isTokenInRank);
      rankPrefix = DeviceTensor.emptyOn('i32', [R, R], stream);
      sendPos = DeviceTensor.emptyOn('i32', [T, R], stream);
      recvCount = DeviceTensor.emptyOn('i32', [1], stream);
      const seq = ++this.seq;
      kernels.notify(stream, R + 1, {
        peers: this.peers,
        me: this.me,
        T,
        inRank: isTokenInRank.ptr,
        perRank: rt.onDevice('layout.numTokensPerRank', layout.numTokensPerRank).ptr,
        perExpert: rt.onDevice('layout.numTokensPerExpert', layout.numTokensPerExpert).ptr,
        rankPrefix: rankPrefix.ptr,
        sendPos: sendPos.ptr,
        recvCount: recvCount.ptr,
        host: this.sym.signal.devicePtr,
        seq,
        alignment,
        timeoutNs: this.timeoutNs,
        fail: this.fail,
      });
      rt.mark('notify');
      send(sendPos, rankPrefix);
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
        recvPerSource = Array.from(sig.subarray(SIGNAL_EXPERTS + this.EL, SIGNAL_EXPERTS + this.EL + R));
      }
    } else {
      const h = req.handle as GpuDispatchHandle;
      isTokenInRank = rt.onDevice('handle.isTokenInRank', h.isTokenInRank);
      rankPrefix = rt.onDevice('handle.rankPrefixMatrix', h.rankPrefixMatrix);
      sendPos = h.sendPos;
      recvCount = h.recvCount;
      rows = h.numRecvRows;
      perExpert = [...h.numRecvTokensPerExpert];
      // The size is known before any kernel, so the outputs are made now, on the call's stream (the send
      // writes into them; the receive stream forks after). Fresh dispatches learn the size after the send
      // is enqueued; worst-case outputs are padded on the receive stream.
      if (worst === 0) own = dispatchOutputs(inp, rows, rt.options.hidden, stream, false);
      kernels.prepare(stream, {
        peers: this.peers,
        me: this.me,
        which: 0,
        chunks: 0,
        timeoutNs: this.timeoutNs,
        fail: this.fail,
      });
      rt.mark('barrier');
      send(sendPos, rankPrefix);
    }
    // Made for the receive kernel, freed on the call's stream (which joins it) after the caller's work.
    const out = own ?? dispatchOutputs(inp, rows, rt.options.hidden, this.recvStream, fresh, stream);
    // Padded (worst-case) outputs: rows past the received ones stay 0 with -1 ids; the memsets run on the
    // receive stream's SMs beside the sends, before any chunk is copied over the first rows.
    if (worst > 0) padDispatchOutputs(out, this.recvStream);
    kernels.recv(this.recvStream, G.recv, {
      peers: this.peers,
      me: this.me,
      rankPrefix: rankPrefix.ptr,
      recvCount: recvCount.ptr,
      rows,
      out,
      areas: this.areas,
      ownDirect: own !== undefined,
      numChunks: this.numChunks.dispatch,
      timeoutNs: this.timeoutNs,
      fail: this.fail,
    });
    this.join();
    rt.mark('receive');
    const recvSrcIdx = out.recvSrcIdx!; // fresh dispatch only (a cached one returns its own handle)
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
      ...(recvPerSource ? { recvPerSource } : {}),
      // The layout's isTokenInRank stays the caller's; the rest was allocated for this handle.
      dispose: () => {
        for (const t of [rankPrefix, recvSrcIdx, sendPos, recvCount]) t.dispose();
      },
    };
    return {
      recvX: out.recvX,
      numRecvTokensPerExpert: perExpert,
      handle: fresh ? handle : req.handle,
      event: rt.record({ check: this.check }),
      ...(out.recvScales ? { recvScales: out.recvScales } : {}),
      ...(out.recvTopkIdx ? { recvTopkIdx: out.recvTopkIdx } : {}),
      ...(out.recvTopkWeights ? { recvTopkWeights: out.recvTopkWeights } : {}),
    };
  }

  combine(req: CombineRequest): Promise<CombineResult> {
    return this.queue.run(() => this.runCombine(req));
  }

  private async runCombine(req: CombineRequest): Promise<CombineResult> {
    this.check();
    const rt = this.rt;
    const h = req.handle as GpuDispatchHandle;
    const x = rt.onDevice('x', req.x);
    const weights = req.topkWeights ? rt.onDevice('topkWeights', req.topkWeights) : undefined;
    const bias = req.bias.map((b, i) => rt.onDevice(`bias[${i}]`, b));
    const rankPrefix = rt.onDevice('handle.rankPrefixMatrix', h.rankPrefixMatrix);
    const isTokenInRank = rt.onDevice('handle.isTokenInRank', h.isTokenInRank);
    const K = weights ? weights.shape[1]! : 0;
    const kernels = await this.modules.get({
      elt: 2,
      scaleWords: 0,
      K,
      idx64: false,
      weights: weights !== undefined,
    });
    const T = h.numTokens;
    const stream = rt.stream;
    const G = this.split(this.shares.reducePct);
    // Copy engines only where the host knows every block's size (an exact-size handle).
    const perSource = this.pieces > 0 ? h.recvPerSource : undefined;
    // One rank: every row is its own, read in x by the reduce, so nothing is sent and the reduce takes
    // every SM (at its 33 % share, 8 of 24 SMs, a one-rank combine took 170 µs).
    const sendless = perSource !== undefined || this.R === 1;
    rt.after(req.previousEvent);
    rt.markStart();
    kernels.prepare(stream, {
      peers: this.peers,
      me: this.me,
      which: 1,
      chunks: perSource ? this.pieces : this.numChunks.combine,
      timeoutNs: this.timeoutNs,
      fail: this.fail,
    });
    rt.mark('barrier');
    // The reduce runs beside the sends, on the receive stream, summing each token once its rows are in.
    this.fork();
    if (perSource) {
      this.copyBlocks(kernels, x, weights, perSource);
      this.copyEngineCombines++;
    } else if (!sendless) {
      kernels.combineSend(stream, G.send, {
        peers: this.peers,
        me: this.me,
        x: x.ptr,
        rankPrefix: rankPrefix.ptr,
        weights: weights?.ptr ?? 0n,
        areas: this.areas,
        numChunks: this.numChunks.combine,
        fail: this.fail,
      });
    }
    rt.mark(perSource ? 'copies' : 'combine send');
    const combinedX = DeviceTensor.emptyOn('bf16', [T, rt.options.hidden], this.recvStream, stream);
    const combinedW = weights ? DeviceTensor.emptyOn('f32', [T, K], this.recvStream, stream) : undefined;
    kernels.reduce(this.recvStream, sendless ? G.send + G.recv : G.recv, {
      peers: this.peers,
      me: this.me,
      T,
      inRank: isTokenInRank.ptr,
      bias,
      out: combinedX.ptr,
      outWeights: combinedW?.ptr ?? 0n,
      sendPos: rt.onDevice('handle.sendPos', h.sendPos).ptr,
      rowBase: 0n,
      rankPrefix: rankPrefix.ptr,
      areas: this.areas,
      numChunks: this.numChunks.combine,
      ownX: x.ptr,
      ownWeights: weights?.ptr ?? 0n,
      timeoutNs: this.timeoutNs,
      fail: this.fail,
    });
    this.join();
    rt.mark('reduce');
    return {
      combinedX,
      ...(combinedW ? { combinedTopkWeights: combinedW } : {}),
      event: rt.record({ check: this.check }),
    };
  }

  /**
   * The copy-engine combine's transfer, after prepare (the fork event marks it): the block of x that came
   * from peer s goes back to s's stage at [me][0..) (this rank's own block stays in x, where its reduce
   * reads it), in `pieces` copies on s's copy stream, weights riding along, each followed by a one-thread
   * kernel that writes the chunk word s's reduce waits for, tagged with the device's combine sequence
   * number (so graph replays tag right). A copy is not stopped by the abort word as kernels are: after a
   * timeout, reset() is due anyway.
   */
  private copyBlocks(
    kernels: NormalKernels,
    x: DeviceTensor,
    weights: DeviceTensor | undefined,
    perSource: readonly number[],
  ): void {
    const R = this.R;
    const me = this.me;
    const T = this.rt.options.maxTokensPerRank;
    const rowBytes = 2 * this.rt.options.hidden;
    const K = weights ? weights.shape[1]! : 0;
    const starts = exclusivePrefix(perSource);
    for (let k = 1; k < R; k++) {
      const s = (me + k) % R; // each rank starting at its next one
      const count = perSource[s]!;
      if (count === 0) continue; // s sent this rank nothing, so waits for nothing from it
      const on = this.copyStreams[s]!;
      on.waitEvent(this.forkEvent);
      const peer = this.sym.peers[s]!;
      const perPiece = Math.max(1, Math.ceil(count / this.pieces));
      for (let p = 0, q = 0; q < count; p++, q += perPiece) {
        const n = Math.min(perPiece, count - q);
        const row = BigInt(me * T + q);
        const from = BigInt(starts[s]! + q);
        DeviceBuffer.copyAsync(
          peer + BigInt(this.areas.x) + row * BigInt(rowBytes),
          x.ptr + from * BigInt(rowBytes),
          n * rowBytes,
          on,
        );
        if (weights) {
          DeviceBuffer.copyAsync(
            peer + BigInt(this.areas.weights) + row * BigInt(4 * K),
            weights.ptr + from * BigInt(4 * K),
            n * 4 * K,
            on,
          );
        }
        kernels.combineSignal(on, {
          peers: this.peers,
          me,
          dst: s,
          piece: p,
          areas: this.areas,
          numChunks: this.numChunks.combine,
          fail: this.fail,
        });
      }
      this.copyJoins[s]!.record(on);
      this.rt.stream.waitEvent(this.copyJoins[s]!);
    }
  }

  async destroy(): Promise<void> {
    await this.queue.idle();
    await this.rt.stream.synchronize();
    await this.recvStream.synchronize();
    for (const s of this.copyStreams) await s.synchronize();
    for (const r of [
      this.forkEvent,
      this.joinEvent,
      this.recvStream,
      this.layoutKernels.scratch,
      ...this.copyStreams,
      ...this.copyJoins,
    ])
      r.dispose();
    await this.sym.destroy();
  }
}
