// Low-latency dispatch/combine on the GPU backend: time per call, per phase (receive hooks), host
// overhead, buffer bytes, and NCCL all-to-all of the same bytes in the same run.
//
//   tsep bench low-latency [-n R] [--out FILE] [-- --tokens 128 …, the options below]
//   node src/cli/main.ts launch -n 4 -- node bench/low-latency.ts [--tokens 128] [--hidden 7168]
//       [--experts 288] [--topk 8] [--iters 200] [--warmup 20] [--sets 4] [--bf16]
//       [--transport auto|nvlink|nccl|nvshmem] [--ranks-per-host N] [--no-nccl]
//
// The transport is chosen as the GPU backend chooses it ('auto': NVLink on one host with peer access, else
// NCCL) and named in the header and the JSON. The launch-shape sweep covers the knobs of the path in use;
// the globaltimer stamps exist over NVLink only (over NCCL the transfers are NCCL's kernels).
//
// Standard shape (docs/low-latency.md): 128 tokens per rank, hidden 7168, top-8 of 288 experts, FP8
// dispatch, BF16 combine, routing uniformly random (no -1). Every iteration uses the next of `sets` input
// sets (fresh random activations and routing; the combine's expert outputs are one random buffer), and
// starts after a 256 MiB memset that flushes L2 (50 MiB), as DeepEP's bench does, so no call finds its
// inputs in L2.
// Times are CUDA events around the enqueued work of one iteration, back to back after warm-up; an
// iteration's time is the slowest rank's; tables show the median (p10/p90) over iterations.
// Logical bandwidth counts as DeepEP's test_low_latency.py does: per valid (token, expert) selection,
// dispatch moves H + H/128·4 + 16 bytes (FP8) or 2H + 16 (BF16) and combine 2H bytes.
// Phase times (hook mode) are taken with every rank's send phase finished (a host barrier between).
// --no-nccl skips the NCCL all-to-all rows; so does a job whose ranks share a GPU (NCCL refuses that).
// Rank 0 prints the table and writes JSON (TSEP_BENCH_OUT, else $OUT/low-latency.json, else bench/out/).

import { randomFillSync } from 'node:crypto';
import { parseArgs } from 'node:util';
import { Rng } from '../src/cpu/random.ts';
import { DeviceTensor } from '../src/device/device-tensor.ts';
import { DeviceBuffer } from '../src/device/memory.ts';
import { Kernel } from '../src/device/module.ts';
import { Event } from '../src/device/stream.ts';
import { HostTensor } from '../src/device/tensor.ts';
import { initProcessGroup } from '../src/dist/init.ts';
import { NcclCommunicator } from '../src/dist/nccl-comm.ts';
import { EpBuffer } from '../src/ep/buffer.ts';
import { GpuEvent } from '../src/ep/gpu/event.ts';
import type { LlGrids } from '../src/ep/gpu/ll-call.ts';
import { createLowLatencyMode } from '../src/ep/gpu/ll-mode.ts';
import { LowLatencyPath } from '../src/ep/gpu/low-latency.ts';
import { NcclLowLatencyPath } from '../src/ep/gpu/nccl-low-latency.ts';
import { GpuRuntime } from '../src/ep/gpu/runtime.ts';
import { probeTransportFacts } from '../src/ep/gpu/transport-probe.ts';
import { chooseTransport } from '../src/ep/transport.ts';
import type { EpEvent, LowLatencyHandle, TransportKind } from '../src/ep/types.ts';
import { resolveOptions } from '../src/ep/validate.ts';
import { loadKernelModule } from '../src/jit/compile.ts';
import { gbPerS, l2Flusher, printTable, slowestPerIteration, summarize, writeResult } from './stats.ts';

const { values } = parseArgs({
  options: {
    tokens: { type: 'string', default: '128' },
    hidden: { type: 'string', default: '7168' },
    experts: { type: 'string', default: '288' },
    topk: { type: 'string', default: '8' },
    iters: { type: 'string', default: '200' },
    warmup: { type: 'string', default: '20' },
    sets: { type: 'string', default: '4' },
    'phase-iters': { type: 'string', default: '40' },
    bf16: { type: 'boolean', default: false },
    transport: { type: 'string', default: 'auto' },
    'ranks-per-host': { type: 'string' },
    nccl: { type: 'boolean', default: true },
  },
  allowNegative: true,
  strict: true,
});
const T = Number(values.tokens);
const H = Number(values.hidden);
const E = Number(values.experts);
const K = Number(values.topk);
const ITERS = Number(values.iters);
const WARMUP = Number(values.warmup);
const SETS = Number(values.sets);
const PHASE_ITERS = Number(values['phase-iters']);
const FP8 = !values.bf16;
const WAIT_MS = 120_000;

