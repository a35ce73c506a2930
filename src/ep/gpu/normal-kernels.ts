// Typed launchers for the normal-mode kernels (kernels/layout.cu, kernels/normal.cu), shared by the
// NVLink and the NCCL transports: one place that knows each kernel's parameter list, the module cache per
// specialization, and the host-side call queue.

import { DeviceTensor } from '../../device/device-tensor.ts';
import type { DType } from '../../device/dtypes.ts';
import { DeviceBuffer } from '../../device/memory.ts';
import type { Kernel, Module } from '../../device/module.ts';
import type { Stream } from '../../device/stream.ts';
import { ValidationError } from '../../errors.ts';
import type { DispatchLayout, DispatchRequest, Tensor } from '../types.ts';
import type { ChunkCounts, NormalAreas } from './normal-layout.ts';
import type { GpuRuntime } from './runtime.ts';
import { intSetting } from './settings.ts';

/** Threads per block of the send kernels; a block is one SM's worth of copy warps. */
export const SEND_THREADS = 512;
/** SMs of a normal-mode call unless told otherwise: TSEP_NORMAL_SMS, default 24 (DeepEP's tests use 24). */
export function normalSms(): number {
  return intSetting('TSEP_NORMAL_SMS', 24, 2, 1024);
}

/** Threads per block of the dispatch receive kernel (copy warps; more loads in flight per SM). */
export const RECV_THREADS = 1024;

/** Kernel parameter kinds of an `Areas` struct passed by value (seven u64 offsets). */
const AREA_KINDS = ['u64', 'u64', 'u64', 'u64', 'u64', 'u64', 'u64'] as const;
/** kernels/normal.cu `Own`: a rank's five dispatch output pointers (0 = none). */
const OWN_KINDS = ['u64', 'u64', 'u64', 'u64', 'u64'] as const;

export function areaArgs(a: NormalAreas): bigint[] {
  return [a.x, a.scales, a.srcIdx, a.topk, a.weights, a.chunks, a.combineChunks].map(BigInt);
}

/**
 * Where a kernel reports a timed-out wait (kernels/ep_sync.cuh `Fail`): the host-mapped error record,
 * and the rank's abort word in device memory that kernels poll (never the host page: see ep_sync.cuh).
 */
export interface FailArgs {
  err: bigint;
  abort: bigint;
}
const FAIL_KINDS = ['ptr', 'ptr'] as const;
const failArgs = (f: FailArgs) => [f.err, f.abort];

/**
 * Chunk counts (kernels/normal.cu per_chunk: a dispatch sender cuts its own T tokens, a combine sender the
 * rows it returns to one owner, into at most this many), each at most T_max: TSEP_NORMAL_DISPATCH_CHUNKS
 * (default 4096) and TSEP_NORMAL_COMBINE_CHUNKS (default 1024). They size every rank's word arrays, so all
 * ranks must agree (checked at create). More dispatch chunks make rows land in a steadier stream: at EP4,
 * T=4096, 4096 chunks cut the FP8 dispatch from 427 to 368 µs against 1024 (bench/RESULTS.md); the combine
 * went from 655 to 846 µs with 4096, so it keeps 1024.
 */
export function chunkCounts(
  maxTokensPerRank: number,
  maxDispatch = intSetting('TSEP_NORMAL_DISPATCH_CHUNKS', 4096, 1, 65536),
  maxCombine = intSetting('TSEP_NORMAL_COMBINE_CHUNKS', 1024, 1, 65536),
): ChunkCounts {
  const clamp = (n: number) => Math.max(1, Math.min(maxTokensPerRank, n));
  return { dispatch: clamp(maxDispatch), combine: clamp(maxCombine) };
}

