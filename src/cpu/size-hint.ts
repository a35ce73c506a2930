// Communication memory of the CPU backend: every rank holds all ranks' messages of one exchange, so a
// mode needs R times its largest per-rank message at full capacity (message headers, < 4 KiB, aside).

import { fp8ScaleCount } from '../device/dtypes.ts';
import type { EpSizeHint, ResolvedEpBufferOptions } from '../ep/types.ts';

export function cpuSizeHint(options: ResolvedEpBufferOptions, numRanks: number): EpSizeHint {
  const { hidden: H, maxTokensPerRank: T, numExperts: E, numTopk: K, mode } = options;
  const R = numRanks;
  const S = fp8ScaleCount(H);
  // Normal dispatch: bf16 rows (larger than fp8 + scales), int64 ids, weights, the [T, R] map, counts.
  const dispatch = T * (2 * H + 4 * S + 8 * K + 4 * K + R) + 4 * E;
  // Normal combine: every received row (at most R·T) back, with weights.
  const combine = R * T * (2 * H + 4 * K);
  // Low-latency dispatch: bf16 rows and int64 ids.
  const llDispatch = T * (2 * H + 8 * K);
  // Low-latency combine: at most min(K, E_l) rows per (token, source) back, plus source info and ranges.
  const localExperts = E / R;
  const llCombine = R * T * Math.min(K, localExperts) * 2 * H + localExperts * R * (4 * T + 8);
  const normal = mode === 'low-latency' ? 0 : R * Math.max(dispatch, combine);
  const lowLatency = mode === 'normal' ? 0 : R * Math.max(llDispatch, llCombine);
  return { normalBytes: normal, lowLatencyBytes: lowLatency };
}