const group = await initProcessGroup({ timeoutMs: WAIT_MS });
const R = group.size;
const me = group.rank;
const options = resolveOptions(
  {
    hidden: H,
    maxTokensPerRank: T,
    numExperts: E,
    numTopk: K,
    mode: 'low-latency',
    fp8: FP8,
    backend: 'gpu',
    ...(values['ranks-per-host'] ? { ranksPerHost: Number(values['ranks-per-host']) } : {}),
  },
  R,
  group.localSize,
);
const rt = GpuRuntime.create({ group, options, owner: { label: `bench rank ${me}` } });
const dev = rt.device;
const stream = rt.stream;
const requested = values.transport as TransportKind;
const facts = await probeTransportFacts(rt, requested);
const transport = chooseTransport(requested, facts);
// NCCL refuses two ranks on one GPU: the baseline is skipped then, saying why.
const ncclSkipped = !values.nccl ? '--no-nccl' : facts.sharedGpu;
const t0 = performance.now();
const path = await createLowLatencyMode(rt, transport.transport);
const createMs = performance.now() - t0;
/** The launch shapes the sweep varies (the NVLink path's have `fuse` too). */
const knobs: LlGrids & { fuse?: boolean } = path.tuning;
const El = E / R;
const RT = R * T;

// ------------------------------------------------------------------------------------------ inputs

const seed = Number(process.env.TSEP_BENCH_SEED ?? Math.floor(Math.random() * 2 ** 31)) >>> 0;
if (me === 0) process.stdout.write(`bench/low-latency seed ${seed}\n`);
const rng = new Rng(seed + 7919 * me);

function randomBf16Bits(n: number): Uint16Array {
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    const u = rng.u32();
    out[i] = ((u >>> 31) << 15) | ((120 + (u % 11)) << 7) | ((u >>> 8) & 0x7f);
  }
  return out;
}

interface InputSet {
  x: DeviceTensor;
  topk: DeviceTensor;
  weights: DeviceTensor;
  selections: number;
  /** Expected tokens this rank sends to each rank (deduplicated), for the byte count. */
  rankTokens: number;
  /** The part of rankTokens (dispatch) and selections (combine rows back) that crosses to other hosts. */
  remoteRankTokens: number;
  remoteSelections: number;
}

const perHost = options.ranksPerHost;
const otherHost = (r: number) => Math.floor(r / perHost) !== Math.floor(me / perHost);

const sets: InputSet[] = [];
for (let s = 0; s < SETS; s++) {
  const ids = new BigInt64Array(T * K);
  let rankTokens = 0;
  let remoteRankTokens = 0;
  let remoteSelections = 0;
  for (let t = 0; t < T; t++) {
    const picks = rng.distinct(E, K);
    const ranks = new Set<number>();
    for (let k = 0; k < K; k++) {
      ids[t * K + k] = BigInt(picks[k]!);
      ranks.add(Math.floor(picks[k]! / El));
      if (otherHost(Math.floor(picks[k]! / El))) remoteSelections++;
    }
    rankTokens += ranks.size;
    remoteRankTokens += [...ranks].filter(otherHost).length;
  }
  const w = new Float32Array(T * K);
  for (let i = 0; i < w.length; i++) w[i] = rng.float();
  sets.push({
    x: DeviceTensor.fromHost(HostTensor.from('bf16', [T, H], randomBf16Bits(T * H)), dev),
    topk: DeviceTensor.fromHost(HostTensor.from('i64', [T, K], ids), dev),
    weights: DeviceTensor.fromHost(HostTensor.from('f32', [T, K], w), dev),
    selections: T * K,
    rankTokens,
    remoteRankTokens,
    remoteSelections,
  });
}
// Expert outputs for combine: random bf16 over the whole [E_l, R·T, H] (a 16 MiB random block repeated).
const y = DeviceTensor.empty('bf16', [El, RT, H], dev);
{
  const block = randomBf16Bits(8 << 20);
  for (let off = 0; off < y.byteLength; off += block.byteLength) {
    const n = Math.min(block.byteLength, y.byteLength - off);
    y.owner!.copyFromHost(new Uint8Array(block.buffer, 0, n), off);
  }
}

const dispatch = (i: number, hook = false) =>
  path.dispatch({
    x: sets[i % SETS]!.x,
    topkIdx: sets[i % SETS]!.topk,
    fp8: FP8,
    roundScale: false,
    ue8m0: false,
    returnRecvHook: hook,
  });