/**
 * Percent of a normal-mode call's SMs that the kernel beside the sends gets: the dispatch receive copy
 * (TSEP_NORMAL_RECV_PCT, default 33: plain local copies) and the combine reduce (TSEP_NORMAL_REDUCE_PCT,
 * default 33: it reads every source's row of a token, but with 4 loads per lane per source it sums the
 * EP4 shape's 212 MB in 348 µs on 8 SMs alone, against ≈530 µs for 16 SMs to send the 159 MB over
 * NVLink; at 50 % it had 12 SMs that were idle over half the time. bench/RESULTS.md, fifth session of
 * 2026-11-29, run 8). The rest send.
 */
export function smShares(): { recvPct: number; reducePct: number } {
  return {
    recvPct: intSetting('TSEP_NORMAL_RECV_PCT', 33, 1, 90),
    reducePct: intSetting('TSEP_NORMAL_REDUCE_PCT', 33, 1, 90),
  };
}

/**
 * The combine's transfer: 0 (default) = the SM send kernel; P > 0 = the copy engines, each source's
 * block of rows in P copies (each followed by its chunk word), so no SM sends and the reduce gets all of
 * numSms (TSEP_NORMAL_COMBINE_PIECES, at most the combine chunk count). Exact-size handles only: a
 * worst-case handle's counts are on the device, and its combine uses the send kernel. Owners learn each
 * expert rank's choice on the device, so ranks need not agree.
 */
export function combinePieces(chunks: ChunkCounts): number {
  return Math.min(intSetting('TSEP_NORMAL_COMBINE_PIECES', 0, 0, 1024), chunks.combine);
}

/** Threads and tokens per tile of the layout kernel (passed to kernels/layout.cu as defines). */
const LAYOUT_THREADS = 256;
const LAYOUT_TILE = 32;

/** The layout kernels (one per index width) and their scratch: E + R counters and an arrival counter. */
export interface LayoutKernels {
  i32: Kernel;
  i64: Kernel;
  /** [E + R] i32 counts, then the u32 arrival counter: zero between launches (the kernel leaves it so). */
  scratch: DeviceBuffer;
}

/** Getting the layout is synchronous, so its kernels are compiled up front. Free `scratch` when done. */
export async function loadLayoutKernels(rt: GpuRuntime): Promise<LayoutKernels> {
  const R = rt.group.size;
  const EL = rt.options.numExperts / R;
  const [m32, m64] = await Promise.all(
    [0, 1].map((idx64) =>
      rt.kernels('layout.cu', {
        TSEP_R: R,
        TSEP_EL: EL,
        TSEP_IDX64: idx64,
        TSEP_LAYOUT_THREADS: LAYOUT_THREADS,
        TSEP_LAYOUT_TILE: LAYOUT_TILE,
      }),
    ),
  );
  const params = ['ptr', 'i32', 'i32', 'ptr', 'ptr', 'ptr', 'ptr'] as const;
  const scratch = DeviceBuffer.alloc(4 * (rt.options.numExperts + R + 1), rt.device);
  scratch.fill(0, rt.stream);
  return { i32: m32!.kernel('tsep_layout', params), i64: m64!.kernel('tsep_layout', params), scratch };
}

/** Per-rank and per-expert counts and the token -> rank map of `topkIdx`, on the runtime's stream. */
export function launchLayout(rt: GpuRuntime, kernels: LayoutKernels, topkIdx: Tensor): DispatchLayout {
  const topk = rt.onDevice('topkIdx', topkIdx);
  const [T, K] = topk.shape as [number, number];
  const R = rt.group.size;
  const perRank = DeviceTensor.emptyOn('i32', [R], rt.stream);
  const perExpert = DeviceTensor.emptyOn('i32', [rt.options.numExperts], rt.stream);
  const inRank = DeviceTensor.emptyOn('bool', [T, R], rt.stream);
  // At most two blocks per SM; each takes tiles of LAYOUT_TILE tokens in turn.
  const blocks = Math.min(2 * rt.smCount, Math.max(1, Math.ceil(T / LAYOUT_TILE)));
  kernels[topk.dtype === 'i64' ? 'i64' : 'i32'].launch(
    { grid: blocks, block: LAYOUT_THREADS, stream: rt.stream },
    [topk.ptr, T, K, perRank.ptr, perExpert.ptr, inRank.ptr, kernels.scratch.ptr],
  );
  return { numTokensPerRank: perRank, numTokensPerExpert: perExpert, isTokenInRank: inRank };
}

