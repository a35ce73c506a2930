// The CPU backend. Each call serializes this rank's inputs, exchanges them with one group.allGather,
// and computes this rank's slice of the result with the reference functions. Nothing else crosses
// ranks, so it runs the same over LocalGroup (ranks as async tasks) and over a multi-process group.
// Like a stream, a call reads what an earlier call produces only after that call finished: a
// low-latency combine waits for its dispatch, a call with previousEvent for that event.

import { HostTensor } from '../device/tensor.ts';
import type {
  BackendContext,
  CombineRequest,
  CombineResult,
  DispatchHandle,
  DispatchRequest,
  DispatchResult,
  EpBackend,
  EpBackendFactory,
  EpDataCall,
  EpSizeHint,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
  LowLatencyHandle,
  RecvHook,
  Tensor,
} from '../ep/types.ts';
import { ValidationError } from '../errors.ts';
import { CpuEvent } from './event.ts';
import { type ExchangeParts, Exchanger } from './exchange.ts';
import { combineForRank } from './ref-combine.ts';
import { dispatchToRank } from './ref-dispatch.ts';
import { referenceLayout } from './ref-layout.ts';
import {
  allocLowLatencyReceived,
  fillLowLatencyCombine,
  fillLowLatencyDispatch,
  type LowLatencyConfig,
} from './ref-low-latency.ts';
import { cpuSizeHint } from './size-hint.ts';
import { hostTensor, optionalHostTensor } from './tensor-io.ts';
import type { WireMessage } from './wire.ts';

export const cpuBackendFactory: EpBackendFactory = {
  name: 'cpu',
  create: async (context) => new CpuBackend(context),
};

class CpuBackend implements EpBackend {
  readonly name = 'cpu';
  private readonly ctx: BackendContext;
  private readonly exchanger: Exchanger;
  private readonly rank: number;
  private readonly numRanks: number;
  /** Work started and not yet settled; destroy() waits for it. */
  private readonly inFlight = new Set<Promise<unknown>>();
  /** Completion of the low-latency dispatch that filled each handle. */
  private readonly llReady = new WeakMap<LowLatencyHandle, Promise<void>>();

  constructor(ctx: BackendContext) {
    this.ctx = ctx;
    this.exchanger = new Exchanger(ctx.group);
    this.rank = ctx.group.rank;
    this.numRanks = ctx.group.size;
  }

  getDispatchLayout(topkIdx: Tensor): ReturnType<EpBackend['getDispatchLayout']> {
    return referenceLayout(hostTensor('topkIdx', topkIdx), this.ctx.options.numExperts, this.numRanks);
  }

  dispatch(req: DispatchRequest): Promise<DispatchResult> {
    const x = hostTensor('x', req.x);
    const scales = optionalHostTensor('scales', req.scales);
    let tensors: Record<string, HostTensor | undefined>;
    if (req.kind === 'fresh') {
      const topkIdx = optionalHostTensor('topkIdx', req.topkIdx);
      const topkWeights = optionalHostTensor('topkWeights', req.topkWeights);
      // numTokensPerRank is not sent, but a layout is host memory as a whole.
      hostTensor('layout.numTokensPerRank', req.layout.numTokensPerRank);
      const numTokensPerExpert = hostTensor('layout.numTokensPerExpert', req.layout.numTokensPerExpert);
      const isTokenInRank = hostTensor('layout.isTokenInRank', req.layout.isTokenInRank);
      tensors = { x, scales, topkIdx, topkWeights, isTokenInRank, numTokensPerExpert };
    } else {
      // The handle is one this backend made (the buffer checks its owner): its tensors are host tensors.
      tensors = { x, scales, isTokenInRank: hostTensor('handle.isTokenInRank', req.handle.isTokenInRank) };
    }
    const encode = (): ExchangeParts => ({ meta: { cached: req.kind === 'cached' }, tensors });
    const payload = req.previousEvent ? req.previousEvent.wait().then(encode) : encode();
    return this.track(
      this.exchanger.exchange('dispatch', payload).then((messages) => this.receiveDispatch(req, messages)),
    );
  }