const combine = (i: number, handle: ReturnType<typeof dispatch>['handle'], hook = false) =>
  path.combine({
    x: y,
    topkIdx: sets[i % SETS]!.topk,
    topkWeights: sets[i % SETS]!.weights,
    handle,
    returnRecvHook: hook,
  });

async function settle(what: string): Promise<void> {
  await stream.synchronize({ timeoutMs: WAIT_MS, what });
  const err = path.deviceError();
  if (err) throw new Error(err);
}

// Sanity: the counts of one dispatch equal what the routing asks for (a run that moves nothing fails).
{
  const d = dispatch(0);
  await d.event.wait();
  const count = d.recvCount instanceof DeviceTensor ? d.recvCount.toHost() : d.recvCount;
  const got = count.data as Int32Array;
  const all = await group.allGather(new Uint8Array(sets[0]!.topk.toHost().bytes()));
  const want = new Int32Array(El);
  for (const b of all) {
    const ids = new BigInt64Array(b.slice().buffer);
    for (const e of ids) if (Number(e) >= me * El && Number(e) < (me + 1) * El) want[Number(e) - me * El]!++;
  }
  for (let e = 0; e < El; e++) {
    if (got[e] !== want[e]) throw new Error(`sanity: recvCount[${e}] = ${got[e]}, want ${want[e]}`);
  }
}

// ------------------------------------------------------------------------------------------ timing

const timing = () => Event.create(dev, { timing: true });
// A memset before each iteration (and before a hook-mode combine send) flushes L2.
const l2 = l2Flusher(dev, me);
const GATE_NS = Number(process.env.TSEP_BENCH_GATE_US ?? 20) * 1000;
/** An iteration's start: L2 flushed, then (gated) path.gate's spin and barrier of the ranks. */
const startIteration = (gated = true): void => {
  l2.flush(stream);
  if (gated) path.gate(GATE_NS);
};

/**
 * Timed iterations. Each starts with startIteration(): an L2 flush, then path.gate(): a ~20 us spin (the
 * host enqueues the iteration while the GPU is busy, so host time is not timed) and a device-side barrier of
 * the ranks (every rank starts the iteration together, so no rank's time includes another's host lateness).
 * `fn(i, start, end)` records start/end around what it times.
 */
async function timed(
  iters: number,
  fn: (i: number, start: Event, end: Event) => void,
  what: string,
  gated = true,
): Promise<number[]> {
  const [ws, we] = [timing(), timing()];
  for (let i = 0; i < WARMUP; i++) {
    startIteration(gated);
    fn(i, ws, we);
  }
  await settle(`${what} warm-up`);
  ws.dispose();
  we.dispose();
  await group.barrier();
  const starts = Array.from({ length: iters }, timing);
  const ends = Array.from({ length: iters }, timing);
  for (let i = 0; i < iters; i++) {
    startIteration(gated);
    fn(i, starts[i]!, ends[i]!);
  }
  await settle(what);
  const ms = starts.map((s, i) => Event.elapsedMs(s, ends[i]!));
  for (const e of [...starts, ...ends]) e.dispose();
  return slowest(ms);
}

/** Per iteration, the slowest rank's time. */
const slowest = (ms: number[]) => slowestPerIteration(group, ms);

const timeDispatch = (gated = true) =>
  timed(
    ITERS,
    (i, s, e) => {
      s.record(stream);
      dispatch(i);
      e.record(stream);
    },
    'dispatch',
    gated,
  );
const timeCombine = (gated = true) =>
  timed(
    ITERS,
    (i, s, e) => {
      const d = dispatch(i);
      if (gated) path.gate(0); // the dispatch is done everywhere before the combine's clock starts
      s.record(stream);
      combine(i, d.handle);
      e.record(stream);
    },
    'combine',
    gated,
  );
const timeBoth = (gated = true) =>
  timed(
    ITERS,
    (i, s, e) => {
      s.record(stream);
      const d = dispatch(i);
      combine(i, d.handle);
      e.record(stream);
    },
    'dispatch+combine',
    gated,
  );

const dispatchMs = await timeDispatch();
const combineMs = await timeCombine();
const bothMs = await timeBoth();
const ungated = {
  dispatch: await timeDispatch(false),
  combine: await timeCombine(false),
  both: await timeBoth(false),
};