/** The device tensors of a dispatch request, checked, and the kernel specialization they need. */
export interface DispatchInputs {
  x: DeviceTensor;
  T: number;
  elt: number;
  scales: DeviceTensor | undefined;
  scaleWords: number;
  topk: DeviceTensor | undefined;
  weights: DeviceTensor | undefined;
  K: number;
}

/** The parts of a dispatch's arguments that decide which transfers it makes, as one int32. */
export function payloadShape(inp: DispatchInputs): number {
  return (
    (inp.elt === 1 ? 1 : 0) |
    (inp.scaleWords << 1) | // < 1024
    ((inp.scales?.dtype === 'i32' ? 1 : 0) << 11) |
    (inp.K << 12) | // ≤ 32
    ((inp.topk?.dtype === 'i64' ? 1 : 0) << 18) |
    ((inp.weights ? 1 : 0) << 19)
  );
}

export function describeShape(v: number): string {
  const sw = (v >> 1) & 0x3ff;
  const scales = sw ? `${sw} ${(v >> 11) & 1 ? 'UE8M0' : 'f32'} scale words` : 'no scales';
  const ids = `top-k ${(v >> 12) & 0x3f}${(v >> 18) & 1 ? ' (i64)' : ''}`;
  return `${v & 1 ? 'fp8' : 'bf16'} x, ${scales}, ${ids}, ${(v >> 19) & 1 ? 'weights' : 'no weights'}`;
}

/** Throws ValidationError unless every rank's payload-shape word (column `col` of its count row) is `shape`. */
export function checkSamePayload(
  rows: readonly ArrayLike<number>[],
  col: number,
  shape: number,
  me: number,
): void {
  const other = rows.findIndex((row) => row[col] !== shape);
  if (other < 0) return;
  throw new ValidationError(
    'dispatch arguments',
    `${describeShape(shape)} on rank ${me} but ${describeShape(rows[other]![col]!)} on rank ${other}`,
    'the same payload type, scales, top-k width, index type and weights on every rank',
  );
}

/**
 * What every rank's count row (indexed by source rank; per-rank counts in columns 0..R-1, per-expert counts
 * from column `expertCol`) tells rank `me`: the rows from each source, the rank prefix matrix ([i][j] =
 * Σ_{s ≤ i} rows s sends j, row-major) and the received rows per local expert rounded up to `alignment`.
 */
export function readCountRows(
  rows: readonly ArrayLike<number>[],
  me: number,
  localExperts: number,
  expertCol: number,
  alignment: number,
): { recv: number[]; rankPrefix: number[]; perExpert: number[] } {
  const R = rows.length;
  const recv = rows.map((row) => row[me]!);
  const rankPrefix: number[] = [];
  const running = new Array<number>(R).fill(0);
  for (const row of rows) {
    for (let j = 0; j < R; j++) {
      running[j]! += row[j]!;
      rankPrefix.push(running[j]!);
    }
  }
  const perExpert = Array.from({ length: localExperts }, (_, e) => {
    const c = rows.reduce((acc, row) => acc + row[expertCol + me * localExperts + e]!, 0);
    return Math.ceil(c / alignment) * alignment;
  });
  return { recv, rankPrefix, perExpert };
}

/** An i32 device tensor of `values`, allocated and filled in `rt`'s stream order. */
export function uploadI32(rt: GpuRuntime, shape: number[], values: readonly number[]): DeviceTensor {
  const t = DeviceTensor.emptyOn('i32', shape, rt.stream);
  t.owner!.copyFromHostAsync(Int32Array.from(values), rt.stream);
  return t;
}