  private receiveDispatch(req: DispatchRequest, messages: WireMessage[]): DispatchResult {
    sameOnAllRanks(messages, 'handle', (m) => (m.meta.cached ? 'a cached dispatch' : 'a fresh dispatch'));
    sameOnAllRanks(messages, 'x', (m) => `${m.tensors.x!.dtype} x`);
    sameOnAllRanks(messages, 'scales', (m) =>
      m.tensors.scales ? `${m.tensors.scales.dtype} scales` : 'no scales',
    );
    sameOnAllRanks(messages, 'topkIdx', (m) => {
      const t = m.tensors.topkIdx;
      return t ? `${t.dtype} topkIdx with K = ${t.shape[1]}` : 'no topkIdx';
    });
    sameOnAllRanks(messages, 'topkWeights', (m) =>
      m.tensors.topkWeights ? 'topkWeights' : 'no topkWeights',
    );
    const sources = messages.map((m) => ({
      x: m.tensors.x!,
      isTokenInRank: m.tensors.isTokenInRank!,
      ...pick(m.tensors, ['scales', 'topkIdx', 'topkWeights', 'numTokensPerExpert']),
    }));
    // A cached dispatch replays the alignment and row count of the dispatch that made its handle.
    const replayed = req.kind === 'fresh' ? req : req.handle;
    const received = dispatchToRank(sources, this.rank, {
      numExperts: this.ctx.options.numExperts,
      expertAlignment: replayed.expertAlignment,
      worstCaseTokens: replayed.worstCaseTokens,
    });
    const handle: DispatchHandle =
      req.kind === 'cached'
        ? req.handle
        : {
            kind: 'dispatch',
            owner: this.ctx.owner,
            numTokens: req.x.shape[0]!,
            numRecvRows: received.recvX.shape[0]!,
            worstCaseTokens: req.worstCaseTokens,
            expertAlignment: req.expertAlignment,
            numRecvTokensPerExpert: received.numRecvTokensPerExpert,
            isTokenInRank: req.layout.isTokenInRank,
            rankPrefixMatrix: received.rankPrefixMatrix,
            recvSrcIdx: received.recvSrcIdx,
            dispose: () => {}, // host memory: the garbage collector frees it
          };
    return {
      recvX: received.recvX,
      ...pick(received, ['recvScales', 'recvTopkIdx', 'recvTopkWeights']),
      numRecvTokensPerExpert: handle.numRecvTokensPerExpert,
      handle,
      event: CpuEvent.completed(),
    };
  }

  combine(req: CombineRequest): Promise<CombineResult> {
    const x = hostTensor('x', req.x);
    const topkWeights = optionalHostTensor('topkWeights', req.topkWeights);
    const bias = req.bias.map((b, i) => hostTensor(`bias[${i}]`, b));
    const isTokenInRank = hostTensor('handle.isTokenInRank', req.handle.isTokenInRank);
    const rankPrefixMatrix = hostTensor('handle.rankPrefixMatrix', req.handle.rankPrefixMatrix);
    const encode = (): ExchangeParts => {
      // Only the rows actually received travel back; worst-case padding stays home.
      const R = this.numRanks;
      const rows = (rankPrefixMatrix.data as Int32Array)[(R - 1) * R + this.rank]!;
      return { tensors: { x: firstRows(x, rows), topkWeights: topkWeights && firstRows(topkWeights, rows) } };
    };
    const payload = req.previousEvent ? req.previousEvent.wait().then(encode) : encode();
    const work = this.exchanger.exchange('combine', payload).then((messages): CombineResult => {
      sameOnAllRanks(messages, 'topkWeights', (m) => {
        const w = m.tensors.topkWeights;
        return w ? `topkWeights with K = ${w.shape[1]}` : 'no topkWeights';
      });
      const combined = combineForRank(
        this.rank,
        { isTokenInRank, bias },
        rankPrefixMatrix,
        messages.map((m) => ({ x: m.tensors.x!, ...pick(m.tensors, ['topkWeights']) })),
      );
      return { ...combined, event: CpuEvent.completed() };
    });
    return this.track(work);
  }