// Launch-shape sweep: each knob alone, the others at their defaults.
const defaults = { ...knobs };
const sms = rt.smCount;
const sweep: { knob: string; value: number; dispatchUs?: number; combineUs?: number }[] = [];
const med = (ms: number[]) => summarize(ms).median * 1000;
if (knobs.fuse !== undefined) {
  knobs.fuse = false;
  sweep.push({
    knob: 'fuse (0 = two launches)',
    value: 0,
    dispatchUs: med(await timeDispatch()),
    combineUs: med(await timeCombine()),
  });
  knobs.fuse = defaults.fuse;
}
for (const v of [Math.round(sms / 4), Math.round(sms / 2), sms]) {
  knobs.dispatchSendBlocks = v;
  sweep.push({ knob: 'dispatchSendBlocks', value: v, dispatchUs: med(await timeDispatch()) });
}
knobs.dispatchSendBlocks = defaults.dispatchSendBlocks;
for (const v of [1, 2, 4]) {
  if (v === defaults.dispatchRecvParts) continue;
  knobs.dispatchRecvParts = v;
  sweep.push({ knob: 'dispatchRecvParts', value: v, dispatchUs: med(await timeDispatch()) });
}
knobs.dispatchRecvParts = defaults.dispatchRecvParts;
for (const v of [Math.round(sms / 2), 2 * sms]) {
  knobs.combineSendBlocks = v;
  sweep.push({ knob: 'combineSendBlocks', value: v, combineUs: med(await timeCombine()) });
}
knobs.combineSendBlocks = defaults.combineSendBlocks;
for (const v of [Math.round(sms / 2), sms]) {
  knobs.combineRecvBlocks = v;
  sweep.push({ knob: 'combineRecvBlocks', value: v, combineUs: med(await timeCombine()) });
}
knobs.combineRecvBlocks = defaults.combineRecvBlocks;

// Phases (hook mode), all on the device: gate; send; gate (every rank's send is done); receive.
const phase = { dsend: [] as number[], drecv: [] as number[], csend: [] as number[], crecv: [] as number[] };
{
  const n = PHASE_ITERS + 3;
  const ev = Array.from({ length: 8 * n }, timing);
  for (let i = 0; i < n; i++) {
    const e = ev.slice(8 * i, 8 * i + 8);
    startIteration();
    e[0]!.record(stream);
    const d = dispatch(i, true);
    e[1]!.record(stream);
    path.gate(GATE_NS);
    e[2]!.record(stream);
    await d.hook!();
    e[3]!.record(stream);
    startIteration();
    e[4]!.record(stream);
    const c = combine(i, d.handle, true);
    e[5]!.record(stream);
    path.gate(GATE_NS);
    e[6]!.record(stream);
    await c.hook!();
    e[7]!.record(stream);
  }
  await settle('phases');
  for (let i = 3; i < n; i++) {
    const e = ev.slice(8 * i, 8 * i + 8);
    phase.dsend.push(Event.elapsedMs(e[0]!, e[1]!));
    phase.drecv.push(Event.elapsedMs(e[2]!, e[3]!));
    phase.csend.push(Event.elapsedMs(e[4]!, e[5]!));
    phase.crecv.push(Event.elapsedMs(e[6]!, e[7]!));
  }
  for (const e of ev) e.dispose();
}
const phaseSlowest = {
  dsend: await slowest(phase.dsend),
  drecv: await slowest(phase.drecv),
  csend: await slowest(phase.csend),
  crecv: await slowest(phase.crecv),
};

// Inside the kernels (globaltimer stamps of this rank, gated dispatch+combine, one at a time; NVLink only).
// With fused launches a block starts its receive phase before the last block has signalled, so that gap is
// negative.
const stampSegs: Record<string, number[]> = {};
for (let i = 0; path instanceof LowLatencyPath && i < PHASE_ITERS; i++) {
  startIteration();
  const d = dispatch(i);
  path.gate(0);
  combine(i, d.handle);
  await settle('stamps');
  const t = path.stamps();
  const seg = (name: string, a: bigint, b: bigint) => {
    const list = stampSegs[name] ?? [];
    list.push(Number(b - a) / 1000);
    stampSegs[name] = list;
  };
  seg('dispatch send: start (block 0) -> acks seen', t.dispatchSendStart, t.dispatchSendReady);
  seg('dispatch send: acks -> signals sent (last block)', t.dispatchSendReady, t.dispatchSendSignal);
  seg('dispatch: send signals -> recv phase start (block 0)', t.dispatchSendSignal, t.dispatchRecvStart);
  seg('dispatch recv: start (block 0) -> all sources seen', t.dispatchRecvStart, t.dispatchRecvReady);
  seg('dispatch recv: sources seen -> end (last block)', t.dispatchRecvReady, t.dispatchRecvEnd);
  seg('dispatch: send start -> recv end', t.dispatchSendStart, t.dispatchRecvEnd);
  seg('combine send: start -> ready', t.combineSendStart, t.combineSendReady);
  seg('combine send: ready -> signals sent (last block)', t.combineSendReady, t.combineSendSignal);
  seg('combine: send signals -> recv phase start (block 0)', t.combineSendSignal, t.combineRecvStart);
  seg('combine recv: start (block 0) -> all expert ranks seen', t.combineRecvStart, t.combineRecvReady);
  seg('combine recv: seen -> end (last block)', t.combineRecvReady, t.combineRecvEnd);
  seg('combine: send start -> recv end', t.combineSendStart, t.combineRecvEnd);
}

