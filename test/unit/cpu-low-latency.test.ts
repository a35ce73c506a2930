// Low-latency property tests: the CPU backend through EpBuffer on 4 simulated ranks against the
// reference, plus oracle-free checks (per-expert sets of received tokens, rows bit-exact with
// quantizeFp8 of the token alone, weighted combine recomputed by lookup).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';
import {
  allocLowLatencyReceived,
  fillLowLatencyDispatch,
  referenceLowLatencyCombine,
  referenceLowLatencyDispatch,
} from '../../src/cpu/reference.ts';
import {
  bf16ArrayToF32,
  bf16ToF32,
  f32ToBf16,
  fp8ScaleCount,
  quantizeFp8,
  ue8m0WordCount,
} from '../../src/device/dtypes.ts';
import { HostTensor } from '../../src/device/tensor.ts';
import type { LowLatencyDispatchResult } from '../../src/ep/types.ts';
import { createWorld, destroyWorld, onAllRanks } from './helpers/ep-world.ts';
import {
  type RoutingShape,
  randomBf16,
  randomRouting,
  randomWeights,
  routingTensor,
} from './helpers/inputs.ts';
import { forSeeds } from './helpers/seeds.ts';
import { asHost, assertTensorEqual, values } from './helpers/tensors.ts';

const R = 4;

interface Scenario {
  hidden: number;
  numExperts: number;
  numTopk: number;
  maxTokensPerRank: number;
  tokens: number[];
  ids: 'i32' | 'i64';
  fp8: boolean;
  roundScale: boolean;
  ue8m0: boolean;
  hook: boolean;
  routing: RoutingShape;
}

function base(overrides: Partial<Scenario>): Scenario {
  return {
    hidden: 256,
    numExperts: 8,
    numTopk: 3,
    maxTokensPerRank: 5,
    tokens: [5, 2, 0, 4],
    ids: 'i32',
    fp8: true,
    roundScale: false,
    ue8m0: false,
    hook: false,
    routing: { dropRate: 0.1 },
    ...overrides,
  };
}

function randomScenario(rng: Rng): Scenario {
  const numExperts = [4, 8, 16][rng.int(3)]!;
  const maxTokensPerRank = 1 + rng.int(6);
  const fp8 = rng.float() < 0.7;
  const ue8m0 = fp8 && rng.float() < 0.3;
  return {
    hidden: [128, 256, 384][rng.int(3)]!,
    numExperts,
    numTopk: 1 + rng.int(Math.min(8, numExperts)),
    maxTokensPerRank,
    tokens: Array.from({ length: R }, () => rng.int(maxTokensPerRank + 1)),
    ids: rng.float() < 0.5 ? 'i32' : 'i64',
    fp8,
    roundScale: ue8m0 || (fp8 && rng.float() < 0.5),
    ue8m0,
    hook: rng.float() < 0.5,
    routing: { dropRate: [0, 0.2, 0.6][rng.int(3)]! },
  };
}

async function check(seed: number, sc: Scenario): Promise<void> {
  const rng = new Rng(seed);
  const inputs = sc.tokens.map((T) => ({
    x: randomBf16(rng, T, sc.hidden),
    topkIdx: routingTensor(
      sc.ids,
      T,
      sc.numTopk,
      randomRouting(rng, T, sc.numTopk, sc.numExperts, sc.routing),
    ),
    topkWeights: randomWeights(rng, T, sc.numTopk),
  }));
  const El = sc.numExperts / R;
  const slots = R * sc.maxTokensPerRank;
  // Expert outputs, garbage rows included: combine must ignore rows past recvCount.
  const ys = inputs.map(() =>
    HostTensor.from('bf16', [El, slots, sc.hidden], randomBf16(rng, El * slots, sc.hidden).data),
  );
  const buffers = await createWorld(R, {
    hidden: sc.hidden,
    maxTokensPerRank: sc.maxTokensPerRank,
    numExperts: sc.numExperts,
    numTopk: sc.numTopk,
    mode: 'low-latency',
    backend: 'cpu',
  });
  const out = await onAllRanks(buffers, async (buf, r) => {
    const inp = inputs[r]!;
    const d = buf.lowLatencyDispatch({
      x: inp.x,
      topkIdx: inp.topkIdx,
      maxTokensPerRank: sc.maxTokensPerRank,
      numExperts: sc.numExperts,
      fp8: sc.fp8,
      roundScale: sc.roundScale,
      ue8m0: sc.ue8m0,
      returnRecvHook: sc.hook,
    });
    if (sc.hook) {
      assert.ok(d.hook, 'a hook is returned');
      assert.equal(d.event.query(), false, 'nothing is received before the hook runs');
      await d.hook();
    }
    await d.event.wait();
    assert.ok(d.event.query());
    const c = buf.lowLatencyCombine({
      x: ys[r]!,
      topkIdx: inp.topkIdx,
      topkWeights: inp.topkWeights,
      handle: d.handle,
      returnRecvHook: sc.hook,
    });
    if (sc.hook) await c.hook!();
    await c.event.wait();
    return { d, combined: asHost(c.combinedX), y: ys[r]! };
  });
  await destroyWorld(buffers);

  const expected = referenceLowLatencyDispatch(inputs, sc);
  for (let r = 0; r < R; r++) {
    const { d } = out[r]!;
    const e = expected[r]!;
    assertTensorEqual(d.recvX, e.recvX, `rank ${r} recvX`);
    assertTensorEqual(d.recvScales, e.recvScales, `rank ${r} recvScales`);
    if (d.recvScales)
      assert.deepEqual(d.recvScales.strides, e.recvScales!.strides, `rank ${r} scale strides`);
    assertTensorEqual(d.recvCount, e.recvCount, `rank ${r} recvCount`);
    assertTensorEqual(d.handle.packedRecvSrcInfo, e.packedRecvSrcInfo, `rank ${r} packedRecvSrcInfo`);
    assertTensorEqual(
      d.handle.packedRecvLayoutRange,
      e.packedRecvLayoutRange,
      `rank ${r} packedRecvLayoutRange`,
    );
    checkReceivedSets(r, d, inputs, sc);
  }
  const combined = referenceLowLatencyCombine(
    inputs,
    out.map((o) => ({
      x: o.y,
      packedRecvSrcInfo: asHost(o.d.handle.packedRecvSrcInfo),
      packedRecvLayoutRange: asHost(o.d.handle.packedRecvLayoutRange),
    })),
    sc.numExperts,
  );
  for (let r = 0; r < R; r++) {
    assertTensorEqual(out[r]!.combined, combined[r], `rank ${r} combinedX`);
    checkCombineByLookup(r, inputs, out, sc);
  }
}

