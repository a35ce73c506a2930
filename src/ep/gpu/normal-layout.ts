// Byte layout of a rank's normal-mode symmetric buffer; kernels/normal.cu's `Ctrl` and `Areas` mirror it.
// The receive area holds R·T_max rows (every source's whole batch), so a dispatch never waits for space;
// combine reuses the same rows as its stage, [expert rank][row of my block at that rank]. The control
// block and the dispatch chunk words come first: reset() zeroes everything before `x`.

import { fp8ScaleCount } from '../../device/dtypes.ts';

/** Control block size (barrier slots, abort word, sequence numbers, count matrix, per-expert counts). */
export const CTRL_BYTES = 64 * 1024;
/** Byte offset of the rank's abort word in its control block (`Ctrl::abort`). */
export const CTRL_ABORT = 36;
/** Largest rank count and experts per rank the control block has room for. */
export const MAX_RANKS = 8;
export const MAX_LOCAL_EXPERTS = 1024;
/** Row positions travel in 20-bit fields of the dispatch chunk words (kernels/normal.cu chunk_word). */
export const MAX_TOKENS_PER_RANK = 2 ** 20 - 1;

/** Chunks per source that senders announce one by one, for the dispatch and for the combine. */
export interface ChunkCounts {
  dispatch: number;
  combine: number;
}

export interface NormalAreas {
  /** Dispatch and combine chunk words: u64 [rank][chunk] each; 0 = none (no chunk counts: NCCL's buffers). */
  chunks: number;
  combineChunks: number;
  x: number;
  scales: number;
  srcIdx: number;
  topk: number;
  weights: number;
  /** Total bytes of the buffer. */
  bytes: number;
  /** Rows of the receive area (R · T_max). */
  rows: number;
}

const align = (n: number, a = 256) => Math.ceil(n / a) * a;

export function normalAreas(
  numRanks: number,
  maxTokensPerRank: number,
  hidden: number,
  numTopk: number,
  numChunks?: ChunkCounts,
): NormalAreas {
  const rows = numRanks * maxTokensPerRank;
  const chunks = numChunks ? CTRL_BYTES : 0;
  const combineChunks = numChunks ? CTRL_BYTES + numRanks * numChunks.dispatch * 8 : 0;
  const x = align(CTRL_BYTES + numRanks * ((numChunks?.dispatch ?? 0) + (numChunks?.combine ?? 0)) * 8);
  const scales = align(x + rows * hidden * 2); // room for bf16 rows; fp8 rows use half
  const srcIdx = align(scales + rows * fp8ScaleCount(hidden) * 4);
  const topk = align(srcIdx + rows * 4);
  const weights = align(topk + rows * numTopk * 8);
  const bytes = align(weights + rows * numTopk * 4, 4096);
  return { chunks, combineChunks, x, scales, srcIdx, topk, weights, bytes, rows };
}

/** Offsets in the host-mapped signal page. */
export const SIGNAL_BYTES = 16 * 1024;
/**
 * int32 index of the sequence number, received rows and the first aligned per-expert count; the rows
 * received from each source follow the EL per-expert counts (at SIGNAL_EXPERTS + EL).
 */
export const SIGNAL_SEQ = 0;
export const SIGNAL_ROWS = 1;
export const SIGNAL_EXPERTS = 2;
/** Byte offset of the device error record (kernels/ep_sync.cuh ErrorRecord). */
export const ERROR_RECORD = 8 * 1024;