// ------------------------------------------------------------------------------------------- bytes

const avg = (f: (s: InputSet) => number) => sets.reduce((a, s) => a + f(s), 0) / SETS;
const dispatchRowBytes = FP8 ? H + (H / 128) * 4 + 16 : 2 * H + 16;
const dispatchLogical = avg((s) => s.selections) * dispatchRowBytes; // DeepEP's count, bytes per rank
const combineLogical = avg((s) => s.selections) * 2 * H;
const msgBytes = FP8 ? H + (H / 128) * 4 : 2 * H;
// What tsep moves per rank: over NVLink one message per (token, destination rank); over NCCL the fixed
// blocks every rank receives (R dispatch blocks of the payload type, R combine blocks).
const wire =
  path instanceof NcclLowLatencyPath
    ? {
        dispatch: R * path.layout.blockBytes[FP8 ? 'fp8' : 'bf16'],
        combine: R * path.layout.combineBlockBytes,
      }
    : { dispatch: avg((s) => s.rankTokens) * msgBytes, combine: avg((s) => s.selections) * 2 * H };
// Of those, what goes between hosts (NVSHMEM with transport 'nvshmem', NCCL's network otherwise): a
// token's message once per destination rank on another host; combine rows from experts on other hosts
// (this rank's tokens' share, the same on average as what it sends back).
const crossHost = {
  dispatch: avg((s) => s.remoteRankTokens) * msgBytes,
  combine: avg((s) => s.remoteSelections) * 2 * H,
};

// ------------------------------------------------------------------------------------------- NCCL

async function ncclMs(comm: NcclCommunicator, bytesPerRank: number): Promise<number[]> {
  const count = Math.max(64, Math.floor(bytesPerRank / 2 / R / 64) * 64);
  const send = DeviceBuffer.alloc(count * 2 * R, dev);
  const recv = DeviceBuffer.alloc(count * 2 * R, dev);
  send.copyFromHost(randomFillSync(new Uint8Array(count * 2 * R)));
  const ms = await timed(
    ITERS,
    (_, s, e) => {
      s.record(stream);
      comm.allToAll(send.ptr, recv.ptr, count, 'bf16', stream);
      e.record(stream);
    },
    'NCCL all-to-all',
  );
  comm.checkAsyncError();
  send.dispose();
  recv.dispose();
  return ms;
}
const comm = ncclSkipped === undefined ? await NcclCommunicator.create(group, dev) : undefined;
const ncclDispatchMs = comm ? await ncclMs(comm, dispatchLogical) : undefined;
const ncclCombineMs = comm ? await ncclMs(comm, combineLogical) : undefined;

// ------------------------------------------------------------------------------------ host overhead