/**
 * Without the oracle: expert e's valid rows are exactly the (source, token) pairs that chose it, each
 * row equals the token (bf16) or quantizeFp8 of the token alone (codes and scales), and the layout
 * ranges tile the valid rows.
 */
function checkReceivedSets(
  r: number,
  d: LowLatencyDispatchResult,
  inputs: { x: HostTensor; topkIdx: HostTensor }[],
  sc: Scenario,
): void {
  const El = sc.numExperts / R;
  const slots = R * sc.maxTokensPerRank;
  const H = sc.hidden;
  const counts = values(d.recvCount);
  const info = values(d.handle.packedRecvSrcInfo);
  const ranges = asHost(d.handle.packedRecvLayoutRange).data as BigInt64Array;
  const recvX = asHost(d.recvX);
  const recvScales = d.recvScales && asHost(d.recvScales);
  const cols = sc.ue8m0 ? ue8m0WordCount(H) : fp8ScaleCount(H);
  for (let e = 0; e < El; e++) {
    const expert = r * El + e;
    const got: string[] = [];
    let covered = 0;
    for (let s = 0; s < R; s++) {
      const begin = Number(ranges[e * R + s]! >> 32n);
      const n = Number(ranges[e * R + s]! & 0xffffffffn);
      covered += n;
      for (let i = begin; i < begin + n; i++) {
        const t = info[e * slots + i]!;
        got.push(`${s}:${t}`);
        const row = Array.from(inputs[s]!.x.data.subarray(t * H, (t + 1) * H) as Uint16Array);
        const rowData = Array.from(
          recvX.data.subarray((e * slots + i) * H, (e * slots + i + 1) * H) as ArrayLike<number>,
        );
        if (!sc.fp8) {
          assert.deepEqual(rowData, row, `rank ${r} expert ${e} row ${i}`);
          continue;
        }
        const q = quantizeFp8(bf16ArrayToF32(row), 1, H, { roundScale: sc.roundScale, ue8m0: sc.ue8m0 });
        assert.deepEqual(rowData, Array.from(q.data), `rank ${r} expert ${e} row ${i}: fp8 codes`);
        const want = sc.ue8m0 ? q.packed! : q.scales;
        for (let j = 0; j < cols; j++) {
          assert.equal(
            recvScales!.data[recvScales!.offsetOf(e, i, j)],
            want[j],
            `rank ${r} expert ${e} row ${i} scale ${j}`,
          );
        }
      }
    }
    assert.equal(covered, counts[e], `rank ${r} expert ${e}: ranges cover recvCount`);
    const want: string[] = [];
    for (let s = 0; s < R; s++) {
      const ids = values(inputs[s]!.topkIdx);
      for (let t = 0; t < sc.tokens[s]!; t++)
        if (ids.slice(t * sc.numTopk, (t + 1) * sc.numTopk).includes(expert)) want.push(`${s}:${t}`);
    }
    assert.deepEqual(got.sort(), want.sort(), `rank ${r} expert ${e}: received tokens`);
  }
}