  lowLatencyDispatch(req: LowLatencyDispatchRequest): LowLatencyDispatchResult {
    const x = hostTensor('x', req.x);
    const topkIdx = hostTensor('topkIdx', req.topkIdx);
    const { numExperts, maxTokensPerRank, hidden } = this.ctx.options;
    const config: LowLatencyConfig = {
      numExperts,
      maxTokensPerRank,
      fp8: req.fp8,
      roundScale: req.roundScale,
      ue8m0: req.ue8m0,
    };
    const out = allocLowLatencyReceived(this.numRanks, hidden, config);
    const gathered = this.exchanger.exchange('lowLatencyDispatch', { tensors: { x, topkIdx } });
    const receive = async (): Promise<void> => {
      const messages = await gathered;
      const sources = messages.map((m) => ({ x: m.tensors.x!, topkIdx: m.tensors.topkIdx! }));
      fillLowLatencyDispatch(out, sources, this.rank, config);
    };
    const handle: LowLatencyHandle = {
      kind: 'low-latency',
      owner: this.ctx.owner,
      numTokens: x.shape[0]!,
      packedRecvSrcInfo: out.packedRecvSrcInfo,
      packedRecvLayoutRange: out.packedRecvLayoutRange,
      dispose: () => {}, // host memory: the garbage collector frees it
    };
    const { done, hook } = this.receivePhase(gathered, receive, req.returnRecvHook);
    this.llReady.set(handle, done);
    return {
      recvX: out.recvX,
      ...pick(out, ['recvScales']),
      recvCount: out.recvCount,
      handle,
      event: new CpuEvent(done),
      ...(hook ? { hook } : {}),
    };
  }

  lowLatencyCombine(req: LowLatencyCombineRequest): LowLatencyCombineResult {
    const x = hostTensor('x', req.x);
    const topkIdx = hostTensor('topkIdx', req.topkIdx);
    const topkWeights = hostTensor('topkWeights', req.topkWeights);
    // The handle is one this backend made (the buffer checks its owner): its tensors are host tensors.
    const packedRecvSrcInfo = hostTensor('handle.packedRecvSrcInfo', req.handle.packedRecvSrcInfo);
    const packedRecvLayoutRange = hostTensor(
      'handle.packedRecvLayoutRange',
      req.handle.packedRecvLayoutRange,
    );
    const { numExperts, hidden } = this.ctx.options;
    const out = HostTensor.zeros('bf16', [req.handle.numTokens, hidden]);
    // The handle's tensors (and usually x) are filled by the dispatch: read them once it is done.
    const ready = this.llReady.get(req.handle) ?? Promise.resolve();
    const payload = ready.then(
      (): ExchangeParts => ({
        tensors: { x: receivedRows(x, packedRecvLayoutRange), packedRecvSrcInfo, packedRecvLayoutRange },
      }),
    );
    const gathered = this.exchanger.exchange('lowLatencyCombine', payload);
    const receive = async (): Promise<void> => {
      const messages = await gathered;
      const sides = messages.map((m) => ({
        x: m.tensors.x!,
        packedRecvSrcInfo: m.tensors.packedRecvSrcInfo!,
        packedRecvLayoutRange: m.tensors.packedRecvLayoutRange!,
      }));
      fillLowLatencyCombine(out, this.rank, { topkIdx, topkWeights }, sides, numExperts);
    };
    const { done, hook } = this.receivePhase(gathered, receive, req.returnRecvHook);
    return { combinedX: out, event: new CpuEvent(done), ...(hook ? { hook } : {}) };
  }