// Host cost of one public call (EpBuffer.lowLatencyDispatch / lowLatencyCombine: validation, the path's
// host work, the launch, the event). Timed on a buffer made through the public API with the same options,
// after the path above is destroyed (its memory is given back), two ways:
// - back to back: bursts of HOST_BURST calls of one kind, the GPU drained between bursts (the CPU busy
//   issuing, as in a decode loop that enqueues one call after another); each hook dispatch's hook is
//   called (untimed) before the next call, as hooks must be within two calls;
// - isolated: one call after the GPU went idle and the host waited for it (caches and clocks cold).
// Kernel.launch is wrapped for this section only, to split each call at its launches: API entry -> first
// launch issued (the library's own work before the driver; the "API entry to launch"), the launch
// call(s) (over NVLink and NVSHMEM the driver's cuLaunchKernel; over NCCL also the NCCL calls between the
// kernels), and last launch -> return (event record, result object). The wrapper's clock reads (~0.05 us
// each) fall into entry -> launch and the launch column; the empty launch pays for the whole wrapper.
const HOST_BURST = 32;
comm?.destroy();
const commBytes = path.bytes();
const outputRingBytes = path.outputBytes();
await settle('host overhead');
await path.destroy();
const pub = await EpBuffer.create(group, { ...options, transport: transport.transport });
// The floor under every call, taken in the same run (the host's speed varied between runs by up to ~1.7x):
// an empty kernel launched through the same FFI path.
const empty = (await loadKernelModule(dev, 'smoke.cu')).kernel('tsep_empty', []);
const marks = { first: 0, last: 0 };
const launchKernel = Kernel.prototype.launch;
Kernel.prototype.launch = function (this: Kernel, ...a: Parameters<Kernel['launch']>): void {
  const t = performance.now();
  if (marks.first === 0) marks.first = t;
  launchKernel.apply(this, a);
  marks.last = performance.now();
};
const hostKinds = ['dispatch', 'hookDispatch', 'combine', 'event', 'emptyLaunch'] as const;
type HostKind = (typeof hostKinds)[number];
/** Per call kind: [entry -> return, entry -> first launch, launch span, last launch -> return] in us. */
const hostSamples = (): Record<HostKind, number[][]> => ({
  dispatch: [[], [], [], []],
  hookDispatch: [[], [], [], []],
  combine: [[], [], [], []],
  event: [[]],
  emptyLaunch: [[]],
});
const host = { backToBack: hostSamples(), isolated: hostSamples() };
function hostCall<R>(into: number[][] | undefined, call: () => R): R {
  marks.first = 0;
  const t0 = performance.now();
  const r = call();
  const t1 = performance.now();
  if (into && into.length === 1) into[0]!.push((t1 - t0) * 1000);
  else if (into) {
    into[0]!.push((t1 - t0) * 1000);
    into[1]!.push((marks.first - t0) * 1000);
    into[2]!.push((marks.last - marks.first) * 1000);
    into[3]!.push((t1 - marks.last) * 1000);
  }
  return r;
}
try {
  for (let i = 0; i < PHASE_ITERS + 2; i++) {
    const s = sets[i % SETS]!;
    const dispatchArgs = { x: s.x, topkIdx: s.topk, fp8: FP8 };
    const hookArgs = { ...dispatchArgs, returnRecvHook: true };
    // Arguments are built outside the timed closures (the dispatch's and the combine's alike).
    const combineArgs = (handle: LowLatencyHandle) => ({
      x: y,
      topkIdx: s.topk,
      topkWeights: s.weights,
      handle,
    });
    // The first two rounds warm the code paths.
    const into = (mode: 'backToBack' | 'isolated', k: HostKind) => (i >= 2 ? host[mode][k] : undefined);

    const d = hostCall(into('isolated', 'dispatch'), () => pub.lowLatencyDispatch(dispatchArgs));
    await d.event.wait();
    const isolatedCombine = combineArgs(d.handle);
    const c = hostCall(into('isolated', 'combine'), () => pub.lowLatencyCombine(isolatedCombine));
    await c.event.wait();
    const dh = hostCall(into('isolated', 'hookDispatch'), () => pub.lowLatencyDispatch(hookArgs));
    await dh.hook!();
    await dh.event.wait();
    hostCall(into('isolated', 'event'), () => new GpuEvent(pub.stream!));
    await pub.stream!.synchronize({ timeoutMs: WAIT_MS });
    hostCall(into('isolated', 'emptyLaunch'), () =>
      empty.launch({ grid: 1, block: 32, stream: pub.stream! }, []),
    );

    let lastDispatch = d;
    for (let j = 0; j < HOST_BURST; j++) {
      lastDispatch = hostCall(into('backToBack', 'dispatch'), () => pub.lowLatencyDispatch(dispatchArgs));
    }
    let last: EpEvent = lastDispatch.event;
    await last.wait();
    // The newest dispatch's handle: older ones' outputs are overwritten after OUTPUT_RING calls.
    const burstCombine = combineArgs(lastDispatch.handle);
    for (let j = 0; j < HOST_BURST; j++) {
      last = hostCall(into('backToBack', 'combine'), () => pub.lowLatencyCombine(burstCombine)).event;
    }
    await last.wait();
    for (let j = 0; j < HOST_BURST; j++) {
      const r = hostCall(into('backToBack', 'hookDispatch'), () => pub.lowLatencyDispatch(hookArgs));
      await r.hook!();
      last = r.event;
    }
    await last.wait();
    for (let j = 0; j < HOST_BURST; j++)
      hostCall(into('backToBack', 'event'), () => new GpuEvent(pub.stream!));
    for (let j = 0; j < HOST_BURST; j++) {
      hostCall(into('backToBack', 'emptyLaunch'), () =>
        empty.launch({ grid: 1, block: 32, stream: pub.stream! }, []),
      );
    }
    await pub.stream!.synchronize({ timeoutMs: WAIT_MS });
  }
} finally {
  Kernel.prototype.launch = launchKernel;
}
await pub.destroy();

// ------------------------------------------------------------------------------------------ report