/** Without the oracle: find each (token, expert) row by scanning the expert's valid rows. */
function checkCombineByLookup(
  r: number,
  inputs: { topkIdx: HostTensor; topkWeights: HostTensor }[],
  out: { d: LowLatencyDispatchResult; combined: HostTensor; y: HostTensor }[],
  sc: Scenario,
): void {
  const El = sc.numExperts / R;
  const slots = R * sc.maxTokensPerRank;
  const H = sc.hidden;
  const ids = values(inputs[r]!.topkIdx);
  const w = values(inputs[r]!.topkWeights);
  for (let t = 0; t < sc.tokens[r]!; t++) {
    const acc = new Float32Array(H);
    for (let k = 0; k < sc.numTopk; k++) {
      const expert = ids[t * sc.numTopk + k]!;
      if (expert < 0) continue;
      const dst = out[Math.floor(expert / El)]!;
      const e = expert % El;
      const range = (asHost(dst.d.handle.packedRecvLayoutRange).data as BigInt64Array)[e * R + r]!;
      const srcInfo = asHost(dst.d.handle.packedRecvSrcInfo).data;
      const begin = Number(range >> 32n);
      const rowsFromMe = Array.from({ length: Number(range & 0xffffffffn) }, (_, i) => begin + i);
      const row = rowsFromMe.find((i) => srcInfo[e * slots + i] === t);
      assert.ok(row !== undefined, `rank ${r} token ${t} missing at expert ${expert}`);
      const y = dst.y.data as Uint16Array;
      for (let c = 0; c < H; c++)
        acc[c]! += Math.fround(w[t * sc.numTopk + k]! * bf16ToF32(y[(e * slots + row) * H + c]!));
    }
    for (let c = 0; c < H; c++) {
      assert.equal(out[r]!.combined.data[t * H + c], f32ToBf16(acc[c]!), `rank ${r} token ${t} channel ${c}`);
    }
  }
}

describe('CPU backend, low-latency mode, against the reference', () => {
  it('random scenarios', async () => {
    await forSeeds(80, (_rng, seed) => check(seed, randomScenario(new Rng(seed ^ 0x2545f491))));
  });

  const cases: [string, Partial<Scenario>][] = [
    ['BF16', { fp8: false }],
    ['BF16 with hook', { fp8: false, hook: true }],
    ['FP8', {}],
    ['FP8 with hook', { hook: true }],
    ['FP8 roundScale', { roundScale: true }],
    ['FP8 UE8M0', { roundScale: true, ue8m0: true }],
    ['0 tokens everywhere', { tokens: [0, 0, 0, 0] }],
    ['1 token', { tokens: [0, 0, 1, 0] }],
    ['all -1 rows', { routing: { dropRate: 1 } }],
    ['every token to one expert', { numTopk: 1, routing: { hotExpert: 3 } }],
    ['a rank that receives nothing', { routing: { allowed: [0, 1, 4, 5, 6, 7] } }],
    [
      'hidden 7168, top-8, UE8M0',
      {
        hidden: 7168,
        numExperts: 16,
        numTopk: 8,
        tokens: [2, 1, 2, 0],
        maxTokensPerRank: 2,
        roundScale: true,
        ue8m0: true,
      },
    ],
    [
      'hidden 2560, int64 ids, hook',
      { hidden: 2560, tokens: [1, 2, 0, 2], maxTokensPerRank: 2, ids: 'i64', hook: true },
    ],
    ['top-1', { numTopk: 1 }],
  ];
  for (const [name, overrides] of cases) {
    it(name, async () => {
      await forSeeds(2, (_rng, seed) => check(seed, base(overrides)));
    });
  }
});

describe('the low-latency reference refilled', () => {
  it('an output filled for one routing, then refilled for another, equals a fresh one in full', async () => {
    await forSeeds(5, (rng) => {
      const config = { numExperts: 16, maxTokensPerRank: 6, fp8: true, roundScale: false, ue8m0: false };
      const sources = () =>
        Array.from({ length: R }, () => {
          const T = 1 + rng.int(6);
          return {
            x: randomBf16(rng, T, 256),
            topkIdx: routingTensor('i32', T, 4, randomRouting(rng, T, 4, 16, { dropRate: 0.3 })),
          };
        });
      const [first, second] = [sources(), sources()];
      const reused = allocLowLatencyReceived(R, 256, config);
      fillLowLatencyDispatch(reused, first, 1, config);
      fillLowLatencyDispatch(reused, second, 1, config);
      const fresh = referenceLowLatencyDispatch(second, config)[1]!;
      assertTensorEqual(reused.recvCount, fresh.recvCount, 'recvCount');
      assertTensorEqual(reused.packedRecvLayoutRange, fresh.packedRecvLayoutRange, 'layout ranges');
      assertTensorEqual(reused.packedRecvSrcInfo, fresh.packedRecvSrcInfo, 'source info, -1 past the count');
    });
  });
});