export function dispatchInputs(rt: GpuRuntime, req: DispatchRequest): DispatchInputs {
  const x = rt.onDevice('x', req.x);
  const scales = req.scales ? rt.onDevice('scales', req.scales, { strided: true }) : undefined;
  const fresh = req.kind === 'fresh';
  const topk = fresh && req.topkIdx ? rt.onDevice('topkIdx', req.topkIdx) : undefined;
  const weights = fresh && req.topkWeights ? rt.onDevice('topkWeights', req.topkWeights) : undefined;
  return {
    x,
    T: x.shape[0]!,
    elt: x.dtype === 'fp8_e4m3' ? 1 : 2,
    scales,
    scaleWords: scales ? scales.shape[1]! : 0,
    topk,
    weights,
    K: topk ? topk.shape[1]! : 0,
  };
}

/**
 * Exact- or worst-case-size dispatch outputs from the stream-ordered pool, for `stream`'s work and freed
 * on `freeOn` (the call's stream, where the caller's work runs). The source indices go into a fresh
 * dispatch's handle; a cached dispatch has them already (`withSrcIdx` false).
 */
export function dispatchOutputs(
  inp: DispatchInputs,
  rows: number,
  hidden: number,
  stream: Stream,
  withSrcIdx: boolean,
  freeOn: Stream = stream,
) {
  const empty = <D extends DType>(dtype: D, shape: number[]) =>
    DeviceTensor.emptyOn(dtype, shape, stream, freeOn);
  return {
    recvX: empty(inp.x.dtype, [rows, hidden]),
    recvScales: inp.scales ? empty(inp.scales.dtype, [rows, inp.scaleWords]) : undefined,
    recvSrcIdx: withSrcIdx ? empty('i32', [rows]) : undefined,
    recvTopkIdx: inp.topk ? empty(inp.topk.dtype, [rows, inp.K]) : undefined,
    recvTopkWeights: inp.weights ? empty('f32', [rows, inp.K]) : undefined,
  };
}

export type DispatchOutputs = ReturnType<typeof dispatchOutputs>;

/** Where each block starts when blocks of these sizes lie back to back: [0, v0, v0 + v1, ...]. */
export function exclusivePrefix(v: readonly number[]): number[] {
  const out: number[] = [];
  let acc = 0;
  for (const x of v) {
    out.push(acc);
    acc += x;
  }
  return out;
}

/**
 * Fills worst-case-size dispatch outputs whole on `stream` before the rows are copied in: zeros, and -1
 * (every byte 0xff) in source indices and expert ids, which is what rows past the received ones keep.
 */
export function padDispatchOutputs(out: DispatchOutputs, stream: Stream): void {
  out.recvX.fillBytes(0, stream);
  out.recvScales?.fillBytes(0, stream);
  out.recvSrcIdx?.fillBytes(0xff, stream);
  out.recvTopkIdx?.fillBytes(0xff, stream);
  out.recvTopkWeights?.fillBytes(0, stream);
}

/** One specialization of kernels/normal.cu, with a launcher per kernel. */
export class NormalKernels {
  private readonly mod: Module;
  constructor(mod: Module) {
    this.mod = mod;
  }

  /** The compiled module, for the transport-specific helpers below the class. */
  get module(): Module {
    return this.mod;
  }

  /** Blocks < R number this rank's tokens per destination; block R (grid R + 1) exchanges the counts. */
  notify(
    stream: Stream,
    grid: number,
    a: {
      peers: bigint;
      me: number;
      T: number;
      inRank: bigint;
      perRank: bigint;
      perExpert: bigint;
      rankPrefix: bigint;
      sendPos: bigint;
      recvCount: bigint;
      host: bigint;
      seq: number;
      alignment: number;
      timeoutNs: bigint;
      fail: FailArgs;
    },
  ): void {
    this.mod
      .kernel('tsep_notify', [
        'ptr',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'i32',
        'i32',
        'u64',
        ...FAIL_KINDS,
      ])
      .launch({ grid, block: 256, stream }, [
        a.peers,
        a.me,
        a.T,
        a.inRank,
        a.perRank,
        a.perExpert,
        a.rankPrefix,
        a.sendPos,
        a.recvCount,
        a.host,
        a.seq,
        a.alignment,
        a.timeoutNs,
        ...failArgs(a.fail),
      ]);
  }

