// Normal-mode benchmark (DESIGN §5), run on every rank under the launcher:
//   tsep bench normal [-n R] [-- --tokens 4096 --hidden 7168 --topk 8 --experts 256 --sms 16,24,32 --iters 30
//                               --warmup 5 --host-warmup 50 --transport auto|nvlink|nccl|nvshmem
//                               --ranks-per-host P --no-nccl-transport --no-nccl]
// Standard shape: 4096 tokens per rank, hidden 7168, top-8 of 256 experts, uniform random routing.
// Times, with CUDA events around each whole call on the buffer's stream, calls back to back after warm-up
// (--host-warmup runs of every call first, then --warmup before each op's timed calls) with a 256 MiB
// memset before each (L2 flush), as DeepEP's bench does:
//   FP8 and BF16 cached dispatch (DeepEP's V1 convention: no count exchange), FP8 fresh dispatch (count
//   exchange + host read of the counts), combine, and the layout kernel;
// logical bandwidth = bytes received by a rank (own tokens included; FP8 rows count H + 4·H/128 bytes) /
// time; per iteration the slowest rank's time. NCCL all-to-all of the same bytes runs in the same job, and
// (unless --no-nccl-transport) the same calls on a second buffer over the NCCL transport ("NCCL-tr");
// --no-nccl skips both; so does a job whose ranks share a GPU (NCCL refuses that), saying so. Across hosts
// (transport 'nvshmem') it also prints what one dispatch moved between hosts (counted on the device) and over
// NVLink.

import { parseArgs } from 'node:util';
import { Rng } from '../src/cpu/random.ts';
import { DeviceTensor } from '../src/device/device-tensor.ts';
import { DeviceBuffer } from '../src/device/memory.ts';
import { Event } from '../src/device/stream.ts';
import { HostTensor } from '../src/device/tensor.ts';
import { initProcessGroup } from '../src/dist/init.ts';
import { NcclCommunicator } from '../src/dist/nccl-comm.ts';
import { gatherPlaces, sharedGpu } from '../src/dist/rank-place.ts';
import { EpBuffer } from '../src/ep/buffer.ts';
import { HierNormalPath } from '../src/ep/gpu/hier-normal.ts';
import { chunkCounts, combinePieces, smShares } from '../src/ep/gpu/normal-kernels.ts';
import type { DispatchHandle, TransportKind } from '../src/ep/types.ts';
import { randomBf16, randomFp8, randomRouting, routingTensor } from '../test/unit/helpers/inputs.ts';
import {
  gbPerS,
  l2Flusher,
  printTable,
  slowestPerIteration,
  summarize,
  timeEvents,
  writeResult,
} from './stats.ts';

const { values: opt } = parseArgs({
  options: {
    tokens: { type: 'string', default: '4096' },
    hidden: { type: 'string', default: '7168' },
    topk: { type: 'string', default: '8' },
    experts: { type: 'string', default: '256' },
    sms: { type: 'string', default: '16,24,32' },
    iters: { type: 'string', default: '30' },
    warmup: { type: 'string', default: '5' },
    'host-warmup': { type: 'string', default: '50' },
    seed: { type: 'string', default: String(Date.now() >>> 0) },
    transport: { type: 'string', default: 'auto' },
    'nccl-transport': { type: 'boolean', default: true },
    nccl: { type: 'boolean', default: true },
    'ranks-per-host': { type: 'string' },
  },
  allowNegative: true,
  strict: true,
});
const T = Number(opt.tokens);
const H = Number(opt.hidden);
const K = Number(opt.topk);
const E = Number(opt.experts);
const smsList = opt.sms.split(',').map(Number);
const iters = Number(opt.iters);
const warmup = Number(opt.warmup);
const hostWarmup = Number(opt['host-warmup']);

