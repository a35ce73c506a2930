// Reference for normal-mode dispatch, computed per destination rank from every rank's inputs. The
// received rows are ordered by source rank ascending, then by the token's index in its source batch;
// a token reaches a rank once however many of its experts live there.

import { HostTensor } from '../device/tensor.ts';
import { copyRow, type IndexDType, indexTensor, indexValues, rowMajorData } from './tensor-io.ts';

/** What one rank contributes to a dispatch. */
export interface DispatchSource {
  /** [T, H] bf16 or fp8_e4m3. */
  x: HostTensor;
  /** [T, S] f32 or [T, W] i32, any strides; with fp8 x. */
  scales?: HostTensor;
  /** [T, K] i32/i64; absent for a cached dispatch (then every rank omits it). */
  topkIdx?: HostTensor;
  /** [T, K] f32; only with topkIdx. */
  topkWeights?: HostTensor;
  /** [T, R] bool: routing (from the layout, or the handle of a cached dispatch). */
  isTokenInRank: HostTensor;
  /** [E] i32 from the layout; absent for a cached dispatch. */
  numTokensPerExpert?: HostTensor;
}

export interface DispatchConfig {
  numExperts: number;
  /** Per-expert counts are rounded up to a multiple of this. */
  expertAlignment: number;
  /** > 0: outputs get exactly this many rows and the per-expert list is empty. */
  worstCaseTokens: number;
}

export interface DispatchReceived {
  /** [rows, H] in x's dtype; unused rows (worst-case mode) are zero. */
  recvX: HostTensor;
  /** [rows, S or W] row-major in the scales' dtype; unused rows zero. */
  recvScales?: HostTensor;
  /** [rows, K] in topkIdx's dtype: local ids, -1 elsewhere and on unused rows. */
  recvTopkIdx?: HostTensor;
  /** [rows, K] f32: zero where recvTopkIdx is -1. */
  recvTopkWeights?: HostTensor<'f32'>;
  /** Rows actually received (≤ rows). */
  numRecvTokens: number;
  /** Aligned count per local expert; empty in worst-case mode or without numTokensPerExpert. */
  numRecvTokensPerExpert: number[];
  /** [R, R] i32, inclusive prefix over source ranks of tokens sent to each rank. */
  rankPrefixMatrix: HostTensor<'i32'>;
  /** [rows] i32: source token index of each row, -1 on unused rows. */
  recvSrcIdx: HostTensor<'i32'>;
}

/** [i][j] = Σ_{i' ≤ i} number of tokens rank i' sends to rank j. */
export function rankPrefixMatrix(isTokenInRank: readonly HostTensor[]): HostTensor<'i32'> {
  const R = isTokenInRank.length;
  const m = HostTensor.zeros('i32', [R, R]);
  for (let i = 0; i < R; i++) {
    const map = rowMajorData(isTokenInRank[i]!) as Uint8Array;
    const T = isTokenInRank[i]!.shape[0]!;
    for (let j = 0; j < R; j++) {
      let sent = 0;
      for (let t = 0; t < T; t++) sent += map[t * R + j]!;
      m.data[i * R + j] = (i > 0 ? m.data[(i - 1) * R + j]! : 0) + sent;
    }
  }
  return m;
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

/** What rank `rank` receives. */
export function dispatchToRank(
  sources: readonly DispatchSource[],
  rank: number,
  config: DispatchConfig,
): DispatchReceived {
  const R = sources.length;
  const expertsPerRank = config.numExperts / R;
  const first = sources[0]!;
  const hidden = first.x.shape[1]!;

  // The received rows, in order: (source rank, source token).
  const rowSrc: number[] = [];
  const rowTok: number[] = [];
  for (let s = 0; s < R; s++) {
    const map = rowMajorData(sources[s]!.isTokenInRank) as Uint8Array;
    const T = sources[s]!.x.shape[0]!;
    for (let t = 0; t < T; t++) {
      if (map[t * R + rank]) {
        rowSrc.push(s);
        rowTok.push(t);
      }
    }
  }
  const n = rowSrc.length;
  if (config.worstCaseTokens > 0 && n > config.worstCaseTokens) {
    throw new RangeError(`rank ${rank} receives ${n} rows but worstCaseTokens is ${config.worstCaseTokens}`);
  }
  const rows = config.worstCaseTokens > 0 ? config.worstCaseTokens : n;

  const recvX = HostTensor.zeros(first.x.dtype, [rows, hidden]);
  const xs = sources.map((s) => rowMajorData(s.x));
  for (let i = 0; i < n; i++) copyRow(xs[rowSrc[i]!]!, rowTok[i]!, recvX.data, i, hidden);

  let recvScales: HostTensor | undefined;
  if (first.scales) {
    const width = first.scales.shape[1]!;
    recvScales = HostTensor.zeros(first.scales.dtype, [rows, width]);
    const ss = sources.map((s) => rowMajorData(s.scales!));
    for (let i = 0; i < n; i++) copyRow(ss[rowSrc[i]!]!, rowTok[i]!, recvScales.data, i, width);
  }

  let recvTopkIdx: HostTensor | undefined;
  let recvTopkWeights: HostTensor<'f32'> | undefined;
  if (first.topkIdx) {
    const K = first.topkIdx.shape[1]!;
    const ids = sources.map((s) => indexValues(s.topkIdx!));
    const weights = first.topkWeights ? sources.map((s) => rowMajorData(s.topkWeights!) as Float32Array) : [];
    const local = new Int32Array(rows * K).fill(-1);
    if (first.topkWeights) recvTopkWeights = HostTensor.zeros('f32', [rows, K]);
    for (let i = 0; i < n; i++) {
      for (let k = 0; k < K; k++) {
        const at = rowTok[i]! * K + k;
        const e = ids[rowSrc[i]!]![at]!;
        if (e < 0 || Math.floor(e / expertsPerRank) !== rank) continue;
        local[i * K + k] = e - rank * expertsPerRank;
        if (recvTopkWeights) recvTopkWeights.data[i * K + k] = weights[rowSrc[i]!]![at]!;
      }
    }
    recvTopkIdx = indexTensor(first.topkIdx.dtype as IndexDType, [rows, K], local);
  }

  const numRecvTokensPerExpert: number[] = [];
  if (config.worstCaseTokens === 0 && first.numTokensPerExpert) {
    const counts = sources.map((s) => rowMajorData(s.numTokensPerExpert!) as Int32Array);
    for (let e = 0; e < expertsPerRank; e++) {
      let c = 0;
      for (let s = 0; s < R; s++) c += counts[s]![rank * expertsPerRank + e]!;
      numRecvTokensPerExpert.push(alignUp(c, config.expertAlignment));
    }
  }

  const recvSrcIdx = HostTensor.from('i32', [rows], new Int32Array(rows).fill(-1));
  for (let i = 0; i < n; i++) recvSrcIdx.data[i] = rowTok[i]!;

  const result: DispatchReceived = {
    recvX,
    numRecvTokens: n,
    numRecvTokensPerExpert,
    rankPrefixMatrix: rankPrefixMatrix(sources.map((s) => s.isTokenInRank)),
    recvSrcIdx,
  };
  if (recvScales) result.recvScales = recvScales;
  if (recvTopkIdx) result.recvTopkIdx = recvTopkIdx;
  if (recvTopkWeights) result.recvTopkWeights = recvTopkWeights;
  return result;
}

/** What every rank receives, indexed by rank. */
export function referenceDispatch(
  sources: readonly DispatchSource[],
  config: DispatchConfig,
): DispatchReceived[] {
  return sources.map((_, r) => dispatchToRank(sources, r, config));
}
