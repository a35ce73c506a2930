// Argument validation shared by every backend. It reads tensor metadata only (dtype, shape, strides),
// so it works on device tensors too; `checkTopkIdxValues` is the one check that reads values and runs
// on host tensors only (the GPU backend range-checks device tensors itself). Every failure throws a
// ValidationError naming the argument, what it got and what it needs, before any work starts.

import { indexValues } from '../cpu/tensor-io.ts';
import type { DType } from '../device/dtypes.ts';
import { fp8ScaleCount, ue8m0WordCount } from '../device/dtypes.ts';
import { describe, HostTensor, isContiguous, type TensorMeta } from '../device/tensor.ts';
import { ValidationError } from '../errors.ts';
import type {
  BackendKind,
  CombineArgs,
  CombineRequest,
  DispatchArgs,
  DispatchHandle,
  DispatchLayout,
  DispatchRequest,
  EpBufferOptions,
  EpMode,
  HandleOwner,
  LowLatencyCombineArgs,
  LowLatencyCombineRequest,
  LowLatencyDispatchArgs,
  LowLatencyDispatchRequest,
  LowLatencyHandle,
  ResolvedEpBufferOptions,
  Tensor,
  TransportKind,
} from './types.ts';

/** Largest top-k the API accepts. */
export const MAX_TOPK = 32;

export interface ValidationContext {
  readonly options: ResolvedEpBufferOptions;
  readonly numRanks: number;
  readonly owner: HandleOwner;
  /** The backend's placement check (memory kind, GPU, contiguity unless `strided`); throws ValidationError. */
  readonly checkTensor?: (argument: string, t: TensorMeta, strided: boolean) => void;
}

const MODES: readonly EpMode[] = ['normal', 'low-latency', 'both'];
const BACKENDS: readonly BackendKind[] = ['cpu', 'gpu', 'auto'];
const TRANSPORTS: readonly TransportKind[] = ['auto', 'nvlink', 'nccl', 'nvshmem'];

function show(value: unknown): string {
  if (typeof value === 'string') return `'${value}'`;
  if (value === undefined || value === null || typeof value !== 'object') return String(value);
  return isTensorMeta(value) ? describe(value) : 'an object';
}

function isTensorMeta(value: unknown): value is TensorMeta {
  const t = value as Partial<TensorMeta> | null;
  return (
    typeof t === 'object' &&
    t !== null &&
    typeof t.dtype === 'string' &&
    Array.isArray(t.shape) &&
    Array.isArray(t.strides) &&
    typeof t.device === 'object'
  );
}

function isInt(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value);
}

function checkInt(argument: string, value: unknown, min: number, need: string): number {
  if (!isInt(value) || value < min) throw new ValidationError(argument, show(value), need);
  return value;
}

function checkBool(argument: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') throw new ValidationError(argument, show(value), 'true or false');
  return value;
}

/**
 * Checks dtype, shape and (optionally) row-major layout. Shape entries are exact sizes, or names of
 * free dimensions used only in the message.
 */
export function checkTensor(
  argument: string,
  t: unknown,
  dtypes: readonly DType[],
  shape: readonly (number | string)[],
  rowMajor: boolean,
): asserts t is TensorMeta {
  // Runs on every call of the hot paths: the message is built only when the check fails.
  if (!isTensorMeta(t)) {
    throw new ValidationError(argument, show(t), `a tensor: ${tensorNeed(dtypes, shape, rowMajor)}`);
  }
  const ok =
    dtypes.includes(t.dtype) &&
    t.shape.length === shape.length &&
    shape.every((d, i) => typeof d === 'string' || t.shape[i] === d) &&
    (!rowMajor || isContiguous(t));
  if (!ok) throw new ValidationError(argument, describe(t), tensorNeed(dtypes, shape, rowMajor));
}

function tensorNeed(
  dtypes: readonly DType[],
  shape: readonly (number | string)[],
  rowMajor: boolean,
): string {
  return `${dtypes.join(' or ')} [${shape.join(', ')}]${rowMajor ? ', row-major' : ''}`;
}

function checkAbsent(argument: string, value: unknown, need: string): void {
  if (value !== undefined) throw new ValidationError(argument, show(value), need);
}

// ------------------------------------------------------------------------------------------- options