const group = await initProcessGroup({ timeoutMs: 120_000 });
const R = group.size;
const rank = group.rank;
const buffer = await EpBuffer.create(group, {
  hidden: H,
  maxTokensPerRank: T,
  numExperts: E,
  numTopk: K,
  backend: 'gpu',
  transport: opt.transport as TransportKind,
  ...(opt['ranks-per-host'] ? { ranksPerHost: Number(opt['ranks-per-host']) } : {}),
});
const stream = buffer.stream!;
const chunks = chunkCounts(T);
const shares = smShares();
const pieces = combinePieces(chunks);
const dev = stream.device;
const rng = new Rng(Number(opt.seed) + rank * 1_000_003);
// NCCL refuses two ranks on one GPU: its columns are skipped then, saying why.
const ncclSkipped = !opt.nccl ? '--no-nccl' : sharedGpu(await gatherPlaces(group, dev));
const up = (t: HostTensor) => DeviceTensor.fromHostStorage(t, dev);

const topk = up(routingTensor('i64', T, K, randomRouting(rng, T, K, E)));
const weights = up(
  HostTensor.from(
    'f32',
    [T, K],
    Float32Array.from({ length: T * K }, () => rng.float()),
  ),
);
const xBf16 = up(randomBf16(rng, T, H));
const fp8 = randomFp8(rng, T, H, 'f32');
const xFp8 = up(fp8.x);
const scales = up(fp8.scales);
// A memset before each timed call flushes L2, as DeepEP's bench does.
const l2 = l2Flusher(dev, rank);
const beforeEach = (on = stream) => l2.flush(on);

/** Frees the device tensors of a call's result (stream-ordered: safe while the stream still uses them). */
function release(result: unknown): void {
  for (const v of Object.values(result as object)) if (v instanceof DeviceTensor) v.dispose();
}

/** Host time (ms) of each timed call of the last timeCall: API entry to the call's work enqueued. */
let hostMs: number[] = [];

/** Per-iteration times (ms) of an async EP call, CUDA events on the buffer's stream (`on`) around each. */
async function timeCall(fn: () => Promise<unknown>, on = stream): Promise<number[]> {
  hostMs = [];
  // Warm-up outputs go back to the pool before the timed calls, so those reuse their memory instead of
  // growing the pool inside the timed loop.
  for (let i = 0; i < warmup; i++) release(await fn());
  await on.synchronize();
  await group.barrier();
  const ev = Array.from({ length: 2 * iters }, () => Event.create(dev, { timing: true }));
  // Back to back, as DeepEP's bench runs: the host enqueues ahead of the GPU, so neither its enqueue time
  // nor the ranks' start skew (absorbed by the first call's barrier) is timed, and clocks stay up.
  for (let i = 0; i < iters; i++) {
    beforeEach(on);
    ev[2 * i]!.record(on);
    const t0 = performance.now();
    const result = await fn();
    hostMs.push(performance.now() - t0);
    ev[2 * i + 1]!.record(on);
    // Outputs come from the stream-ordered pool: freeing them now reuses the memory next call, as a
    // training loop that drops each step's outputs would.
    release(result);
  }
  await ev[2 * iters - 1]!.synchronize({ timeoutMs: 120_000 });
  const ms = Array.from({ length: iters }, (_, i) => Event.elapsedMs(ev[2 * i]!, ev[2 * i + 1]!));
  for (const e of ev) e.dispose();
  return ms;
}

const f64 = (b: Uint8Array) => new Float64Array(new Uint8Array(b).buffer);

/**
 * Across hosts (transport 'nvshmem'): what the first dispatch put to other hosts, counted on the device,
 * against one message per destination rank (what a flat all-to-all moves); and the rows each rank read
 * from its host's proxies over NVLink. Means over the ranks; undefined on other transports.
 */
