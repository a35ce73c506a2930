// Soak test (issue "Reliability"), run on every rank under the launcher:
//   tsep bench soak [-n R] [-- --iters 10000 --tokens 128 --hidden 2048 --topk 8 --sample 1000 --seed S]
// Alternates normal-mode (fresh dispatch + combine) and low-latency (BF16 dispatch + combine) round trips
// with fresh random routing and token counts every iteration; every output is compared with the CPU
// reference bit for bit, each poisoned before the call that fills it (the experts are the identity: each
// rank sends back what it received). Device memory in use is sampled every `sample` iterations; the run
// fails on any mismatch or if memory in use grows by more than 1 MiB between the first and the last sample.

import { parseArgs } from 'node:util';
import { Rng } from '../src/cpu/random.ts';
import { referenceLayout } from '../src/cpu/ref-layout.ts';
import {
  allocLowLatencyReceived,
  combineForRank,
  type DispatchSource,
  dispatchToRank,
  fillLowLatencyCombine,
  fillLowLatencyDispatch,
  type LowLatencyConfig,
} from '../src/cpu/reference.ts';
import { DeviceTensor, POISON_BYTE } from '../src/device/device-tensor.ts';
import { trimPool } from '../src/device/memory.ts';
import { HostTensor } from '../src/device/tensor.ts';
import { initProcessGroup } from '../src/dist/init.ts';
import { EpBuffer } from '../src/ep/buffer.ts';
import { checkLowLatencyDispatch, host, Mismatch, sameTensor } from '../test/gpu/fixtures/ep-compare.ts';
import { randomBf16, randomRouting, randomWeights, routingTensor } from '../test/unit/helpers/inputs.ts';
import { writeResult } from './stats.ts';

// Pool outputs start as POISON_BYTE bytes (read at the first allocation), so an element no kernel wrote shows.
process.env.TSEP_POISON_OUTPUTS ??= '1';

const { values: opt } = parseArgs({
  options: {
    iters: { type: 'string', default: '10000' },
    tokens: { type: 'string', default: '128' },
    hidden: { type: 'string', default: '2048' },
    topk: { type: 'string', default: '8' },
    sample: { type: 'string', default: '1000' },
    seed: { type: 'string' },
  },
  strict: true,
});
const iters = Number(opt.iters);
const Tmax = Number(opt.tokens);
const H = Number(opt.hidden);
const K = Number(opt.topk);
const sampleEvery = Number(opt.sample);
const group = await initProcessGroup({ timeoutMs: 120_000 });
// Every rank computes every rank's inputs, so all must draw from rank 0's seed.
const seedBytes = await group.broadcast(
  group.rank === 0 ? new TextEncoder().encode(String(Number(opt.seed ?? Date.now()) >>> 0 || 1)) : undefined,
  0,
);
const seed = Number(new TextDecoder().decode(seedBytes));
const R = group.size;
const me = group.rank;
const E = 8 * R;
const buffer = await EpBuffer.create(group, {
  hidden: H,
  maxTokensPerRank: Tmax,
  numExperts: E,
  numTopk: K,
  mode: 'both',
  backend: 'gpu',
});
const dev = buffer.stream!.device;
const up = (t: HostTensor) => DeviceTensor.fromHost(t, dev);
const llConfig: LowLatencyConfig = {
  numExperts: E,
  maxTokensPerRank: Tmax,
  fp8: false,
  roundScale: false,
  ue8m0: false,
};

/** Every rank's inputs of iteration i (the same on every rank). */
function inputs(i: number) {
  const rng = new Rng(seed + i * 104_729);
  // One index type per call: every rank must pass the same kind of topkIdx to a collective.
  const idx = rng.float() < 0.5 ? 'i32' : 'i64';
  return Array.from({ length: R }, () => {
    const T = 1 + rng.int(Tmax);
    const topkIdx = routingTensor(idx, T, K, randomRouting(rng, T, K, E, { dropRate: 0.1 }));
    return {
      x: randomBf16(rng, T, H) as HostTensor,
      topkIdx,
      topkWeights: randomWeights(rng, T, K) as HostTensor,
    };
  });
}

async function normalRound(i: number): Promise<void> {
  const all = inputs(i);
  const sources: DispatchSource[] = all.map((a) => {
    const l = referenceLayout(a.topkIdx, E, R);
    return { ...a, isTokenInRank: l.isTokenInRank, numTokensPerExpert: l.numTokensPerExpert };
  });
  const received = sources.map((_, r) =>
    dispatchToRank(sources, r, { numExperts: E, expertAlignment: 1, worstCaseTokens: 0 }),
  );
  const mine = all[me]!;
  const [x, topk, w] = [up(mine.x), up(mine.topkIdx), up(mine.topkWeights)];
  const layout = buffer.getDispatchLayout(topk, E);
  const d = await buffer.dispatch({ x, topkIdx: topk, topkWeights: w, layout });
  const c = await buffer.combine({ x: d.recvX, handle: d.handle });
  try {
    await c.event.wait();
    sameTensor(`iteration ${i} recvX`, host(d.recvX), received[me]!.recvX);
    sameTensor(`iteration ${i} recvTopkIdx`, host(d.recvTopkIdx), received[me]!.recvTopkIdx);
    sameTensor(`iteration ${i} recvTopkWeights`, host(d.recvTopkWeights), received[me]!.recvTopkWeights);
    const want = combineForRank(
      me,
      { isTokenInRank: sources[me]!.isTokenInRank, bias: [] },
      received[me]!.rankPrefixMatrix,
      received.map((r) => ({ x: r.recvX })),
    );
    sameTensor(`iteration ${i} combinedX`, host(c.combinedX), want.combinedX);
  } finally {
    // Everything this round allocated goes back, mismatch or not (the handle last: it uses the layout).
    d.handle.dispose();
    for (const t of [
      x,
      topk,
      w,
      d.recvX,
      d.recvTopkIdx,
      d.recvTopkWeights,
      c.combinedX,
      ...Object.values(layout),
    ])
      (t as DeviceTensor | undefined)?.dispose();
  }
}

