// Byte layout of the symmetric buffer of the normal mode across hosts (transport 'nvshmem'; kernels/hier.cu
// gets every offset as a -D define from here). Per rank, R ranks in NH hosts of P:
//
//   [0, 4096)     control: abort word, sequence numbers, arrival counters, signals, barrier words
//   count row     R per-rank + NH per-host + E per-expert counts + the call's shape word (i32)
//   count matrix  R rows: every rank's count row, by rank
//   inbox         NH slots of T_max records: slot h holds the records of rank h·P + (this local index)
//                 (this rank is their proxy); its own host's slot holds its own records
//   outbox        NH slots of T_max records: this rank's records for other hosts, put from here
//   combine rows  R·T_max rows of 2H bytes (the expert side's x), then R·T_max × K_max f32 weights
//   partials      NH × T_max rows of (4H + 4 K_max) bytes: staging of the host partials this rank sends
//   partials in   NH × T_max rows: the partials of this rank's tokens, by host
//
// A record (one token for one host): the row (room for 2H bytes), scales (f32 per 128 channels, room for
// the f32 case), top-k ids (room for i64), weights, the source token index, and the token's position among
// the source's tokens for each of the destination host's P ranks.

import { readCountRows } from './normal-kernels.ts';

const align = (n: number, a: number): number => Math.ceil(n / a) * a;

export interface HierShape {
  numRanks: number;
  ranksPerHost: number;
  hidden: number;
  maxTokensPerRank: number;
  numTopk: number;
  numExperts: number;
}

export interface HierLayout extends HierShape {
  hosts: number;
  /** i32 words of a count row: R + NH + E + 1. */
  countWords: number;
  recordBytes: number;
  recordScales: number;
  recordTopk: number;
  recordWeights: number;
  recordSrc: number;
  recordPos: number;
  slotBytes: number;
  partialRowBytes: number;
  offCounts: number;
  offMatrix: number;
  offInbox: number;
  offOutbox: number;
  offCombineRows: number;
  offCombineWeights: number;
  offPartials: number;
  offPartialsIn: number;
  totalBytes: number;
}

/** The control block (kernels/hier.cu HC_*): byte offsets of its words, and its size. */
export const HIER_CTRL = {
  abort: 0,
  dispatchEpoch: 4,
  combineEpoch: 8,
  round: 12,
  arrive: 16,
  rdmaTokens: 64,
  rdmaBytes: 72,
  /** u64 [NH] each: dispatch records arrived, combine partials arrived; then this rank's rows ready. */
  signalDispatch: 128,
  signalCombine: 384,
  signalRows: 640,
  /** u64 [R]: count rows arrived; then i32 [R] barrier words. */
  signalCounts: 704,
  barrier: 1024,
  /** u64 [NH]: this rank's inbox signals as proxy, republished for the host's ranks (hier_recv). */
  signalRepublish: 2048,
  bytes: 4096,
} as const;

export function hierLayout(s: HierShape): HierLayout {
  const { numRanks: R, ranksPerHost: P, hidden: H, maxTokensPerRank: T, numTopk: K, numExperts: E } = s;
  if (R % P !== 0 || R > 32 || P > 8) {
    throw new RangeError(`hierarchical layout: ${R} ranks in hosts of ${P}; needs P | R, R ≤ 32, P ≤ 8`);
  }
  const NH = R / P;
  const countWords = R + NH + E + 1;
  const recordScales = align(2 * H, 16);
  const recordTopk = align(recordScales + 4 * Math.ceil(H / 128), 8);
  const recordWeights = recordTopk + 8 * K;
  const recordSrc = recordWeights + 4 * K;
  const recordPos = recordSrc + 4;
  const recordBytes = align(recordPos + 4 * P, 16);
  const slotBytes = align(T * recordBytes, 256);
  const partialRowBytes = align(4 * H + 4 * K, 16);
  const offCounts = HIER_CTRL.bytes;
  const offMatrix = align(offCounts + 4 * countWords, 256);
  const offInbox = align(offMatrix + 4 * R * countWords, 4096);
  const offOutbox = offInbox + NH * slotBytes;
  const offCombineRows = align(offOutbox + NH * slotBytes, 4096);
  const offCombineWeights = align(offCombineRows + R * T * 2 * H, 256);
  const offPartials = align(offCombineWeights + R * T * 4 * K, 4096);
  const offPartialsIn = offPartials + NH * T * partialRowBytes;
  const totalBytes = align(offPartialsIn + NH * T * partialRowBytes, 2 << 20);
  return {
    ...s,
    hosts: NH,
    countWords,
    recordBytes,
    recordScales,
    recordTopk,
    recordWeights,
    recordSrc,
    recordPos,
    slotBytes,
    partialRowBytes,
    offCounts,
    offMatrix,
    offInbox,
    offOutbox,
    offCombineRows,
    offCombineWeights,
    offPartials,
    offPartialsIn,
    totalBytes,
  };
}