async function crossHostReport() {
  const path = (buffer as unknown as { impl: { normal?: unknown } }).impl.normal;
  if (!(path instanceof HierNormalPath)) return undefined;
  const got = await path.crossHostTraffic();
  const P = buffer.options.ranksPerHost;
  // One message per destination rank: this rank's tokens for each rank on another host (the layout's counts).
  const perDest = (layout.numTokensPerRank as DeviceTensor).toHost().data as Int32Array;
  const perRank = perDest.reduce((a, n, r) => a + (Math.floor(r / P) === Math.floor(rank / P) ? 0 : n), 0);
  return {
    ranksPerHost: P,
    tokens: await meanAcrossRanks(got.tokens),
    bytes: await meanAcrossRanks(got.bytes),
    perDestinationRankTokens: await meanAcrossRanks(perRank),
    nvlinkRows: await meanAcrossRanks(N),
  };
}

/** Slowest rank's time per iteration. */
const slowest = (ms: number[]) => slowestPerIteration(group, ms);

async function meanAcrossRanks(v: number): Promise<number> {
  const all = await group.allGather(new Uint8Array(Float64Array.of(v).buffer));
  return all.reduce((a, b) => a + f64(b)[0]!, 0) / R;
}

const layout = buffer.getDispatchLayout(topk, E);
const first = await buffer.dispatch({ x: xFp8, scales, topkIdx: topk, topkWeights: weights, layout });
await first.event.wait();
const handle: DispatchHandle = first.handle;
const N = handle.numRecvRows;
const crossHost = await crossHostReport();
const S = Math.ceil(H / 128);
const fp8Bytes = await meanAcrossRanks(N * (H + 4 * S));
const bf16Bytes = await meanAcrossRanks(N * 2 * H);
const expertOut = up(randomBf16(rng, N, H));

interface Row {
  op: string;
  sms: number;
  medianUs: number;
  p10Us: number;
  p90Us: number;
  hostUs: number;
  gbps: number;
  ncclUs?: number;
  ratio?: number;
  /** The same call over the NCCL transport (last SM count), and its time / this row's. */
  ncclTransportUs?: number;
  transportRatio?: number;
}
const rows: Row[] = [];
const add = async (op: string, sms: number, ms: number[], bytes: number) => {
  const s = summarize(await slowest(ms));
  rows.push({
    op,
    sms,
    medianUs: s.median * 1000,
    p10Us: s.p10 * 1000,
    p90Us: s.p90 * 1000,
    hostUs: summarize(hostMs).median * 1000,
    gbps: gbPerS(bytes, s.median),
  });
};

/** The timed calls on buffer `b` (its own handles; the same routing and data on every buffer). */
async function callsOf(b: EpBuffer): Promise<[string, () => Promise<unknown>, number][]> {
  const l = b === buffer ? layout : b.getDispatchLayout(topk, E);
  const fp8 =
    b === buffer
      ? handle
      : (await b.dispatch({ x: xFp8, scales, topkIdx: topk, topkWeights: weights, layout: l })).handle;
  const bf = (await b.dispatch({ x: xBf16, topkIdx: topk, topkWeights: weights, layout: l })).handle;
  return [
    ['dispatch fp8 (cached)', () => b.dispatch({ x: xFp8, scales, handle: fp8 }), fp8Bytes],
    ['dispatch bf16 (cached)', () => b.dispatch({ x: xBf16, handle: bf }), bf16Bytes],
    ['combine bf16', () => b.combine({ x: expertOut, handle: fp8 }), bf16Bytes],
    [
      'dispatch fp8 (fresh, host sync)',
      () => b.dispatch({ x: xFp8, scales, topkIdx: topk, topkWeights: weights, layout: l }),
      fp8Bytes,
    ],
  ];
}

for (const [i, sms] of smsList.entries()) {
  buffer.setNumSms(sms);
  const calls = await callsOf(buffer);
  // The host side warms up first (V8 compiles the call paths after some dozens of runs): otherwise the
  // first op timed runs slower host code than the rest, and its host time can exceed the GPU's.
  if (i === 0) for (const [, fn] of calls) for (let j = 0; j < hostWarmup; j++) release(await fn());
  for (const [op, fn, bytes] of calls) await add(op, sms, await timeCall(fn), bytes);
}
await add('layout', 0, await timeCall(async () => buffer.getDispatchLayout(topk, E)), 0);