/** `localRanks`: the ranks the launcher started on this machine (LOCAL_WORLD_SIZE). */
export function resolveOptions(
  options: EpBufferOptions,
  numRanks: number,
  localRanks = numRanks,
): ResolvedEpBufferOptions {
  if (typeof options !== 'object' || options === null) {
    throw new ValidationError(
      'options',
      show(options),
      'an object with hidden, maxTokensPerRank, numExperts, numTopk',
    );
  }
  const hidden = checkInt('hidden', options.hidden, 1, 'a positive integer');
  if (hidden % 16 !== 0) {
    throw new ValidationError('hidden', String(hidden), 'a multiple of 16 (rows are whole 16-byte vectors)');
  }
  const maxTokensPerRank = checkInt('maxTokensPerRank', options.maxTokensPerRank, 1, 'a positive integer');
  const numExperts = checkInt('numExperts', options.numExperts, 1, 'a positive integer');
  if (numExperts % numRanks !== 0) {
    throw new ValidationError(
      'numExperts',
      String(numExperts),
      `a multiple of the number of ranks (${numRanks})`,
    );
  }
  const numTopk = checkInt('numTopk', options.numTopk, 1, `an integer in [1, ${MAX_TOPK}]`);
  if (numTopk > Math.min(MAX_TOPK, numExperts)) {
    throw new ValidationError(
      'numTopk',
      String(numTopk),
      `at most min(${MAX_TOPK}, numExperts = ${numExperts})`,
    );
  }
  const mode = options.mode ?? 'normal';
  if (!MODES.includes(mode))
    throw new ValidationError('mode', show(mode), `one of ${MODES.map(show).join(', ')}`);
  const backend = options.backend ?? 'auto';
  if (!BACKENDS.includes(backend)) {
    throw new ValidationError('backend', show(backend), `one of ${BACKENDS.map(show).join(', ')}`);
  }
  const transport = options.transport ?? 'auto';
  if (!TRANSPORTS.includes(transport)) {
    throw new ValidationError('transport', show(transport), `one of ${TRANSPORTS.map(show).join(', ')}`);
  }
  const fp8 = checkBool('fp8', options.fp8, false);
  const need = `a divisor of the ranks on this machine (${localRanks}), which ranks are laid out by`;
  const ranksPerHost = checkInt('ranksPerHost', options.ranksPerHost ?? localRanks, 1, need);
  if (localRanks % ranksPerHost !== 0) throw new ValidationError('ranksPerHost', String(ranksPerHost), need);
  return { hidden, maxTokensPerRank, numExperts, numTopk, mode, fp8, backend, transport, ranksPerHost };
}

function checkMode(ctx: ValidationContext, family: 'normal' | 'low-latency', call: string): void {
  const mode = ctx.options.mode;
  if (mode !== 'both' && mode !== family) {
    throw new ValidationError('mode', `'${mode}' (this buffer's)`, `'${family}' or 'both' to call ${call}`);
  }
}

// ------------------------------------------------------------------------------------------- routing

/**
 * topkIdx: i32/i64 [T, K] row-major, 1 ≤ K ≤ numTopk, T ≤ maxTokensPerRank (and = numTokens if given);
 * the values too when it is a host tensor.
 */
export function checkTopkIdx(
  argument: string,
  t: unknown,
  ctx: ValidationContext,
  numTokens?: number,
): asserts t is TensorMeta {
  checkTensor(argument, t, ['i32', 'i64'], [numTokens ?? 'T', 'K'], true);
  const [T, K] = t.shape as [number, number];
  if (K < 1 || K > ctx.options.numTopk) {
    throw new ValidationError(argument, describe(t), `K in [1, numTopk = ${ctx.options.numTopk}]`);
  }
  checkTokenCount(argument, T, ctx);
  if (t instanceof HostTensor) checkTopkIdxValues(argument, t, ctx.options.numExperts);
}

function checkTokenCount(argument: string, T: number, ctx: ValidationContext): void {
  if (T > ctx.options.maxTokensPerRank) {
    throw new ValidationError(
      argument,
      `${T} tokens`,
      `at most maxTokensPerRank = ${ctx.options.maxTokensPerRank}`,
    );
  }
}

/**
 * Host-side value check of a topkIdx tensor: every entry in [-1, numExperts), and no expert twice in one
 * token's row. Reads the data, so only for host tensors.
 */