  /**
   * Runs `receive` now, or when the returned hook is first called. `done` settles when it has run;
   * calling the hook again returns the same promise.
   */
  private receivePhase(
    gathered: Promise<unknown>,
    receive: () => Promise<void>,
    withHook: boolean,
  ): { done: Promise<void>; hook?: RecvHook } {
    // The exchange goes ahead without the hook; track it so destroy() waits and a failure is handled.
    this.track(gathered).catch(() => undefined);
    if (!withHook) return { done: this.track(receive()) };
    let started = false;
    let settle!: (work: Promise<void>) => void;
    const done = new Promise<void>((resolve) => {
      settle = resolve;
    });
    // Returning `done` itself (which the event already watches) makes the event complete by the time
    // the caller's await of the hook returns.
    const hook = (): Promise<void> => {
      if (!started) {
        started = true;
        settle(this.track(receive()));
      }
      return done;
    };
    return { done, hook };
  }

  refuseCall(call: EpDataCall, error: unknown): void {
    this.track(this.exchanger.refuse(call, error)); // destroy() waits for it like any exchange
  }

  cleanLowLatencyBuffer(): void {
    // Nothing to clean: every low-latency call allocates its own outputs and no signal state
    // survives between calls.
  }

  sizeHint(): EpSizeHint {
    return cpuSizeHint(this.ctx.options, this.numRanks);
  }

  async destroy(): Promise<void> {
    await Promise.allSettled([...this.inFlight]);
  }

  private track<T>(work: Promise<T>): Promise<T> {
    this.inFlight.add(work);
    const forget = (): void => {
      this.inFlight.delete(work);
    };
    work.then(forget, forget);
    return work;
  }
}

/** Throws the same ValidationError on every rank when ranks made mismatched calls. */
function sameOnAllRanks(
  messages: readonly WireMessage[],
  argument: string,
  key: (m: WireMessage) => string,
): void {
  const first = key(messages[0]!);
  for (let r = 1; r < messages.length; r++) {
    const v = key(messages[r]!);
    if (v !== first)
      throw new ValidationError(
        argument,
        `${v} on rank ${r} but ${first} on rank 0`,
        'the same kind of call on every rank',
      );
  }
}

/** The defined entries of `source` among `keys` (optional fields stay absent rather than undefined). */
function pick<T extends object, K extends keyof T>(source: T, keys: readonly K[]): Partial<Pick<T, K>> {
  const out: Partial<Pick<T, K>> = {};
  for (const k of keys) if (source[k] !== undefined) out[k] = source[k];
  return out;
}

/** The first `rows` rows of a row-major 2-D host tensor, without copying. */
function firstRows(t: HostTensor, rows: number): HostTensor {
  const width = t.shape[1]!;
  return HostTensor.from(t.dtype, [rows, width], t.data.subarray(0, rows * width) as HostTensor['data']);
}

/**
 * The received rows of a [E_l, R·T_max, H] tensor, packed as [E_l, most rows of any expert, H];
 * `layoutRange` is the dispatch handle's packedRecvLayoutRange.
 */
function receivedRows(x: HostTensor, layoutRange: HostTensor): HostTensor {
  const [localExperts, slots, hidden] = x.shape as [number, number, number];
  const ranges = layoutRange.data as BigInt64Array;
  const numRanks = layoutRange.shape[1]!;
  const used = new Int32Array(localExperts);
  for (let e = 0; e < localExperts; e++) {
    for (let s = 0; s < numRanks; s++) {
      const range = ranges[e * numRanks + s]!;
      used[e] = Math.max(used[e]!, Number((range >> 32n) + (range & 0xffffffffn)));
    }
  }
  const rows = Math.max(0, ...used);
  const out = HostTensor.empty('bf16', [localExperts, rows, hidden]);
  const src = x.data as Uint16Array;
  for (let e = 0; e < localExperts; e++) {
    out.data.set(src.subarray(e * slots * hidden, (e * slots + used[e]!) * hidden), e * rows * hidden);
  }
  return out;
}