// The low-latency reference's outputs have the fixed shape [E_l, R·T_max, H] per rank (64 MiB at the soak's
// shape): allocated once and refilled every round. A refill rewrites every count, range and source index
// (-1 past the count) and the rows inside the ranges, which is all that the combine reference and the
// checks below read (rows past the count are not compared).
const llReceived = Array.from({ length: R }, () => allocLowLatencyReceived(R, H, llConfig));

async function lowLatencyRound(i: number): Promise<void> {
  const all = inputs(i);
  for (let r = 0; r < R; r++) fillLowLatencyDispatch(llReceived[r]!, all, r, llConfig);
  const mine = all[me]!;
  const [x, topk, w] = [up(mine.x), up(mine.topkIdx), up(mine.topkWeights)];
  const ll = buffer.lowLatencyDispatch({ x, topkIdx: topk, fp8: false });
  const c = buffer.lowLatencyCombine({ x: ll.recvX, topkIdx: topk, topkWeights: w, handle: ll.handle });
  try {
    await c.event.wait();
    checkLowLatencyDispatch(`iteration ${i} LL dispatch`, ll, llReceived[me]!);
    // Only this rank's combined tokens are checked here, so only they are computed (a quarter of the work).
    const want = HostTensor.zeros('bf16', [mine.x.shape[0]!, H]);
    fillLowLatencyCombine(
      want,
      me,
      mine,
      llReceived.map((r) => ({
        x: r.recvX,
        packedRecvSrcInfo: r.packedRecvSrcInfo,
        packedRecvLayoutRange: r.packedRecvLayoutRange,
      })),
      E,
    );
    sameTensor(`iteration ${i} LL combinedX`, host(c.combinedX), want);
  } finally {
    for (const t of [x, topk, w]) t.dispose();
    // The outputs are views into the buffer's ring of two output sets: poisoned now, a call two rounds on
    // that writes too little into the same set shows instead of passing on this round's values.
    const stream = buffer.stream!;
    for (const t of [
      ll.recvX,
      ll.recvCount,
      ll.handle.packedRecvSrcInfo,
      ll.handle.packedRecvLayoutRange,
      c.combinedX,
    ])
      (t as DeviceTensor).fillBytes(POISON_BYTE, stream);
  }
}

const samples: { iteration: number; usedBytes: number }[] = [];
const sample = async (iteration: number) => {
  await buffer.stream!.synchronize();
  // Memory the pool keeps for reuse is not in use: trim it, so the samples see live allocations only.
  trimPool(dev);
  const { free, total } = dev.memoryInfo();
  samples.push({ iteration, usedBytes: total - free });
  if (me === 0)
    process.stdout.write(
      `soak: iteration ${iteration}, device memory in use ${((total - free) / 2 ** 20).toFixed(1)} MiB\n`,
    );
};

let mismatches = 0;
const start = performance.now();
// The first sample comes after a few rounds of each kind: module loads, the memory pool's first growth and
// the low-latency output rings are set-up costs, not growth.
const WARMUP = 8;
for (let i = 0; i < iters; i++) {
  if (i === WARMUP || (i > WARMUP && i % sampleEvery === 0)) await sample(i);
  try {
    await (i % 2 === 0 ? normalRound(i) : lowLatencyRound(i));
  } catch (e) {
    if (!(e instanceof Mismatch)) throw e;
    mismatches++;
    if (mismatches <= 5) process.stderr.write(`rank ${me}: ${e.message} (seed ${seed})\n`);
  }
}
await sample(iters);
const all = (await group.allGather(new Uint8Array(Int32Array.of(mismatches).buffer))).map(
  (b) => new Int32Array(new Uint8Array(b).buffer)[0]!,
);
const growth = samples.at(-1)!.usedBytes - samples[0]!.usedBytes;
const ok = all.every((m) => m === 0) && growth <= 2 ** 20;
if (me === 0) {
  process.stdout.write(
    `soak: ${iters} iterations on ${R} ranks in ${((performance.now() - start) / 1000).toFixed(1)} s; mismatches per rank [${all.join(', ')}]; ` +
      `device memory in use first ${(samples[0]!.usedBytes / 2 ** 20).toFixed(1)} MiB, last ${(samples.at(-1)!.usedBytes / 2 ** 20).toFixed(1)} MiB (growth ${(growth / 2 ** 20).toFixed(2)} MiB) — ${ok ? 'ok' : 'FAILED'}\n`,
  );
  writeResult('soak', {
    bench: 'soak',
    date: new Date().toISOString(),
    ranks: R,
    iters,
    seed,
    mismatches: all,
    samples,
  });
}
await buffer.destroy();
await group.destroy();
process.exitCode = ok ? 0 : 1;
