// EpBuffer: the public entry point. It validates every call (src/ep/validate.ts), then hands a
// well-formed request to the backend chosen at creation (src/ep/select.ts).

import type { Stream } from '../device/stream.ts';
import type { Group } from '../dist/group.ts';
import { DisposedError, ValidationError } from '../errors.ts';
import { selectBackend } from './select.ts';
import type {
  BackendName,
  ChosenTransport,
  CombineArgs,
  CombineResult,
  DispatchArgs,
  DispatchLayout,
  DispatchResult,
  EpBackend,
  EpBufferOptions,
  EpDataCall,
  EpSizeHint,
  HandleOwner,
  LowLatencyCombineArgs,
  LowLatencyCombineResult,
  LowLatencyDispatchArgs,
  LowLatencyDispatchResult,
  ResolvedEpBufferOptions,
  Tensor,
} from './types.ts';
import {
  checkLayoutRequest,
  checkLowLatencyMode,
  checkTopkIdx,
  resolveOptions,
  type ValidationContext,
  validateCombine,
  validateDispatch,
  validateLowLatencyCombine,
  validateLowLatencyDispatch,
} from './validate.ts';

let buffersCreated = 0;

export class EpBuffer {
  readonly rank: number;
  readonly numRanks: number;
  readonly options: ResolvedEpBufferOptions;
  /** The backend serving this buffer. */
  readonly backend: BackendName;
  private readonly impl: EpBackend;
  private readonly ctx: ValidationContext;
  private destroying: Promise<void> | undefined;

  private constructor(group: Group, options: ResolvedEpBufferOptions, impl: EpBackend, owner: HandleOwner) {
    this.rank = group.rank;
    this.numRanks = group.size;
    this.options = options;
    this.backend = impl.name;
    this.impl = impl;
    this.ctx = {
      options,
      numRanks: group.size,
      owner,
      ...(impl.checkTensor ? { checkTensor: impl.checkTensor.bind(impl) } : {}),
    };
  }

  /**
   * Creates the buffer on every rank of `group` (a collective: all ranks call it, with the same
   * options). Throws ValidationError for bad or mismatched options, TsepError 'TSEP_NO_GPU' for
   * backend 'gpu' without a GPU backend.
   */
  static async create(group: Group, options: EpBufferOptions): Promise<EpBuffer> {
    const resolved = await agreeOnOptions(group, options);
    const factory = await selectBackend(resolved.backend, group);
    let buffer: EpBuffer | undefined;
    const owner: HandleOwner = {
      label: `EpBuffer #${++buffersCreated} (rank ${group.rank} of ${group.size}, ${factory.name} backend)`,
      get destroyed() {
        return buffer?.destroyed ?? false;
      },
    };
    const impl = await factory.create({ group, options: resolved, owner });
    buffer = new EpBuffer(group, resolved, impl, owner);
    return buffer;
  }

  /** Experts on each rank (E / R). */
  get numLocalExperts(): number {
    return this.options.numExperts / this.numRanks;
  }

  /** Per-rank and per-expert token counts and the token-to-rank map of `topkIdx` [T, K]. */
  getDispatchLayout(topkIdx: Tensor, numExperts: number): DispatchLayout {
    this.checkAlive('getDispatchLayout');
    checkLayoutRequest(numExperts, this.ctx);
    checkTopkIdx('topkIdx', topkIdx, this.ctx);
    return this.impl.getDispatchLayout(topkIdx);
  }

  /** Normal-mode dispatch; resolves once the received row count is known (at once with worstCaseTokens). */
  async dispatch(args: DispatchArgs): Promise<DispatchResult> {
    this.checkAlive('dispatch');
    return this.refusable('dispatch', () =>
      this.impl.dispatch(validateDispatch(args, this.ctx, (topkIdx) => this.impl.getDispatchLayout(topkIdx))),
    );
  }

  /** Normal-mode combine: the unweighted sum of each token's returned rows (+ bias). */
  async combine(args: CombineArgs): Promise<CombineResult> {
    this.checkAlive('combine');
    return this.refusable('combine', () => this.impl.combine(validateCombine(args, this.ctx)));
  }

  /** Low-latency dispatch into [E_l, R·T_max, H]; returns at once (outputs ready when `event` is). */
  lowLatencyDispatch(args: LowLatencyDispatchArgs): LowLatencyDispatchResult {
    this.checkAlive('lowLatencyDispatch');
    return this.refusable('lowLatencyDispatch', () =>
      this.impl.lowLatencyDispatch(validateLowLatencyDispatch(args, this.ctx)),
    );
  }

