// What a low-latency call does on the host before its transport moves any data, the same over NVLink
// (low-latency.ts) and NCCL (nccl-low-latency.ts): the buffer's capacity limits, the call's device tensors
// checked against the buffer's shape, the kernels' flags, the handle, and one-shot receive hooks. EpBuffer
// has validated the request; these checks only keep the kernels inside their buffers.

import type { DeviceTensor } from '../../device/device-tensor.ts';
import { TsepError, ValidationError } from '../../errors.ts';
import type {
  EpEvent,
  HandleOwner,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
  LowLatencyHandle,
  RecvHook,
  ResolvedEpBufferOptions,
} from '../types.ts';
import type { LlPayload, LlShape } from './ll-layout.ts';
import type { DispatchViews } from './ll-outputs.ts';
import type { GpuRuntime } from './runtime.ts';

/** Threads per block of every low-latency kernel (LL_THREADS in kernels/ll_core.cuh). */
export const LL_THREADS = 512;
const LL_WARPS = LL_THREADS / 32;

/** Per-call flags of the kernels (kernels/ll_core.cuh LL_FLAG_*). */
export const LL_FLAG = { fp8: 1, round: 2, ue8m0: 4, idx64: 8 } as const;

/**
 * The low-latency shape of a buffer of `numRanks` ranks. The receive scan keeps two words per (source,
 * token) slot in shared memory and a token index in 16 bits: `maxTokensPerRank` ≤ 65535 and
 * R·maxTokensPerRank ≤ 16384, whatever the transport.
 */
export function llBufferShape(
  numRanks: number,
  options: Pick<ResolvedEpBufferOptions, 'numExperts' | 'hidden' | 'maxTokensPerRank' | 'numTopk'>,
): LlShape {
  const T = options.maxTokensPerRank;
  if (T > 65535 || numRanks * T > 16384) {
    throw new ValidationError(
      'maxTokensPerRank',
      String(T),
      `at most 65535 and ranks × maxTokensPerRank ≤ 16384 for the low-latency mode (${numRanks} ranks)`,
    );
  }
  return {
    numRanks,
    localExperts: options.numExperts / numRanks,
    hidden: options.hidden,
    maxTokensPerRank: T,
    numTopk: options.numTopk,
  };
}

/** Launch shapes of the phases; defaults follow the SM count. Benchmarks may change them between calls. */
export interface LlGrids {
  /** Most blocks of the dispatch send phase (fewer when there are fewer token chunks). */
  dispatchSendBlocks: number;
  /** Blocks per local expert in the dispatch receive phase. */
  dispatchRecvParts: number;
  combineSendBlocks: number;
  /** Most blocks of the combine receive phase. */
  combineRecvBlocks: number;
}

export function defaultLlGrids(sms: number, localExperts: number): LlGrids {
  return {
    dispatchSendBlocks: 2 * sms,
    // About two resident 512-thread blocks per SM in all.
    dispatchRecvParts: Math.max(1, Math.floor((2 * sms) / localExperts)),
    combineSendBlocks: sms,
    combineRecvBlocks: 4 * sms,
  };
}

/** Blocks of a dispatch send phase: a warp per (token, 512 channels), at most `g.dispatchSendBlocks`. */
export function dispatchSendGrid(g: LlGrids, T: number, hidden: number): number {
  return Math.max(1, Math.min(g.dispatchSendBlocks, Math.ceil((T * Math.ceil(hidden / 512)) / LL_WARPS)));
}

/** Blocks of a combine receive phase: a thread per (token, 8 channels), at most `g.combineRecvBlocks`. */
export function combineRecvGrid(g: LlGrids, T: number, hidden: number): number {
  return Math.max(1, Math.min(g.combineRecvBlocks, Math.ceil((T * (hidden / 8)) / LL_THREADS)));
}

/**
 * Dynamic shared memory of the dispatch receive phase (two words per (source, token) slot) and of the
 * combine send phase (each local expert's row range per source, and their prefix).
 */
export function llSharedBytes(shape: LlShape): { dispatchRecv: number; combineSend: number } {
  const { numRanks: R, localExperts: El, maxTokensPerRank: T } = shape;
  return { dispatchRecv: 8 * R * T, combineSend: 4 * (2 * El * R + El + 1) };
}

/** The GPU backend's low-latency handle: the public fields plus what the combine kernels need. */
export class GpuLowLatencyHandle implements LowLatencyHandle {
  readonly kind = 'low-latency';
  readonly owner: HandleOwner;
  readonly numTokens: number;
  readonly packedRecvSrcInfo: DeviceTensor;
  readonly packedRecvLayoutRange: DeviceTensor;
  /** [E_l, R·T_max] i32 (a bit mask): the source's top-k slots that chose this row's expert (bit k = slot k). */
  readonly recvKMask: DeviceTensor;
  /** The path that made it: a combine takes only its own path's handles. */
  readonly path: object;

  /** Its tensors are views into the path's output ring, which the path owns: nothing to free. */
  dispose(): void {}