const us = (ms: number[]) => {
  const s = summarize(ms);
  return { median: s.median * 1000, p10: s.p10 * 1000, p90: s.p90 * 1000 };
};
const rows = [
  ['dispatch', us(dispatchMs), dispatchLogical],
  ['combine', us(combineMs), combineLogical],
  ['dispatch+combine', us(bothMs), dispatchLogical + combineLogical],
  ['dispatch send (hook)', us(phaseSlowest.dsend), undefined],
  ['dispatch recv (hook)', us(phaseSlowest.drecv), undefined],
  ['combine send (hook)', us(phaseSlowest.csend), undefined],
  ['combine recv (hook)', us(phaseSlowest.crecv), undefined],
  ...(ncclDispatchMs && ncclCombineMs
    ? ([
        ['NCCL a2a, dispatch bytes', us(ncclDispatchMs), dispatchLogical],
        ['NCCL a2a, combine bytes', us(ncclCombineMs), combineLogical],
      ] as const)
    : []),
  ['dispatch, ungated', us(ungated.dispatch), dispatchLogical],
  ['combine, ungated', us(ungated.combine), combineLogical],
  ['dispatch+combine, ungated', us(ungated.both), dispatchLogical + combineLogical],
] as const satisfies readonly (readonly [string, ReturnType<typeof us>, number | undefined])[];
const HOST_PARTS = ['entryToReturn', 'entryToLaunch', 'launch', 'launchToReturn'] as const;
const hostModes = ['backToBack', 'isolated'] as const;
/** Per mode, call kind and part (HOST_PARTS order): every rank's median in us (gathered as JSON, one call). */
const hostMedians = Object.fromEntries(
  hostModes.map((m) => [
    m,
    Object.fromEntries(hostKinds.map((k) => [k, host[m][k].map((v) => summarize(v).median)])),
  ]),
) as Record<(typeof hostModes)[number], Record<HostKind, number[]>>;
const allHost = (await group.allGather(new TextEncoder().encode(JSON.stringify(hostMedians)))).map(
  (b) => JSON.parse(new TextDecoder().decode(b)) as typeof hostMedians,
);
const hostByRank = Object.fromEntries(
  hostModes.map((m) => [
    m,
    Object.fromEntries(
      hostKinds.map((k) => [k, hostMedians[m][k].map((_, p) => allHost.map((r) => r[m][k][p]!))]),
    ),
  ]),
) as Record<(typeof hostModes)[number], Record<HostKind, number[][]>>;
/** One mode's line: per call kind the max over ranks of the medians, split at the launch. */
const hostLine = (m: (typeof hostModes)[number]) => {
  const max = (k: HostKind) => hostByRank[m][k].map((v) => Math.max(...v).toFixed(2));
  const call = (name: string, k: HostKind) => {
    const [all, before, launch, after] = max(k);
    return `${name} ${all} (entry -> launch ${before}, launch ${launch}, launch -> return ${after})`;
  };
  return `${call('dispatch', 'dispatch')}; ${call('dispatch with hook', 'hookDispatch')}; ${call('combine', 'combine')}; one GpuEvent ${max('event')[0]}; an empty kernel's launch ${max('emptyLaunch')[0]}`;
};
const stampRows = Object.entries(stampSegs).map(([name, v]) => {
  const s = summarize(v);
  return [name, s.median, s.p10, s.p90] as const;
});