export function checkTopkIdxValues(argument: string, t: HostTensor, numExperts: number): void {
  const ids = indexValues(t);
  const K = t.shape[1]!;
  for (let row = 0; row * K < ids.length; row++) {
    for (let k = 0; k < K; k++) {
      const e = ids[row * K + k]!;
      if (e < -1 || e >= numExperts) {
        throw new ValidationError(
          `${argument}[${row}, ${k}]`,
          String(e),
          `-1 or an expert id in [0, ${numExperts})`,
        );
      }
      for (let j = 0; j < k && e >= 0; j++) {
        if (ids[row * K + j] === e) {
          throw new ValidationError(
            `${argument}[${row}]`,
            `expert ${e} twice`,
            'distinct experts per token (or -1)',
          );
        }
      }
    }
  }
}

function checkWeights(argument: string, t: unknown, rows: number | string, K: number | string): void {
  checkTensor(argument, t, ['f32'], [rows, K], true);
}

export function checkLayoutRequest(numExperts: unknown, ctx: ValidationContext): void {
  if (numExperts !== ctx.options.numExperts) {
    throw new ValidationError(
      'numExperts',
      show(numExperts),
      `this buffer's numExperts (${ctx.options.numExperts})`,
    );
  }
}

function checkLayout(layout: DispatchLayout, T: number, ctx: ValidationContext): void {
  if (typeof layout !== 'object' || layout === null) {
    throw new ValidationError('layout', show(layout), 'the result of getDispatchLayout');
  }
  checkTensor('layout.numTokensPerRank', layout.numTokensPerRank, ['i32'], [ctx.numRanks], true);
  checkTensor(
    'layout.numTokensPerExpert',
    layout.numTokensPerExpert,
    ['i32'],
    [ctx.options.numExperts],
    true,
  );
  checkTensor('layout.isTokenInRank', layout.isTokenInRank, ['bool'], [T, ctx.numRanks], true);
}

function checkHandle<H extends DispatchHandle | LowLatencyHandle>(
  handle: unknown,
  kind: H['kind'],
  ctx: ValidationContext,
): asserts handle is H {
  const h = handle as Partial<DispatchHandle | LowLatencyHandle> | null;
  const from = kind === 'dispatch' ? 'dispatch' : 'lowLatencyDispatch';
  if (typeof h !== 'object' || h === null || h.kind !== kind) {
    const got =
      typeof h === 'object' && h !== null && typeof h.kind === 'string' ? `a ${h.kind} handle` : show(h);
    throw new ValidationError('handle', got, `the handle returned by this buffer's ${from}`);
  }
  if (h.owner !== ctx.owner) {
    const made = h.owner?.destroyed ? 'a destroyed EpBuffer' : 'another EpBuffer';
    throw new ValidationError(
      'handle',
      `a handle made by ${made} (${h.owner?.label ?? 'unknown'})`,
      `a handle returned by this buffer's ${from} (${ctx.owner.label})`,
    );
  }
}

// ------------------------------------------------------------------------------------------- payloads

/** x [T, H] bf16 or fp8 (with scales [T, S] f32 or [T, W] i32, any strides); returns T. */
function checkPayload(x: unknown, scales: unknown, ctx: ValidationContext): number {
  const H = ctx.options.hidden;
  checkTensor('x', x, ['bf16', 'fp8_e4m3'], ['T', H], true);
  const T = x.shape[0]!;
  checkTokenCount('x', T, ctx);
  if (x.dtype === 'bf16') {
    checkAbsent('scales', scales, 'no scales with bf16 x');
    return T;
  }
  const S = fp8ScaleCount(H);
  const W = ue8m0WordCount(H);
  const need = `f32 [${T}, ${S}] or UE8M0-packed i32 [${T}, ${W}] scales with fp8 x (any strides)`;
  if (!isTensorMeta(scales)) throw new ValidationError('scales', show(scales), need);
  const width = scales.dtype === 'f32' ? S : W;
  if (
    (scales.dtype !== 'f32' && scales.dtype !== 'i32') ||
    scales.shape.length !== 2 ||
    scales.shape[0] !== T ||
    scales.shape[1] !== width
  ) {
    throw new ValidationError('scales', describe(scales), need);
  }
  return T;
}