  /**
   * The barrier before a cached dispatch (`which` 0) or a combine (1); a combine first tells every owner
   * the number of chunks (`chunks`) this rank cuts the rows it returns into.
   */
  prepare(
    stream: Stream,
    a: { peers: bigint; me: number; which: 0 | 1; chunks: number; timeoutNs: bigint; fail: FailArgs },
  ): void {
    this.mod
      .kernel('tsep_prepare', ['ptr', 'i32', 'i32', 'i32', 'u64', ...FAIL_KINDS])
      .launch({ grid: 1, block: 32, stream }, [
        a.peers,
        a.me,
        a.which,
        a.chunks,
        a.timeoutNs,
        ...failArgs(a.fail),
      ]);
  }

  /**
   * Each token's row (and metadata) to row `rowOffset(me → r) + sendPos[t][r]` of every destination r, in
   * `numChunks` chunks of tokens, each announced to every receiver when `areas.chunks` is set.
   */
  send(
    stream: Stream,
    blocks: number,
    a: {
      peers: bigint;
      me: number;
      inp: DispatchInputs;
      sendPos: bigint;
      rankPrefix: bigint;
      areas: NormalAreas;
      /** This rank's outputs, when its own rows go straight there (the receive then skips them). */
      own?: DispatchOutputs;
      numChunks: number;
      fail: FailArgs;
    },
  ): void {
    const { inp, own } = a;
    this.mod
      .kernel('tsep_dispatch_send', [
        'ptr',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'i64',
        'i64',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        ...AREA_KINDS,
        ...OWN_KINDS,
        'i32',
        ...FAIL_KINDS,
      ])
      .launch({ grid: blocks, block: SEND_THREADS, stream }, [
        a.peers,
        a.me,
        inp.T,
        inp.x.ptr,
        inp.scales?.ptr ?? 0n,
        inp.scales?.strides[0] ?? 0,
        inp.scales?.strides[1] ?? 0,
        inp.topk?.ptr ?? 0n,
        inp.weights?.ptr ?? 0n,
        a.sendPos,
        a.rankPrefix,
        ...areaArgs(a.areas),
        own?.recvX.ptr ?? 0n,
        own?.recvScales?.ptr ?? 0n,
        own?.recvSrcIdx?.ptr ?? 0n,
        own?.recvTopkIdx?.ptr ?? 0n,
        own?.recvTopkWeights?.ptr ?? 0n,
        a.numChunks,
        ...failArgs(a.fail),
      ]);
  }

  /** Copies each announced chunk out of the buffer into the outputs, concurrently with the sends. */
  recv(
    stream: Stream,
    blocks: number,
    a: {
      peers: bigint;
      me: number;
      rankPrefix: bigint;
      recvCount: bigint;
      rows: number;
      out: DispatchOutputs;
      areas: NormalAreas;
      /** The send wrote this rank's own rows into `out` already. */
      ownDirect: boolean;
      numChunks: number;
      timeoutNs: bigint;
      fail: FailArgs;
    },
  ): void {
    this.mod
      .kernel('tsep_dispatch_recv', [
        'ptr',
        'i32',
        'ptr',
        'ptr',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        ...AREA_KINDS,
        'i32',
        'i32',
        'u64',
        ...FAIL_KINDS,
      ])
      .launch({ grid: blocks, block: RECV_THREADS, stream }, [
        a.peers,
        a.me,
        a.rankPrefix,
        a.recvCount,
        a.rows,
        a.out.recvX.ptr,
        a.out.recvScales?.ptr ?? 0n,
        a.out.recvSrcIdx?.ptr ?? 0n,
        a.out.recvTopkIdx?.ptr ?? 0n,
        a.out.recvTopkWeights?.ptr ?? 0n,
        ...areaArgs(a.areas),
        a.ownDirect ? 1 : 0,
        a.numChunks,
        a.timeoutNs,
        ...failArgs(a.fail),
      ]);
  }

