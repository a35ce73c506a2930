// Reference for low-latency dispatch and combine. Dispatch: for each local expert, rows from source
// ranks ascending, tokens ascending (GPU kernels may order blocks by arrival, so GPU results are
// compared as sets per expert); FP8 rows are quantized with quantizeFp8 from src/device/dtypes.ts.
// Combine: per token, acc = +0; for k ascending with a valid expert, acc = f32(acc + f32(w[t,k] · y));
// rounded to bf16 once. The product and the sum are separately rounded float32 operations (no FMA).

import {
  bf16ArrayToF32,
  bf16ToF32,
  f32ToBf16,
  fp8ScaleCount,
  quantizeFp8,
  ue8m0WordCount,
} from '../device/dtypes.ts';
import { HostTensor } from '../device/tensor.ts';
import { ValidationError } from '../errors.ts';
import { copyRow, indexValues, rowMajorData } from './tensor-io.ts';

export interface LowLatencyConfig {
  numExperts: number;
  maxTokensPerRank: number;
  fp8: boolean;
  roundScale: boolean;
  ue8m0: boolean;
}

/** One rank's dispatch input. */
export interface LowLatencySource {
  /** [T, H] bf16. */
  x: HostTensor;
  /** [T, K] i32/i64. */
  topkIdx: HostTensor;
}

export interface LowLatencyReceived {
  /** [E_l, R·T_max, H] fp8_e4m3 or bf16; rows past recvCount are zero. */
  recvX: HostTensor;
  /** [E_l, R·T_max, S] f32 or [E_l, R·T_max, W] i32, column-major in the last two dims; rows past recvCount zero. */
  recvScales?: HostTensor;
  /** [E_l] i32. */
  recvCount: HostTensor<'i32'>;
  /** [E_l, R·T_max] i32; -1 past recvCount. */
  packedRecvSrcInfo: HostTensor<'i32'>;
  /** [E_l, R] i64: (begin << 32) | count. */
  packedRecvLayoutRange: HostTensor<'i64'>;
}

/** Allocates rank-independent output tensors of a low-latency dispatch, in their "nothing received" state. */
export function allocLowLatencyReceived(
  numRanks: number,
  hidden: number,
  config: LowLatencyConfig,
): LowLatencyReceived {
  const localExperts = config.numExperts / numRanks;
  const slots = numRanks * config.maxTokensPerRank;
  const out: LowLatencyReceived = {
    recvX: HostTensor.zeros(config.fp8 ? 'fp8_e4m3' : 'bf16', [localExperts, slots, hidden]),
    recvCount: HostTensor.zeros('i32', [localExperts]),
    packedRecvSrcInfo: HostTensor.from(
      'i32',
      [localExperts, slots],
      new Int32Array(localExperts * slots).fill(-1),
    ),
    packedRecvLayoutRange: HostTensor.zeros('i64', [localExperts, numRanks]),
  };
  if (config.fp8) {
    // Column-major in the last two dims: stored as [E_l, cols, slots], seen as [E_l, slots, cols].
    const cols = config.ue8m0 ? ue8m0WordCount(hidden) : fp8ScaleCount(hidden);
    const stored = HostTensor.zeros(config.ue8m0 ? 'i32' : 'f32', [localExperts, cols, slots]);
    out.recvScales = stored.transpose(1, 2);
  }
  return out;
}

/**
 * Fills `out` (from allocLowLatencyReceived, possibly filled before) with what rank `rank` receives: every
 * count, layout range and source index (-1 past the count) and the rows and scales inside the counts.
 */
export function fillLowLatencyDispatch(
  out: LowLatencyReceived,
  sources: readonly LowLatencySource[],
  rank: number,
  config: LowLatencyConfig,
): void {
  const R = sources.length;
  const localExperts = config.numExperts / R;
  const slots = R * config.maxTokensPerRank;
  const hidden = out.recvX.shape[2]!;
  const ids = sources.map((s) => indexValues(s.topkIdx));
  const bf16Rows = sources.map((s) => rowMajorData(s.x) as Uint16Array);
  // Each source's rows in the payload format: bf16 as given, or quantized once per source.
  const quantized = config.fp8
    ? sources.map((s, i) =>
        quantizeFp8(bf16ArrayToF32(bf16Rows[i]!), s.x.shape[0]!, hidden, {
          roundScale: config.roundScale,
          ue8m0: config.ue8m0,
        }),
      )
    : [];
  const scaleCols = config.ue8m0 ? ue8m0WordCount(hidden) : fp8ScaleCount(hidden);
  const scaleStore = out.recvScales?.data as Float32Array | Int32Array | undefined;

  for (let e = 0; e < localExperts; e++) {
    const expert = rank * localExperts + e;
    let count = 0;
    for (let s = 0; s < R; s++) {
      const begin = count;
      const T = sources[s]!.x.shape[0]!;
      const K = sources[s]!.topkIdx.shape[1]!;
      for (let t = 0; t < T; t++) {
        let chosen = false;
        for (let k = 0; k < K; k++) if (ids[s]![t * K + k] === expert) chosen = true;
        if (!chosen) continue;
        const row = e * slots + count;
        out.packedRecvSrcInfo.data[row] = t;
        if (config.fp8) {
          const q = quantized[s]!;
          copyRow(q.data, t, out.recvX.data, row, hidden);
          const scales = config.ue8m0 ? q.packed! : q.scales;
          for (let j = 0; j < scaleCols; j++) {
            scaleStore![e * scaleCols * slots + j * slots + count] = scales[t * scaleCols + j]!;
          }
        } else {
          copyRow(bf16Rows[s]!, t, out.recvX.data, row, hidden);
        }
        count++;
      }
      out.packedRecvLayoutRange.data[e * R + s] = (BigInt(begin) << 32n) | BigInt(count - begin);
    }
    out.recvCount.data[e] = count;
    // Past the count: -1, so a refilled output (the soak reuses one) matches a fresh one in full.
    out.packedRecvSrcInfo.data.fill(-1, e * slots + count, (e + 1) * slots);
  }
}