/** Validates a normal dispatch; `layoutOf` computes the layout when only topkIdx is given. */
export function validateDispatch(
  args: DispatchArgs,
  ctx: ValidationContext,
  layoutOf: (topkIdx: Tensor) => DispatchLayout,
): DispatchRequest {
  if (typeof args !== 'object' || args === null) throw new ValidationError('args', show(args), 'an object');
  checkMode(ctx, 'normal', 'dispatch');
  const T = checkPayload(args.x, args.scales, ctx);
  const base = {
    x: args.x,
    ...(args.scales ? { scales: args.scales } : {}),
    ...previous(args.previousEvent),
  };
  if (args.handle !== undefined) {
    checkHandle<DispatchHandle>(args.handle, 'dispatch', ctx);
    const replayed = 'omit with a handle: a cached dispatch replays the handle';
    checkAbsent('topkIdx', args.topkIdx, replayed);
    checkAbsent('topkWeights', args.topkWeights, replayed);
    checkAbsent('layout', args.layout, replayed);
    checkAbsent('expertAlignment', args.expertAlignment, replayed);
    checkAbsent('worstCaseTokens', args.worstCaseTokens, replayed);
    if (T !== args.handle.numTokens) {
      throw new ValidationError('x', `${T} tokens`, `the handle's ${args.handle.numTokens} tokens`);
    }
    return { kind: 'cached', ...base, handle: args.handle };
  }
  if (args.topkIdx !== undefined) checkTopkIdx('topkIdx', args.topkIdx, ctx, T);
  if (args.topkWeights !== undefined) {
    if (args.topkIdx === undefined)
      throw new ValidationError('topkWeights', 'weights without topkIdx', 'topkIdx too');
    checkWeights('topkWeights', args.topkWeights, T, args.topkIdx.shape[1]!);
  }
  if (args.layout === undefined && args.topkIdx === undefined) {
    throw new ValidationError('topkIdx', 'undefined', 'topkIdx or layout for a fresh dispatch (or a handle)');
  }
  if (args.layout !== undefined) checkLayout(args.layout, T, ctx);
  const expertAlignment =
    args.expertAlignment === undefined
      ? 1
      : checkInt('expertAlignment', args.expertAlignment, 1, 'a positive integer');
  const minWorst = ctx.numRanks * ctx.options.maxTokensPerRank;
  const worstCaseTokens =
    args.worstCaseTokens === undefined || args.worstCaseTokens === 0
      ? 0
      : checkInt(
          'worstCaseTokens',
          args.worstCaseTokens,
          minWorst,
          `0, or at least ranks × maxTokensPerRank = ${minWorst}`,
        );
  // Placement before the layout: computing it launches a kernel, and a refused call must launch nothing.
  if (args.layout === undefined && ctx.checkTensor) {
    ctx.checkTensor('x', args.x, false);
    if (args.scales) ctx.checkTensor('scales', args.scales, true);
    if (args.topkWeights) ctx.checkTensor('topkWeights', args.topkWeights, false);
  }
  return {
    kind: 'fresh',
    ...base,
    ...(args.topkIdx ? { topkIdx: args.topkIdx } : {}),
    ...(args.topkWeights ? { topkWeights: args.topkWeights } : {}),
    layout: args.layout ?? layoutOf(args.topkIdx!),
    expertAlignment,
    worstCaseTokens,
  };
}

function previous(event: unknown): { previousEvent?: NonNullable<DispatchArgs['previousEvent']> } {
  if (event === undefined) return {};
  const e = event as { query?: unknown; wait?: unknown } | null;
  if (typeof e !== 'object' || e === null || typeof e.wait !== 'function' || typeof e.query !== 'function') {
    throw new ValidationError('previousEvent', show(event), 'an event returned by an EpBuffer call');
  }
  return { previousEvent: event as NonNullable<DispatchArgs['previousEvent']> };
}