  constructor(
    path: object,
    owner: HandleOwner,
    numTokens: number,
    srcInfo: DeviceTensor,
    layoutRange: DeviceTensor,
    kmask: DeviceTensor,
  ) {
    this.path = path;
    this.owner = owner;
    this.numTokens = numTokens;
    this.packedRecvSrcInfo = srcInfo;
    this.packedRecvLayoutRange = layoutRange;
    this.recvKMask = kmask;
  }
}

/** `T` with its readonly fields writable, to build a result field by field. */
type Mutable<T> = { -readonly [K in keyof T]: T[K] };

/** A dispatch's result: the outputs of its ring set, the handle over them, its event and hook. */
export function llDispatchResult(
  path: object,
  owner: HandleOwner,
  T: number,
  views: DispatchViews,
  event: EpEvent,
  hook: RecvHook | undefined,
): LowLatencyDispatchResult {
  // Optional fields are set only when present (the result has no undefined keys), without object spreads:
  // this runs on every call of the decode path.
  const result: Mutable<LowLatencyDispatchResult> = {
    recvX: views.recvX,
    recvCount: views.recvCount,
    handle: new GpuLowLatencyHandle(path, owner, T, views.srcInfo, views.range, views.kmask),
    event,
  };
  if (views.recvScales) result.recvScales = views.recvScales;
  if (hook) result.hook = hook;
  return result;
}

/** A combine's result: its output, event and (with a receive hook) the hook, set only when present. */
export function llCombineResult(
  combinedX: DeviceTensor,
  event: EpEvent,
  hook: RecvHook | undefined,
): LowLatencyCombineResult {
  const result: Mutable<LowLatencyCombineResult> = {
    combinedX,
    event,
  };
  if (hook) result.hook = hook;
  return result;
}

function checkTokens(shape: LlShape, T: number, K: number): void {
  if (T > shape.maxTokensPerRank)
    throw new ValidationError('tokens', String(T), `at most ${shape.maxTokensPerRank}`);
  if (K < 1 || K > shape.numTopk) throw new ValidationError('topk', String(K), `1 to ${shape.numTopk}`);
}

export interface LlDispatchInputs {
  x: DeviceTensor;
  topk: DeviceTensor;
  T: number;
  K: number;
  /** LL_FLAG bits of the call. */
  flags: number;
  kind: LlPayload;
}

export function llDispatchInputs(
  rt: GpuRuntime,
  shape: LlShape,
  req: LowLatencyDispatchRequest,
): LlDispatchInputs {
  const x = rt.onDevice('x', req.x);
  const topk = rt.onDevice('topkIdx', req.topkIdx);
  const [T, K] = topk.shape as [number, number];
  checkTokens(shape, T, K);
  if (x.shape.length !== 2 || x.shape[0] !== T || x.shape[1] !== shape.hidden) {
    throw new ValidationError('x', `shape [${x.shape.join(', ')}]`, `[${T}, ${shape.hidden}]`);
  }
  const flags =
    (req.fp8 ? LL_FLAG.fp8 : 0) |
    (req.roundScale || req.ue8m0 ? LL_FLAG.round : 0) |
    (req.ue8m0 ? LL_FLAG.ue8m0 : 0) |
    (topk.dtype === 'i64' ? LL_FLAG.idx64 : 0);
  return { x, topk, T, K, flags, kind: req.fp8 ? 'fp8' : 'bf16' };
}

export interface LlCombineInputs {
  x: DeviceTensor;
  topk: DeviceTensor;
  weights: DeviceTensor;
  T: number;
  K: number;
  /** LL_FLAG bits of the call (the index width). */
  flags: number;
  handle: GpuLowLatencyHandle;
}

/** The combine's tensors, and its handle checked to come from `path`'s dispatch. */
export function llCombineInputs(
  rt: GpuRuntime,
  shape: LlShape,
  req: LowLatencyCombineRequest,
  path: object,
): LlCombineInputs {
  const handle = req.handle;
  if (!(handle instanceof GpuLowLatencyHandle) || handle.path !== path) {
    throw new ValidationError(
      'handle',
      'a handle from another buffer or backend',
      "the handle of this buffer's lowLatencyDispatch",
    );
  }
  const x = rt.onDevice('x', req.x);
  const topk = rt.onDevice('topkIdx', req.topkIdx);
  const weights = rt.onDevice('topkWeights', req.topkWeights);
  const [T, K] = topk.shape as [number, number];
  checkTokens(shape, T, K);
  const [e, rows, h] = x.shape;
  if (
    x.shape.length !== 3 ||
    e !== shape.localExperts ||
    rows !== shape.numRanks * shape.maxTokensPerRank ||
    h !== shape.hidden
  ) {
    throw new ValidationError('x', `shape [${x.shape.join(', ')}]`, 'the dispatch layout [E_l, R·T_max, H]');
  }
  return { x, topk, weights, T, K, flags: topk.dtype === 'i64' ? LL_FLAG.idx64 : 0, handle };
}

/**
 * A receive hook that runs `recv` once. `check` runs first on every call and throws when the hook may not
 * run (the path is gone, or its data is no longer there).
 */
export function hookOnce(what: string, check: () => void, recv: () => void): RecvHook {
  let called = false;
  return () => {
    if (called) throw new TsepError('TSEP_UNSUPPORTED', `This low-latency ${what} hook was already called.`);
    check();
    called = true;
    recv();
  };
}