// The same calls over the NCCL transport, in the same job (issue "NCCL transport": what the calls cost
// written with NCCL collectives), at the last SM count; skipped with --no-nccl-transport.
if (buffer.transport!.transport !== 'nccl' && opt['nccl-transport'] && ncclSkipped === undefined) {
  const nb = await EpBuffer.create(group, {
    hidden: H,
    maxTokensPerRank: T,
    numExperts: E,
    numTopk: K,
    backend: 'gpu',
    transport: 'nccl',
  });
  const sms = smsList[smsList.length - 1]!;
  nb.setNumSms(sms);
  for (const [op, fn] of await callsOf(nb)) {
    const us = summarize(await slowest(await timeCall(fn, nb.stream!))).median * 1000;
    for (const r of rows.filter((x) => x.op === op)) {
      r.ncclTransportUs = us;
      r.transportRatio = us / r.medianUs;
    }
  }
  await nb.destroy();
}

// With TSEP_PROFILE=1: device time per kernel of each call (median over calls, slowest rank), at the
// last SM count; calls run one at a time with the ranks aligned, as above.
const phaseRows: (string | number)[][] = [];
if (process.env.TSEP_PROFILE === '1') {
  for (const [op, fn] of await callsOf(buffer)) {
    const per: Record<string, number[]> = {};
    for (let i = 0; i < iters; i++) {
      await stream.synchronize();
      await group.barrier();
      beforeEach();
      release(await fn());
      for (const [phase, ms] of Object.entries((await buffer.phaseTimes()) ?? {})) {
        per[phase] ??= [];
        per[phase].push(ms);
      }
    }
    for (const [phase, ms] of Object.entries(per)) {
      phaseRows.push([op, phase, summarize(await slowest(ms)).median * 1000]);
    }
  }
}

// NCCL all-to-all of the same bytes (each rank sends an equal share of what it receives), same job.
const comm = ncclSkipped === undefined ? await NcclCommunicator.create(group, dev) : undefined;
const ncclFor = async (c: NcclCommunicator, bytes: number) => {
  const count = Math.ceil(bytes / R / 2 / 64) * 64;
  const send = DeviceBuffer.alloc(count * 2 * R, dev);
  const recv = DeviceBuffer.alloc(count * 2 * R, dev);
  send.fill(0x3c, stream);
  const ms = await timeEvents(stream, iters, () => c.allToAll(send.ptr, recv.ptr, count, 'bf16', stream), {
    warmup,
    afterWarmup: () => group.barrier(),
    beforeEach,
  });
  send.dispose();
  recv.dispose();
  return summarize(await slowest(ms)).median * 1000;
};
if (comm) {
  const ncclFp8 = await ncclFor(comm, fp8Bytes);
  const ncclBf16 = await ncclFor(comm, bf16Bytes);
  for (const r of rows) {
    if (r.op === 'layout') continue;
    r.ncclUs = r.op.includes('fp8') ? ncclFp8 : ncclBf16;
    r.ratio = r.ncclUs / r.medianUs;
  }
}

