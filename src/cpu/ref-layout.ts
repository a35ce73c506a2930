// Reference for getDispatchLayout: per-rank and per-expert token counts and the token-to-rank map of
// one rank's routing. Experts are owned contiguously: expert e lives on rank floor(e / (E / R)).

import { HostTensor } from '../device/tensor.ts';
import { indexValues } from './tensor-io.ts';

export interface Layout {
  /** [R] i32. */
  numTokensPerRank: HostTensor<'i32'>;
  /** [E] i32. */
  numTokensPerExpert: HostTensor<'i32'>;
  /** [T, R] bool. */
  isTokenInRank: HostTensor<'bool'>;
}

export function referenceLayout(topkIdx: HostTensor, numExperts: number, numRanks: number): Layout {
  const [numTokens, numTopk] = topkIdx.shape as [number, number];
  const expertsPerRank = numExperts / numRanks;
  const idx = indexValues(topkIdx);
  const numTokensPerRank = HostTensor.zeros('i32', [numRanks]);
  const numTokensPerExpert = HostTensor.zeros('i32', [numExperts]);
  const isTokenInRank = HostTensor.zeros('bool', [numTokens, numRanks]);
  for (let t = 0; t < numTokens; t++) {
    for (let k = 0; k < numTopk; k++) {
      const e = idx[t * numTopk + k]!;
      if (e < 0) continue;
      numTokensPerExpert.data[e]!++;
      isTokenInRank.data[t * numRanks + Math.floor(e / expertsPerRank)] = 1;
    }
    for (let r = 0; r < numRanks; r++) numTokensPerRank.data[r]! += isTokenInRank.data[t * numRanks + r]!;
  }
  return { numTokensPerRank, numTokensPerExpert, isTokenInRank };
}
