// Byte layout of the low-latency mode over NCCL (src/ep/gpu/nccl-low-latency.ts, kernels/ll_nccl.cu). NCCL
// needs every transfer's size on the host when it is enqueued, and the low-latency calls never wait for the
// device, so every block is sized for the worst case and carries its own counts. The kernels get the
// offsets as -D defines from here (one place defines the layout); docs/low-latency.md gives the numbers.
//
//   dispatch block (one per rank, all-gathered): i32 T, u32 call tag | routing [T_max][K_max] i32 | T_max messages
//     (a message: the row, H fp8 or 2H bf16 bytes, then the FP8 scales; its size depends on the payload)
//   combine block (one per (expert rank, owner) pair, all-to-all): u32 call tag | [T_max][K_max] bf16 rows
//     of H channels from byte 128
//
// Every token may go to one rank and every top-k slot of it to experts of one rank, so a padded all-to-all
// block of the dispatch would hold T_max messages for each destination: as many bytes as the whole block,
// which the all-gather moves once and the source quantizes once. The combine's slots cannot be shared
// between ranks, so it is a true all-to-all of T_max·K_max rows per pair.

import { type LlPayload, type LlShape, llShapeDefines } from './ll-layout.ts';

const align = (n: number, a: number): number => Math.ceil(n / a) * a;

export interface LlNcclLayout extends LlShape {
  /** Offset of the routing table in a dispatch block (after the i32 token count and the u32 call tag). */
  routeOffset: number;
  /** Offset of the first message in a dispatch block. */
  msgOffset: number;
  /** Bytes of one dispatch message per payload type (row, then FP8 scales), 16-aligned. */
  msgBytes: Record<LlPayload, number>;
  /** Bytes of one rank's dispatch block per payload type (what the all-gather moves per rank). */
  blockBytes: Record<LlPayload, number>;
  /** This rank's dispatch block (the larger payload type). */
  dispatchSendBytes: number;
  /** One half of the all-gather's destination: R blocks of the larger payload type. */
  dispatchRecvHalfBytes: number;
  /** Offset of the rows in a combine block (after the u32 call tag). */
  combineRowsOffset: number;
  /** One combine block: the tag, then T_max·K_max bf16 rows. */
  combineBlockBytes: number;
  /** R combine blocks: what one combine sends (one per owner), and one half of what it receives. */
  combineSendBytes: number;
  combineRecvHalfBytes: number;
  /** Everything, with two receive halves per call kind (so a hook may run after the next call's send). */
  totalBytes: number;
}

export function llNcclLayout(shape: LlShape): LlNcclLayout {
  const { numRanks: R, hidden: H, maxTokensPerRank: T, numTopk: K } = shape;
  const routeOffset = 128;
  const msgOffset = align(routeOffset + T * K * 4, 128);
  const msgBytes = { fp8: align(H + 4 * Math.ceil(H / 128), 16), bf16: align(2 * H, 16) };
  const blockBytes = {
    fp8: align(msgOffset + T * msgBytes.fp8, 128),
    bf16: align(msgOffset + T * msgBytes.bf16, 128),
  };
  const dispatchSendBytes = Math.max(blockBytes.fp8, blockBytes.bf16);
  const dispatchRecvHalfBytes = R * dispatchSendBytes;
  const combineRowsOffset = 128;
  const combineBlockBytes = combineRowsOffset + T * K * 2 * H;
  const combineSendBytes = R * combineBlockBytes;
  const combineRecvHalfBytes = R * combineBlockBytes;
  return {
    ...shape,
    routeOffset,
    msgOffset,
    msgBytes,
    blockBytes,
    dispatchSendBytes,
    dispatchRecvHalfBytes,
    combineRowsOffset,
    combineBlockBytes,
    combineSendBytes,
    combineRecvHalfBytes,
    totalBytes: dispatchSendBytes + 2 * dispatchRecvHalfBytes + combineSendBytes + 2 * combineRecvHalfBytes,
  };
}

/** The layout as kernels/ll_nccl.cu's -D defines (the shape it specializes on, and the block offsets). */
export function llNcclDefines(l: LlNcclLayout): Record<string, number> {
  return {
    ...llShapeDefines(l),
    LLN_ROUTE: l.routeOffset,
    LLN_MSGS: l.msgOffset,
    LLN_CROWS: l.combineRowsOffset,
  };
}

/**
 * The tag a call writes into its blocks and the receiving kernel expects (the same on every rank for one
 * call): the reset() count in the top 8 bits, the call's index (of its kind) since that reset + 1 in the
 * low 24 (never 0, which a zeroed block holds).
 */
export function callTag(epoch: number, call: number): number {
  return (((epoch & 0xff) << 24) | ((call % 0xffffff) + 1)) >>> 0;
}