/** The layout as kernels/hier.cu's -D defines. */
export function hierDefines(l: HierLayout): Record<string, number> {
  return {
    HIER_R: l.numRanks,
    HIER_P: l.ranksPerHost,
    HIER_TMAX: l.maxTokensPerRank,
    HIER_CW: l.countWords,
    HIER_SLOT: l.slotBytes,
    HIER_CIN_ROW: l.partialRowBytes,
    HIER_OFF_COUNTS: l.offCounts,
    HIER_OFF_MAT: l.offMatrix,
    HIER_OFF_INBOX: l.offInbox,
    HIER_OFF_OUTBOX: l.offOutbox,
    HIER_OFF_CX: l.offCombineRows,
    HIER_OFF_CXW: l.offCombineWeights,
    HIER_OFF_CPART: l.offPartials,
    HIER_OFF_CIN: l.offPartialsIn,
    HIER_REC: l.recordBytes,
    HIER_REC_SCALES: l.recordScales,
    HIER_REC_TOPK: l.recordTopk,
    HIER_REC_W: l.recordWeights,
    HIER_REC_SRC: l.recordSrc,
    HIER_REC_POS: l.recordPos,
    HC_ABORT: HIER_CTRL.abort,
    HC_DEPOCH: HIER_CTRL.dispatchEpoch,
    HC_CEPOCH: HIER_CTRL.combineEpoch,
    HC_ROUND: HIER_CTRL.round,
    HC_ARRIVE: HIER_CTRL.arrive,
    HC_RDMA_TOKENS: HIER_CTRL.rdmaTokens,
    HC_RDMA_BYTES: HIER_CTRL.rdmaBytes,
    HC_SIG_D: HIER_CTRL.signalDispatch,
    HC_SIG_C: HIER_CTRL.signalCombine,
    HC_SIG_X: HIER_CTRL.signalRows,
    HC_SIG_CNT: HIER_CTRL.signalCounts,
    HC_BAR: HIER_CTRL.barrier,
    HC_SIG_R: HIER_CTRL.signalRepublish,
  };
}

/** What a rank derives from the dispatch's count matrix (rows: every rank's count row). */
export interface MatrixCounts {
  /** Rows this rank receives. */
  rows: number;
  /** Received rows per local expert, each rounded up to `alignment`. */
  perExpert: number[];
  /** [R·R] row-major: [i][j] = Σ_{s ≤ i} rows rank s sends rank j (the rank prefix matrix). */
  rankPrefix: number[];
  /** Records this rank holds as proxy (the sources with its local index, for its host). */
  proxyRecords: number;
}

/** The host's reading of a count matrix `m` for rank `me` (see hierLayout for the row's fields). */
export function countsFromMatrix(
  l: Pick<HierLayout, 'numRanks' | 'ranksPerHost' | 'hosts' | 'numExperts'>,
  m: readonly ArrayLike<number>[],
  me: number,
  alignment: number,
): MatrixCounts {
  const R = l.numRanks;
  const NH = l.hosts;
  const P = l.ranksPerHost;
  const { recv, rankPrefix, perExpert } = readCountRows(m, me, l.numExperts / R, R + NH, alignment);
  const rows = recv.reduce((a, b) => a + b, 0);
  let proxyRecords = 0;
  for (let h = 0; h < NH; h++) proxyRecords += m[h * P + (me % P)]![R + Math.floor(me / P)]!;
  return { rows, perExpert, rankPrefix, proxyRecords };
}
