// Reference for normal-mode combine, computed per source (token-owning) rank. For each token, in
// float32 starting from bias0 + bias1 (an absent bias counts as +0), the rows it was sent to are added
// in ascending destination rank, then rounded to bf16 once. Weights are summed back the same way.

import { bf16ToF32, f32ToBf16 } from '../device/dtypes.ts';
import { HostTensor } from '../device/tensor.ts';
import { rowMajorData } from './tensor-io.ts';

/** What one rank (as expert side) sends back: its received rows, transformed. */
export interface CombineExpertSide {
  /** [≥ rows received, H] bf16 in dispatch order; rows past the received count are ignored. */
  x: HostTensor;
  /** [≥ rows received, K] f32. */
  topkWeights?: HostTensor;
}

/** The token-owning rank's side of a combine. */
export interface CombineTarget {
  /** [T, R] bool from the dispatch. */
  isTokenInRank: HostTensor;
  /** Zero, one or two [T, H] bf16. */
  bias: readonly HostTensor[];
}

export interface Combined {
  combinedX: HostTensor<'bf16'>;
  combinedTopkWeights?: HostTensor<'f32'>;
}

/**
 * Combines the tokens of rank `rank`. `rankPrefixMatrix` is the dispatch's [R, R] inclusive prefix
 * matrix: rank s's block inside rank r's received rows starts at prefix[s-1][r].
 */
export function combineForRank(
  rank: number,
  target: CombineTarget,
  rankPrefixMatrix: HostTensor,
  expertSides: readonly CombineExpertSide[],
): Combined {
  const R = expertSides.length;
  const [T] = target.isTokenInRank.shape as [number];
  const hidden = expertSides[0]!.x.shape[1]!;
  const map = rowMajorData(target.isTokenInRank) as Uint8Array;
  const prefix = rowMajorData(rankPrefixMatrix) as Int32Array;
  const xs = expertSides.map((side) => rowMajorData(side.x) as Uint16Array);
  const bias = target.bias.map((b) => rowMajorData(b) as Uint16Array);
  const withWeights = expertSides[0]!.topkWeights !== undefined;
  const K = withWeights ? expertSides[0]!.topkWeights!.shape[1]! : 0;
  const ws = withWeights ? expertSides.map((side) => rowMajorData(side.topkWeights!) as Float32Array) : [];

  // Next row of each destination rank's block that belongs to this rank's next token sent there.
  const cursor = new Int32Array(R);
  for (let r = 0; r < R; r++) cursor[r] = rank > 0 ? prefix[(rank - 1) * R + r]! : 0;

  const combinedX = HostTensor.zeros('bf16', [T, hidden]);
  const combinedTopkWeights = withWeights ? HostTensor.zeros('f32', [T, K]) : undefined;
  // Float32Array stores round every partial sum to float32, exactly as a float32 add would.
  const acc = new Float32Array(hidden);
  const wacc = new Float32Array(K);
  for (let t = 0; t < T; t++) {
    const base = t * hidden;
    for (let c = 0; c < hidden; c++) {
      const b0 = bias.length > 0 ? bf16ToF32(bias[0]![base + c]!) : 0;
      const b1 = bias.length > 1 ? bf16ToF32(bias[1]![base + c]!) : 0;
      acc[c] = b0 + b1;
    }
    wacc.fill(0);
    for (let r = 0; r < R; r++) {
      if (!map[t * R + r]) continue;
      const row = cursor[r]!++;
      const x = xs[r]!;
      for (let c = 0; c < hidden; c++) acc[c]! += bf16ToF32(x[row * hidden + c]!);
      if (withWeights) for (let k = 0; k < K; k++) wacc[k]! += ws[r]![row * K + k]!;
    }
    for (let c = 0; c < hidden; c++) combinedX.data[base + c] = f32ToBf16(acc[c]!);
    if (combinedTopkWeights) combinedTopkWeights.data.set(wacc, t * K);
  }
  return combinedTopkWeights ? { combinedX, combinedTopkWeights } : { combinedX };
}

/** Every rank's combined output, indexed by rank; `targets[r]` is rank r's side. */
export function referenceCombine(
  targets: readonly CombineTarget[],
  rankPrefixMatrix: HostTensor,
  expertSides: readonly CombineExpertSide[],
): Combined[] {
  return targets.map((target, r) => combineForRank(r, target, rankPrefixMatrix, expertSides));
}
