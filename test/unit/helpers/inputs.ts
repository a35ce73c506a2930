// Random EP inputs: activations, routing with -1 slots and skew, weights, FP8 payloads.

import type { Rng } from '../../../src/cpu/random.ts';
import { fp8ScaleCount, quantizeFp8, ue8m0WordCount } from '../../../src/device/dtypes.ts';
import { HostTensor } from '../../../src/device/tensor.ts';

/**
 * Random bf16 codes drawn directly (one 32-bit draw per element, no float conversion: the GPU tests make
 * tens of millions per case): random sign and mantissa, magnitudes from 2^-6 to just under 4.
 */
export function randomBf16(rng: Rng, rows: number, hidden: number): HostTensor<'bf16'> {
  const t = HostTensor.empty('bf16', [rows, hidden]);
  const d = t.data;
  for (let i = 0; i < d.length; i++) {
    const u = rng.u32();
    d[i] = (u & 0x8000) | ((121 + (u & 7)) << 7) | ((u >>> 3) & 0x7f);
  }
  return t;
}

export function randomWeights(rng: Rng, rows: number, topk: number): HostTensor<'f32'> {
  const t = HostTensor.empty('f32', [rows, topk]);
  for (let i = 0; i < t.data.length; i++) t.data[i] = rng.float();
  return t;
}

export interface RoutingShape {
  /** Fraction of slots set to -1. */
  dropRate?: number;
  /** Every token's first slot is this expert (one hot expert). */
  hotExpert?: number;
  /** Experts are drawn only from these (e.g. to leave a rank with nothing). */
  allowed?: readonly number[];
}

/** [T, K] distinct experts per row (or -1), as int32 values. */
export function randomRouting(
  rng: Rng,
  T: number,
  K: number,
  E: number,
  shape: RoutingShape = {},
): Int32Array {
  const pool = shape.allowed ?? Array.from({ length: E }, (_, e) => e);
  const out = new Int32Array(T * K);
  for (let t = 0; t < T; t++) {
    const picks = Array.from(rng.distinct(pool.length, Math.min(K, pool.length)), (i) => pool[i]!);
    if (shape.hotExpert !== undefined && pool.includes(shape.hotExpert)) {
      const at = picks.indexOf(shape.hotExpert);
      if (at >= 0) picks.splice(at, 1);
      picks.unshift(shape.hotExpert);
    }
    for (let k = 0; k < K; k++) {
      const e = picks[k];
      out[t * K + k] = e === undefined || rng.float() < (shape.dropRate ?? 0) ? -1 : e;
    }
  }
  return out;
}

export function routingTensor(dtype: 'i32' | 'i64', T: number, K: number, ids: Int32Array): HostTensor {
  if (dtype === 'i32') return HostTensor.from('i32', [T, K], ids);
  return HostTensor.from(
    'i64',
    [T, K],
    BigInt64Array.from(ids, (v) => BigInt(v)),
  );
}

export type ScaleKind = 'f32' | 'f32-column-major' | 'ue8m0';

/** Random FP8 activations with their scales in the requested form. */
export function randomFp8(
  rng: Rng,
  rows: number,
  hidden: number,
  kind: ScaleKind,
): { x: HostTensor; scales: HostTensor } {
  const src = new Float32Array(rows * hidden);
  for (let i = 0; i < src.length; i++) src[i] = rng.normal() * 3;
  const q = quantizeFp8(src, rows, hidden, { ue8m0: kind === 'ue8m0' });
  const x = HostTensor.from('fp8_e4m3', [rows, hidden], q.data);
  const S = fp8ScaleCount(hidden);
  if (kind === 'ue8m0')
    return { x, scales: HostTensor.from('i32', [rows, ue8m0WordCount(hidden)], q.packed!) };
  if (kind === 'f32') return { x, scales: HostTensor.from('f32', [rows, S], q.scales) };
  // Column-major: stored [S, rows], seen as [rows, S].
  const stored = HostTensor.from('f32', [S, rows], new Float32Array(rows * S));
  for (let r = 0; r < rows; r++) for (let s = 0; s < S; s++) stored.data[s * rows + r] = q.scales[r * S + s]!;
  return { x, scales: stored.transpose(0, 1) };
}

/**
 * For a [T, R] token-to-rank map, the tokens with any rank on each host (hosts of `ranksPerHost`
 * consecutive ranks): what crosses to each host when every token goes once per destination host.
 */
export function tokensPerHost(isTokenInRank: HostTensor, ranksPerHost: number): number[] {
  const [T, R] = isTokenInRank.shape as [number, number];
  const map = isTokenInRank.contiguous().bytes();
  return Array.from({ length: R / ranksPerHost }, (_, h) => {
    let n = 0;
    for (let t = 0; t < T; t++) {
      for (let l = 0; l < ranksPerHost; l++) {
        if (map[t * R + h * ranksPerHost + l] !== 0) {
          n++;
          break;
        }
      }
    }
    return n;
  });
}