  combineSend(
    stream: Stream,
    blocks: number,
    a: {
      peers: bigint;
      me: number;
      x: bigint;
      rankPrefix: bigint;
      weights: bigint;
      areas: NormalAreas;
      numChunks: number;
      fail: FailArgs;
    },
  ): void {
    this.mod
      .kernel('tsep_combine_send', ['ptr', 'i32', 'ptr', 'ptr', 'ptr', ...AREA_KINDS, 'i32', ...FAIL_KINDS])
      .launch({ grid: blocks, block: SEND_THREADS, stream }, [
        a.peers,
        a.me,
        a.x,
        a.rankPrefix,
        a.weights,
        ...areaArgs(a.areas),
        a.numChunks,
        ...failArgs(a.fail),
      ]);
  }

  /**
   * Copy-engine combine: announces piece `piece` of the rows this rank returns to `dst` (one thread; the
   * copy before it on `stream` is done when it runs), tagged with the device's combine sequence number.
   */
  combineSignal(
    stream: Stream,
    a: {
      peers: bigint;
      me: number;
      dst: number;
      piece: number;
      areas: NormalAreas;
      numChunks: number;
      fail: FailArgs;
    },
  ): void {
    this.mod
      .kernel('tsep_combine_signal', ['ptr', 'i32', 'i32', 'i32', ...AREA_KINDS, 'i32', ...FAIL_KINDS])
      .launch({ grid: 1, block: 32, stream }, [
        a.peers,
        a.me,
        a.dst,
        a.piece,
        ...areaArgs(a.areas),
        a.numChunks,
        ...failArgs(a.fail),
      ]);
  }

  /**
   * Token t's row from rank r is stage row base(r) + sendPos[t][r]. `rowBase` 0n (NVLink): base(r) =
   * r·T_max, waiting for the chunk of rank r that holds the row (rows per chunk from `rankPrefix` and the
   * chunk count rank r published in its prepare); else base(r) = rowBase[r] (NCCL: the rows are all there).
   * `ownX` (NVLink: the combine's input) holds the rows this rank returns to itself, read in place
   * (weights in `ownWeights`); 0n for none.
   */
  reduce(
    stream: Stream,
    blocks: number,
    a: {
      peers: bigint;
      me: number;
      T: number;
      inRank: bigint;
      bias: readonly DeviceTensor[];
      out: bigint;
      outWeights: bigint;
      sendPos: bigint;
      rowBase: bigint;
      rankPrefix: bigint;
      areas: NormalAreas;
      /** Words per source in the combine word array (their stride; the buffer's combine chunk count). */
      numChunks: number;
      ownX: bigint;
      ownWeights: bigint;
      timeoutNs: bigint;
      fail: FailArgs;
    },
  ): void {
    this.mod
      .kernel('tsep_combine_reduce', [
        'ptr',
        'i32',
        'i32',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        'ptr',
        ...AREA_KINDS,
        'i32',
        'ptr',
        'ptr',
        'u64',
        ...FAIL_KINDS,
      ])
      .launch({ grid: blocks, block: 512, stream }, [
        a.peers,
        a.me,
        a.T,
        a.inRank,
        a.bias[0]?.ptr ?? 0n,
        a.bias[1]?.ptr ?? 0n,
        a.out,
        a.outWeights,
        a.sendPos,
        a.rowBase,
        a.rankPrefix,
        ...areaArgs(a.areas),
        a.numChunks,
        a.ownX,
        a.ownWeights,
        a.timeoutNs,
        ...failArgs(a.fail),
      ]);
  }
}