  /** Low-latency combine: Σ_k w·y per token; returns at once (output ready when `event` is). */
  lowLatencyCombine(args: LowLatencyCombineArgs): LowLatencyCombineResult {
    this.checkAlive('lowLatencyCombine');
    return this.refusable('lowLatencyCombine', () =>
      this.impl.lowLatencyCombine(validateLowLatencyCombine(args, this.ctx)),
    );
  }

  /** Resets low-latency signal state (needed on the GPU after normal calls used the same memory). */
  cleanLowLatencyBuffer(): void {
    this.checkAlive('cleanLowLatencyBuffer');
    checkLowLatencyMode(this.ctx, 'cleanLowLatencyBuffer');
    this.impl.cleanLowLatencyBuffer();
  }

  /** Communication memory per rank that each enabled mode needs. */
  /**
   * The stream this buffer's GPU kernels run on (DeepEP's comm stream): record events on it, or capture
   * it into a CUDA graph. Undefined on the CPU backend.
   */
  get stream(): Stream | undefined {
    return this.impl.stream;
  }

  /** GPU backend: 'nvlink' or 'nccl' (see the `transport` option) and why; undefined on the CPU backend. */
  get transport(): { readonly transport: ChosenTransport; readonly reason: string } | undefined {
    return this.impl.transport;
  }

  /**
   * Sets how many SMs a normal-mode dispatch or combine uses (GPU backend; default 24): over NVLink its send
   * kernel and the receive or reduce kernel beside it together; over NCCL the dispatch's pack kernel.
   * Every rank must use the same value. The CPU backend ignores it.
   */
  setNumSms(n: number): void {
    this.checkAlive('setNumSms');
    if (!Number.isSafeInteger(n) || n < 1)
      throw new ValidationError('numSms', String(n), 'a positive integer');
    this.impl.setNumSms?.(n);
  }

  /**
   * Collective (every rank calls it): after an EpTimeoutError (a rank died, skipped a call or made a
   * different one), brings the buffer back to a usable state without re-creating the process group: waits
   * for this rank's bounded kernels to end, clears every rank's device-side state and error record.
   * Results and handles of earlier calls must not be reused afterwards. The CPU backend has no device
   * state and resolves at once.
   */
  async reset(): Promise<void> {
    this.checkAlive('reset');
    await this.impl.reset?.();
  }

  /**
   * Where the device time of the latest normal-mode call went: milliseconds per kernel (notify or
   * barrier, send, receive; combine send, reduce). GPU backend with TSEP_PROFILE=1 only (profiling adds
   * timing events between the kernels); undefined otherwise. Waits for the call to finish.
   */
  phaseTimes(): Promise<Record<string, number> | undefined> {
    this.checkAlive('phaseTimes');
    return this.impl.phaseTimes?.() ?? Promise.resolve(undefined);
  }

  sizeHint(): EpSizeHint {
    this.checkAlive('sizeHint');
    return this.impl.sizeHint();
  }

  get destroyed(): boolean {
    return this.destroying !== undefined;
  }

  /** Waits for work in flight and releases the backend; later calls throw DisposedError. Idempotent. */
  destroy(): Promise<void> {
    this.destroying ??= this.impl.destroy();
    return this.destroying;
  }

  /**
   * Runs a data call's start. When it throws here, before its communication started (bad arguments), the
   * backend hears of it, so peers making the same call fail too instead of pairing it with this rank's
   * next call. Only a synchronous throw is caught: an async call's promise is returned, not awaited.
   */
  private refusable<T>(call: EpDataCall, start: () => T): T {
    try {
      return start();
    } catch (e) {
      this.impl.refuseCall?.(call, e);
      throw e;
    }
  }

  private checkAlive(call: string): void {
    if (this.destroying) throw new DisposedError(`${this.ctx.owner.label} (${call})`);
  }
}

/**
 * Resolves this rank's options and checks that every rank resolved the same ones. Every rank takes
 * part in the exchange even when its own options are invalid, so all ranks fail together.
 */
async function agreeOnOptions(group: Group, options: EpBufferOptions): Promise<ResolvedEpBufferOptions> {
  let resolved: ResolvedEpBufferOptions | undefined;
  let failure: unknown;
  try {
    resolved = resolveOptions(options, group.size, group.localSize);
  } catch (error) {
    failure = error;
  }
  const mine = JSON.stringify(
    resolved ?? { invalid: failure instanceof Error ? failure.message : String(failure) },
  );
  const all = (await group.allGather(new TextEncoder().encode(mine))).map((b) => new TextDecoder().decode(b));
  if (!resolved) throw failure;
  const other = all.findIndex((o) => o !== mine);
  if (other >= 0) {
    throw new ValidationError(
      'options',
      `${all[other]} on rank ${other} but ${mine} on rank ${group.rank}`,
      'the same options on every rank',
    );
  }
  return resolved;
}