export function validateCombine(args: CombineArgs, ctx: ValidationContext): CombineRequest {
  if (typeof args !== 'object' || args === null) throw new ValidationError('args', show(args), 'an object');
  checkMode(ctx, 'normal', 'combine');
  checkHandle<DispatchHandle>(args.handle, 'dispatch', ctx);
  const { numRecvRows, numTokens } = args.handle;
  checkTensor('x', args.x, ['bf16'], [numRecvRows, ctx.options.hidden], true);
  if (args.topkWeights !== undefined) {
    checkWeights('topkWeights', args.topkWeights, numRecvRows, 'K');
    const K = args.topkWeights.shape[1]!;
    if (K < 1 || K > ctx.options.numTopk) {
      throw new ValidationError(
        'topkWeights',
        describe(args.topkWeights),
        `K in [1, numTopk = ${ctx.options.numTopk}]`,
      );
    }
  }
  const bias =
    args.bias === undefined ? [] : Array.isArray(args.bias) ? [...args.bias] : [args.bias as Tensor];
  if (bias.length > 2) throw new ValidationError('bias', `${bias.length} tensors`, 'one or two tensors');
  bias.forEach((b, i) => {
    checkTensor(bias.length > 1 ? `bias[${i}]` : 'bias', b, ['bf16'], [numTokens, ctx.options.hidden], true);
  });
  return {
    x: args.x,
    handle: args.handle,
    ...(args.topkWeights ? { topkWeights: args.topkWeights } : {}),
    bias,
    ...previous(args.previousEvent),
  };
}

export function validateLowLatencyDispatch(
  args: LowLatencyDispatchArgs,
  ctx: ValidationContext,
): LowLatencyDispatchRequest {
  if (typeof args !== 'object' || args === null) throw new ValidationError('args', show(args), 'an object');
  checkMode(ctx, 'low-latency', 'lowLatencyDispatch');
  const { hidden, maxTokensPerRank, numExperts } = ctx.options;
  checkTensor('x', args.x, ['bf16'], ['T', hidden], true);
  const T = args.x.shape[0]!;
  checkTokenCount('x', T, ctx);
  checkTopkIdx('topkIdx', args.topkIdx, ctx, T);
  if (args.maxTokensPerRank !== undefined && args.maxTokensPerRank !== maxTokensPerRank) {
    throw new ValidationError(
      'maxTokensPerRank',
      show(args.maxTokensPerRank),
      `this buffer's ${maxTokensPerRank}`,
    );
  }
  if (args.numExperts !== undefined && args.numExperts !== numExperts) {
    throw new ValidationError('numExperts', show(args.numExperts), `this buffer's ${numExperts}`);
  }
  const fp8 = checkBool('fp8', args.fp8, ctx.options.fp8);
  const ue8m0 = checkBool('ue8m0', args.ue8m0, false);
  const roundScale = checkBool('roundScale', args.roundScale, ue8m0);
  if (!fp8 && (ue8m0 || roundScale)) {
    throw new ValidationError(
      ue8m0 ? 'ue8m0' : 'roundScale',
      'true with fp8 off',
      'fp8: true (they shape FP8 scales)',
    );
  }
  if (ue8m0 && !roundScale) {
    throw new ValidationError(
      'roundScale',
      'false with ue8m0',
      'roundScale true or omitted: UE8M0 holds powers of two only',
    );
  }
  if (fp8 && hidden % 128 !== 0) {
    throw new ValidationError(
      'fp8',
      `true with hidden ${hidden}`,
      'hidden a multiple of 128 (whole 128-channel scale blocks)',
    );
  }
  const returnRecvHook = checkBool('returnRecvHook', args.returnRecvHook, false);
  return { x: args.x, topkIdx: args.topkIdx, fp8, roundScale, ue8m0, returnRecvHook };
}

export function validateLowLatencyCombine(
  args: LowLatencyCombineArgs,
  ctx: ValidationContext,
): LowLatencyCombineRequest {
  if (typeof args !== 'object' || args === null) throw new ValidationError('args', show(args), 'an object');
  checkMode(ctx, 'low-latency', 'lowLatencyCombine');
  checkHandle<LowLatencyHandle>(args.handle, 'low-latency', ctx);
  const { hidden, maxTokensPerRank, numExperts } = ctx.options;
  const localExperts = numExperts / ctx.numRanks;
  checkTensor('x', args.x, ['bf16'], [localExperts, ctx.numRanks * maxTokensPerRank, hidden], true);
  checkTopkIdx('topkIdx', args.topkIdx, ctx, args.handle.numTokens);
  checkWeights('topkWeights', args.topkWeights, args.handle.numTokens, args.topkIdx.shape[1]!);
  const returnRecvHook = checkBool('returnRecvHook', args.returnRecvHook, false);
  return {
    x: args.x,
    topkIdx: args.topkIdx,
    topkWeights: args.topkWeights,
    handle: args.handle,
    returnRecvHook,
  };
}

export function checkLowLatencyMode(ctx: ValidationContext, call: string): void {
  checkMode(ctx, 'low-latency', call);
}