/** What every rank receives, indexed by rank. */
export function referenceLowLatencyDispatch(
  sources: readonly LowLatencySource[],
  config: LowLatencyConfig,
): LowLatencyReceived[] {
  return sources.map((source, r) => {
    const out = allocLowLatencyReceived(sources.length, source.x.shape[1]!, config);
    fillLowLatencyDispatch(out, sources, r, config);
    return out;
  });
}

/** One rank's expert side of a low-latency combine. */
export interface LowLatencyExpertSide {
  /** [E_l, ≥ recvCount, H] bf16 in the dispatch layout. */
  x: HostTensor;
  packedRecvSrcInfo: HostTensor;
  packedRecvLayoutRange: HostTensor;
}

/** One rank's token side of a low-latency combine: its original routing. */
export interface LowLatencyTarget {
  /** [T, K] i32/i64. */
  topkIdx: HostTensor;
  /** [T, K] f32. */
  topkWeights: HostTensor;
}

/** Fills `out` ([T, H] bf16) with rank `rank`'s combined tokens. */
export function fillLowLatencyCombine(
  out: HostTensor,
  rank: number,
  target: LowLatencyTarget,
  expertSides: readonly LowLatencyExpertSide[],
  numExperts: number,
): void {
  const R = expertSides.length;
  const localExperts = numExperts / R;
  const [T, K] = target.topkIdx.shape as [number, number];
  const hidden = out.shape[1]!;
  const ids = indexValues(target.topkIdx);
  const weights = rowMajorData(target.topkWeights) as Float32Array;

  // rowOf[expert][t]: the row of expert `expert`'s x (on its rank) holding token t of this rank.
  const rowOf = new Int32Array(numExperts * T).fill(-1);
  const xs: Uint16Array[] = [];
  const rowStride: number[] = [];
  for (let r = 0; r < R; r++) {
    const side = expertSides[r]!;
    xs.push(rowMajorData(side.x) as Uint16Array);
    rowStride.push(side.x.shape[1]!);
    const info = rowMajorData(side.packedRecvSrcInfo) as Int32Array;
    const infoStride = side.packedRecvSrcInfo.shape[1]!;
    const ranges = rowMajorData(side.packedRecvLayoutRange) as BigInt64Array;
    for (let e = 0; e < localExperts; e++) {
      const range = ranges[e * R + rank]!;
      const begin = Number(range >> 32n);
      const count = Number(range & 0xffffffffn);
      for (let i = begin; i < begin + count; i++) {
        rowOf[(r * localExperts + e) * T + info[e * infoStride + i]!] = i;
      }
    }
  }

  const acc = new Float32Array(hidden);
  for (let t = 0; t < T; t++) {
    acc.fill(0);
    for (let k = 0; k < K; k++) {
      const expert = ids[t * K + k]!;
      if (expert < 0) continue;
      const row = rowOf[expert * T + t]!;
      if (row < 0) {
        throw new ValidationError(
          'topkIdx',
          `expert ${expert} for token ${t} of rank ${rank}, which the dispatch did not send there`,
          'the topkIdx given to the matching lowLatencyDispatch',
        );
      }
      const r = Math.floor(expert / localExperts);
      const base = ((expert - r * localExperts) * rowStride[r]! + row) * hidden;
      const w = weights[t * K + k]!;
      const x = xs[r]!;
      for (let c = 0; c < hidden; c++) acc[c]! += Math.fround(w * bf16ToF32(x[base + c]!));
    }
    for (let c = 0; c < hidden; c++) (out.data as Uint16Array)[t * hidden + c] = f32ToBf16(acc[c]!);
  }
}

/** Every rank's combined tokens, indexed by rank. */
export function referenceLowLatencyCombine(
  targets: readonly LowLatencyTarget[],
  expertSides: readonly LowLatencyExpertSide[],
  numExperts: number,
): HostTensor[] {
  return targets.map((target, r) => {
    const out = HostTensor.zeros('bf16', [target.topkIdx.shape[0]!, expertSides[r]!.x.shape[2]!]);
    fillLowLatencyCombine(out, r, target, expertSides, numExperts);
    return out;
  });
}