if (rank === 0 && crossHost) {
  const c = crossHost;
  process.stdout.write(
    `across hosts of ${c.ranksPerHost} ranks (NVSHMEM), one FP8 dispatch, mean per rank: ${c.tokens.toFixed(0)} tokens ` +
      `(${(c.bytes / 2 ** 20).toFixed(1)} MiB) put to other hosts, one per destination host (one per destination rank ` +
      `would be ${c.perDestinationRankTokens.toFixed(0)}, ×${(c.perDestinationRankTokens / Math.max(c.tokens, 1)).toFixed(2)}); ` +
      `${c.nvlinkRows.toFixed(0)} rows (${((c.nvlinkRows * (H + 4 * S)) / 2 ** 20).toFixed(1)} MiB) read from the host's proxies over NVLink\n`,
  );
}
if (rank === 0) {
  process.stdout.write(
    `tsep normal mode over ${buffer.transport!.transport} (${buffer.transport!.reason}), EP${R} on ${dev.info.name}: T=${T} H=${H} top-${K} of ${E}; ` +
      `received rows per rank ≈ ${Math.round(bf16Bytes / (2 * H))}; chunks per source: ${chunks.dispatch} dispatch, ` +
      `${chunks.combine} combine (TSEP_NORMAL_DISPATCH_CHUNKS, TSEP_NORMAL_COMBINE_CHUNKS); SMs beside the sends: ` +
      `${shares.recvPct} % receive, ${shares.reducePct} % reduce (TSEP_NORMAL_RECV_PCT, TSEP_NORMAL_REDUCE_PCT); ` +
      `combine rows ${pieces > 0 ? `over the copy engines, ${pieces} pieces per source` : 'sent by SMs'} (TSEP_NORMAL_COMBINE_PIECES); ` +
      `${warmup} warm-up + ${iters} timed calls, ` +
      'slowest rank per call, median\n',
  );
  printTable(
    [
      { header: 'op', align: 'left' },
      { header: 'SMs' },
      { header: 'median µs', digits: 1 },
      { header: 'p10 µs', digits: 1 },
      { header: 'p90 µs', digits: 1 },
      { header: 'host µs', digits: 1 },
      { header: 'GB/s', digits: 1 },
      { header: 'NCCL µs', digits: 1 },
      { header: 'NCCL/tsep', digits: 2 },
      { header: 'NCCL-tr µs', digits: 1 },
      { header: 'NCCL-tr/tsep', digits: 2 },
    ],
    rows.map((r) => [
      r.op,
      r.sms,
      r.medianUs,
      r.p10Us,
      r.p90Us,
      r.hostUs,
      r.gbps,
      r.ncclUs,
      r.ratio,
      r.ncclTransportUs,
      r.transportRatio,
    ]),
  );
  for (const op of [
    'dispatch fp8 (cached)',
    'dispatch bf16 (cached)',
    'combine bf16',
    'dispatch fp8 (fresh, host sync)',
  ]) {
    const b = rows.filter((r) => r.op === op).sort((a, c) => a.medianUs - c.medianUs)[0]!;
    process.stdout.write(
      `best ${op}: ${b.medianUs.toFixed(1)} µs, ${b.gbps.toFixed(1)} GB/s at ${b.sms} SMs ` +
        (b.ncclUs === undefined
          ? `(NCCL skipped: ${ncclSkipped})\n`
          : `(NCCL ${b.ncclUs.toFixed(1)} µs, NCCL/tsep ${b.ratio!.toFixed(2)})\n`),
    );
  }
  if (phaseRows.length > 0) {
    process.stdout.write(`device time per kernel at ${smsList[smsList.length - 1]} SMs (TSEP_PROFILE=1):\n`);
    printTable(
      [
        { header: 'op', align: 'left' },
        { header: 'kernel', align: 'left' },
        { header: 'median µs', digits: 1 },
      ],
      phaseRows,
    );
  }
  const path = writeResult('normal', {
    bench: 'normal',
    transport: buffer.transport!.transport,
    ...(crossHost ? { crossHost } : {}),
    chunks,
    shares,
    date: new Date().toISOString(),
    ranks: R,
    device: dev.info.name,
    T,
    H,
    K,
    E,
    fp8BytesPerRank: fp8Bytes,
    bf16BytesPerRank: bf16Bytes,
    rows,
    phases: phaseRows,
  });
  process.stdout.write(`wrote ${path}\n`);
}
comm?.destroy();
await buffer.destroy();
await group.destroy();