if (me === 0) {
  process.stdout.write(
    `low-latency over ${transport.transport} (${transport.reason}), ${R} ranks on ${dev.info.name}: T=${T} H=${H} top-${K} of ${E} experts, ${FP8 ? 'FP8' : 'BF16'} dispatch, BF16 combine; ` +
      `${WARMUP} warm-up + ${ITERS} timed iterations (${PHASE_ITERS} for phases), ${SETS} input sets; ` +
      `gated (device barrier + ${GATE_NS / 1000} us spin before each iteration) unless marked; slowest rank per iteration, median\n`,
  );
  printTable(
    [
      { header: 'op', align: 'left' },
      { header: 'median us', digits: 1 },
      { header: 'p10 us', digits: 1 },
      { header: 'p90 us', digits: 1 },
      { header: 'logical GB/s', digits: 1 },
    ],
    rows.map(([name, t, bytes]) => [
      name,
      t.median,
      t.p10,
      t.p90,
      bytes === undefined ? undefined : gbPerS(bytes, t.median / 1000),
    ]),
  );
  const ratio = (a: number[], b: number[]) => summarize(a).median / summarize(b).median;
  const ncclOverTsep =
    ncclDispatchMs && ncclCombineMs
      ? { dispatch: ratio(ncclDispatchMs, dispatchMs), combine: ratio(ncclCombineMs, combineMs) }
      : undefined;
  process.stdout.write(
    (ncclOverTsep
      ? `NCCL all-to-all / tsep: dispatch ${ncclOverTsep.dispatch.toFixed(2)}x, combine ${ncclOverTsep.combine.toFixed(2)}x\n`
      : `NCCL all-to-all skipped (${ncclSkipped})\n`) +
      `host overhead per public call (median, max over ranks; us), back to back (bursts of ${HOST_BURST}): ${hostLine('backToBack')}\n` +
      `  isolated (one call, GPU idle): ${hostLine('isolated')}\n` +
      `bytes per rank: communication memory ${commBytes} (${(commBytes / 2 ** 20).toFixed(1)} MiB), output rings ${outputRingBytes} ` +
      `(${(outputRingBytes / 2 ** 20).toFixed(1)} MiB); ${transport.transport} payload per dispatch ${Math.round(wire.dispatch)} B ` +
      `vs DeepEP-logical ${Math.round(dispatchLogical)} B, per combine ${Math.round(wire.combine)} B; create ${createMs.toFixed(0)} ms\n` +
      (path instanceof NcclLowLatencyPath
        ? ''
        : `hosts of ${perHost} ranks: between hosts per dispatch ${Math.round(crossHost.dispatch)} B, per combine ` +
          `${Math.round(crossHost.combine)} B; inside the host (NVLink) the rest\n`) +
      `defaults ${JSON.stringify(defaults)}\n`,
  );
  printTable(
    [
      { header: 'launch shape', align: 'left' },
      { header: 'value' },
      { header: 'dispatch us', digits: 1 },
      { header: 'combine us', digits: 1 },
    ],
    sweep.map((r) => [r.knob, r.value, r.dispatchUs, r.combineUs]),
  );
  if (stampRows.length > 0) {
    process.stdout.write(
      "rank 0 globaltimer stamps (us; 'send start -> recv end' is the kernel's own time from its first block's " +
        "start to its last block's end, the convention of DeepEP's profiler-based low-latency numbers; the " +
        'event-timed rows above also hold the launch latency):\n',
    );
    printTable(
      [
        { header: 'segment', align: 'left' },
        { header: 'median', digits: 2 },
        { header: 'p10', digits: 2 },
        { header: 'p90', digits: 2 },
      ],
      stampRows.map((r) => [...r]),
    );
  }
  const out = writeResult('low-latency', {
    bench: 'low-latency',
    transport: transport.transport,
    transportReason: transport.reason,
    date: new Date().toISOString(),
    ranks: R,
    device: dev.info.name,
    shape: { tokens: T, hidden: H, experts: E, topk: K, fp8Dispatch: FP8 },
    iters: ITERS,
    warmup: WARMUP,
    phaseIters: PHASE_ITERS,
    inputSets: SETS,
    seed,
    timing:
      'CUDA events per iteration; each iteration after a device barrier of the ranks and a short spin (gated) unless marked ungated; per iteration the slowest rank; median (p10, p90) in us',
    results: Object.fromEntries(rows.map(([name, t, bytes]) => [name, { ...t, logicalBytes: bytes }])),
    ncclOverTsep: ncclOverTsep ?? null,
    ...(ncclSkipped !== undefined ? { ncclSkipped } : {}),
    hostOverheadUs: {
      measure: `public EpBuffer calls; backToBack: bursts of ${HOST_BURST} calls of one kind, the GPU drained between bursts (hook dispatches: each hook called, untimed, before the next call); isolated: one call after the GPU went idle; per rank the median of: entry to return, entry to first kernel launch, the launch call(s) (over NCCL with the NCCL calls between kernels), last launch to return`,
      ...Object.fromEntries(
        hostModes.map((m) => [
          m,
          Object.fromEntries(
            hostKinds.map((k) => [k, Object.fromEntries(hostByRank[m][k].map((v, j) => [HOST_PARTS[j], v]))]),
          ),
        ]),
      ),
    },
    tuningDefaults: defaults,
    sweep,
    stampsRank0Us: Object.fromEntries(stampRows.map(([n, m, a, b]) => [n, { median: m, p10: a, p90: b }])),
    bytesPerRank: { communication: commBytes, outputRings: outputRingBytes },
    payloadBytesPerRank: {
      dispatch: wire.dispatch,
      combine: wire.combine,
      deepepDispatchLogical: dispatchLogical,
      ranksPerHost: perHost,
      betweenHostsDispatch: crossHost.dispatch,
      betweenHostsCombine: crossHost.combine,
    },
  });
  process.stdout.write(`wrote ${out}\n`);
}

for (const s of sets) for (const t of [s.x, s.topk, s.weights]) t.dispose();
y.dispose();
l2.dispose();
await group.destroy();