/** NCCL worst-case mode: prefix matrix, received rows and rows per source from the all-gathered counts. */
export function launchNcclCounts(
  kernels: NormalKernels,
  stream: Stream,
  a: { all: bigint; stride: number; me: number; rankPrefix: bigint; recvCount: bigint; recvFrom: bigint },
): void {
  kernels.module
    .kernel('tsep_nccl_counts', ['ptr', 'i32', 'i32', 'ptr', 'ptr', 'ptr'])
    .launch({ grid: 1, block: 32, stream }, [a.all, a.stride, a.me, a.rankPrefix, a.recvCount, a.recvFrom]);
}

/** R row blocks between a padded layout (`blockStride` bytes apart) and a packed one; see normal.cu. */
export function launchMoveBlocks(
  kernels: NormalKernels,
  stream: Stream,
  blocks: number,
  a: {
    count: bigint;
    gather: boolean;
    src: bigint;
    dst: bigint;
    blockStride: number;
    dstRows: number;
    rowBytes: number;
    fill: number;
  },
): void {
  if (a.rowBytes === 0) return;
  kernels.module
    .kernel('tsep_move_blocks', ['ptr', 'i32', 'ptr', 'ptr', 'i64', 'i32', 'i32', 'i32'])
    .launch({ grid: blocks, block: 256, stream }, [
      a.count,
      a.gather ? 1 : 0,
      a.src,
      a.dst,
      a.blockStride,
      a.dstRows,
      a.rowBytes,
      a.fill,
    ]);
}

/** Compiles (once per specialization) and wraps kernels/normal.cu. */
export class NormalModules {
  private readonly rt: GpuRuntime;
  private readonly cache = new Map<string, Promise<NormalKernels>>();
  /**
   * 16-byte loads per lane in flight in the send kernels' row copies, and (divided among the sources) in
   * the combine reduce: a tuning knob, TSEP_NORMAL_UNROLL. 8 by default: at one rank 4 → 8 took a cached
   * BF16 dispatch from 130.4 to 114.5 µs and the combine from 132.3 to 123.1 at 24 SMs (bench/RESULTS.md);
   * 16 spills registers at 8 ranks.
   */
  private readonly unroll = intSetting('TSEP_NORMAL_UNROLL', 8, 1, 16);

  constructor(rt: GpuRuntime) {
    this.rt = rt;
  }

  get(spec: {
    elt: number;
    scaleWords: number;
    K: number;
    idx64: boolean;
    weights: boolean;
  }): Promise<NormalKernels> {
    const R = this.rt.group.size;
    const defines = {
      TSEP_R: R,
      TSEP_EL: this.rt.options.numExperts / R,
      TSEP_H: this.rt.options.hidden,
      TSEP_ELT: spec.elt,
      TSEP_SW: spec.scaleWords,
      TSEP_K: spec.K,
      TSEP_IDX64: spec.idx64 ? 1 : 0,
      TSEP_WEIGHTS: spec.weights ? 1 : 0,
      TSEP_TMAX: this.rt.options.maxTokensPerRank,
      TSEP_UNROLL: this.unroll,
    };
    const key = JSON.stringify(defines);
    let m = this.cache.get(key);
    if (!m) {
      m = this.rt.kernels('normal.cu', defines).then((mod) => new NormalKernels(mod));
      this.cache.set(key, m);
      m.catch(() => this.cache.delete(key));
    }
    return m;
  }
}

/** Host phases of EP calls run one at a time, in call order (they share buffers and signal pages). */
export class CallQueue {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(work: () => Promise<T>): Promise<T> {
    const run = this.tail.then(work, work);
    this.tail = run.catch(() => undefined);
    return run;
  }

  /** Resolves once every queued call has settled. */
  async idle(): Promise<void> {
    await this.tail;
  }
}
