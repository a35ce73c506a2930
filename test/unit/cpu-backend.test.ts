// Normal-mode property tests: the CPU backend, driven through the public EpBuffer API on 4 simulated
// ranks at once, against the reference oracle on random inputs — plus checks that do not use the
// oracle at all (rows arrive intact and in order with their scales, local ids and weights, padding rows are
// empty, weights come back, combine follows its definition and sums copies).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';
import { referenceCombine, referenceDispatch, referenceLayout } from '../../src/cpu/reference.ts';
import { bf16ToF32, f32ToBf16 } from '../../src/device/dtypes.ts';
import type { HostTensor } from '../../src/device/tensor.ts';
import type { CombineResult, DispatchResult, Tensor } from '../../src/ep/types.ts';
import { createWorld, destroyWorld, onAllRanks } from './helpers/ep-world.ts';
import {
  type RoutingShape,
  randomBf16,
  randomFp8,
  randomRouting,
  randomWeights,
  routingTensor,
  type ScaleKind,
} from './helpers/inputs.ts';
import { forSeeds } from './helpers/seeds.ts';
import { asHost, assertTensorEqual, values } from './helpers/tensors.ts';

const R = 4;

interface Scenario {
  hidden: number;
  numExperts: number;
  numTopk: number;
  maxTokensPerRank: number;
  /** Tokens per rank. */
  tokens: number[];
  ids: 'i32' | 'i64';
  payload: 'bf16' | ScaleKind;
  expertAlignment: number;
  worstCase: boolean;
  weights: boolean;
  biases: 0 | 1 | 2;
  routing: RoutingShape;
}

function randomScenario(rng: Rng): Scenario {
  const numExperts = [4, 8, 16, 32][rng.int(4)]!;
  const maxTokensPerRank = 1 + rng.int(12);
  return {
    hidden: [16, 48, 144, 256][rng.int(4)]!,
    numExperts,
    numTopk: 1 + rng.int(Math.min(8, numExperts)),
    maxTokensPerRank,
    tokens: Array.from({ length: R }, () => rng.int(maxTokensPerRank + 1)),
    ids: rng.float() < 0.5 ? 'i32' : 'i64',
    payload: (['bf16', 'f32', 'f32-column-major', 'ue8m0'] as const)[rng.int(4)]!,
    expertAlignment: [1, 1, 2, 4, 128][rng.int(5)]!,
    worstCase: rng.float() < 0.25,
    weights: rng.float() < 0.8,
    biases: rng.int(3) as 0 | 1 | 2,
    routing: { dropRate: [0, 0.1, 0.5][rng.int(3)]! },
  };
}

function base(overrides: Partial<Scenario>): Scenario {
  return {
    hidden: 48,
    numExperts: 8,
    numTopk: 2,
    maxTokensPerRank: 6,
    tokens: [6, 3, 5, 1],
    ids: 'i32',
    payload: 'bf16',
    expertAlignment: 1,
    worstCase: false,
    weights: true,
    biases: 0,
    routing: { dropRate: 0.1 },
    ...overrides,
  };
}

interface RankInput {
  x: HostTensor;
  scales?: HostTensor;
  topkIdx: HostTensor;
  topkWeights?: HostTensor;
  bias: HostTensor[];
}

function makeInputs(rng: Rng, sc: Scenario): RankInput[] {
  return sc.tokens.map((T) => {
    const ids = randomRouting(rng, T, sc.numTopk, sc.numExperts, sc.routing);
    const payload =
      sc.payload === 'bf16' ? { x: randomBf16(rng, T, sc.hidden) } : randomFp8(rng, T, sc.hidden, sc.payload);
    return {
      ...payload,
      topkIdx: routingTensor(sc.ids, T, sc.numTopk, ids),
      ...(sc.weights ? { topkWeights: randomWeights(rng, T, sc.numTopk) } : {}),
      bias: Array.from({ length: sc.biases }, () => randomBf16(rng, T, sc.hidden)),
    };
  });
}

/** The expert's output for received rows: bf16 values drawn from a per-rank generator. */
function expertOutput(rng: Rng, rows: number, hidden: number): HostTensor {
  return randomBf16(rng, rows, hidden);
}

interface RankOutcome {
  d: DispatchResult;
  cached: DispatchResult;
  y: HostTensor;
  combined: CombineResult;
  layout: ReturnType<typeof referenceLayout>;
}

async function run(
  seed: number,
  sc: Scenario,
): Promise<{ inputs: RankInput[]; out: RankOutcome[]; ys: HostTensor[] }> {
  const inputs = makeInputs(new Rng(seed), sc);
  const buffers = await createWorld(R, {
    hidden: sc.hidden,
    maxTokensPerRank: sc.maxTokensPerRank,
    numExperts: sc.numExperts,
    numTopk: sc.numTopk,
    backend: 'cpu',
  });
  try {
    const out = await onAllRanks(buffers, async (buf, r) => {
      const inp = inputs[r]!;
      const layout = buf.getDispatchLayout(inp.topkIdx, sc.numExperts);
      const d = await buf.dispatch({
        x: inp.x,
        ...(inp.scales ? { scales: inp.scales } : {}),
        topkIdx: inp.topkIdx,
        ...(inp.topkWeights ? { topkWeights: inp.topkWeights } : {}),
        layout,
        expertAlignment: sc.expertAlignment,
        ...(sc.worstCase ? { worstCaseTokens: R * sc.maxTokensPerRank } : {}),
      });
      const cached = await buf.dispatch({
        x: inp.x,
        ...(inp.scales ? { scales: inp.scales } : {}),
        handle: d.handle,
      });
      const y = expertOutput(new Rng(seed * 31 + r), d.handle.numRecvRows, sc.hidden);
      const combined = await buf.combine({
        x: y,
        handle: d.handle,
        ...(d.recvTopkWeights ? { topkWeights: d.recvTopkWeights } : {}),
        ...(inp.bias.length > 0 ? { bias: inp.bias } : {}),
      });
      return { d, cached, y, combined, layout: layout as ReturnType<typeof referenceLayout> };
    });
    return { inputs, out, ys: out.map((o) => o.y) };
  } finally {
    await destroyWorld(buffers);
  }
}

async function check(seed: number, sc: Scenario): Promise<void> {
  const { inputs, out, ys } = await run(seed, sc);
  const layouts = inputs.map((inp) => referenceLayout(inp.topkIdx, sc.numExperts, R));
  for (let r = 0; r < R; r++) {
    assertTensorEqual(
      out[r]!.layout.numTokensPerRank,
      layouts[r]!.numTokensPerRank,
      `rank ${r} numTokensPerRank`,
    );
    assertTensorEqual(
      out[r]!.layout.numTokensPerExpert,
      layouts[r]!.numTokensPerExpert,
      `rank ${r} numTokensPerExpert`,
    );
    assertTensorEqual(out[r]!.layout.isTokenInRank, layouts[r]!.isTokenInRank, `rank ${r} isTokenInRank`);
  }
  const sources = inputs.map((inp, r) => ({
    x: inp.x,
    ...(inp.scales ? { scales: inp.scales } : {}),
    topkIdx: inp.topkIdx,
    ...(inp.topkWeights ? { topkWeights: inp.topkWeights } : {}),
    isTokenInRank: layouts[r]!.isTokenInRank,
    numTokensPerExpert: layouts[r]!.numTokensPerExpert,
  }));
  const expected = referenceDispatch(sources, {
    numExperts: sc.numExperts,
    expertAlignment: sc.expertAlignment,
    worstCaseTokens: sc.worstCase ? R * sc.maxTokensPerRank : 0,
  });
  for (let r = 0; r < R; r++) {
    const { d, cached } = out[r]!;
    const e = expected[r]!;
    assertTensorEqual(d.recvX, e.recvX, `rank ${r} recvX`);
    assertTensorEqual(d.recvScales, e.recvScales, `rank ${r} recvScales`);
    assertTensorEqual(d.recvTopkIdx, e.recvTopkIdx, `rank ${r} recvTopkIdx`);
    assertTensorEqual(d.recvTopkWeights, e.recvTopkWeights, `rank ${r} recvTopkWeights`);
    assert.deepEqual(d.numRecvTokensPerExpert, e.numRecvTokensPerExpert, `rank ${r} numRecvTokensPerExpert`);
    assertTensorEqual(d.handle.rankPrefixMatrix, e.rankPrefixMatrix, `rank ${r} rankPrefixMatrix`);
    assertTensorEqual(d.handle.recvSrcIdx, e.recvSrcIdx, `rank ${r} recvSrcIdx`);
    assert.equal(d.handle.numRecvRows, sc.worstCase ? R * sc.maxTokensPerRank : e.numRecvTokens);
    assert.ok(d.event.query(), 'a resolved dispatch is complete');
    // Cached dispatch replays the same routing.
    assertTensorEqual(cached.recvX, d.recvX, `rank ${r} cached recvX`);
    assertTensorEqual(cached.recvScales, d.recvScales, `rank ${r} cached recvScales`);
    assert.equal(cached.recvTopkIdx, undefined);
    assert.equal(cached.handle, d.handle);
    assert.deepEqual(cached.numRecvTokensPerExpert, d.numRecvTokensPerExpert);
  }
  checkRowsArriveIntact(inputs, out);
  checkRowMetadata(inputs, out, sc);
  checkCombineFromDefinition(inputs, out, ys, sc);
  if (!sc.worstCase) checkExpertCounts(inputs, out, sc);

  const prefix = asHost(out[0]!.d.handle.rankPrefixMatrix);
  const combined = referenceCombine(
    inputs.map((inp, r) => ({ isTokenInRank: layouts[r]!.isTokenInRank, bias: inp.bias })),
    prefix,
    out.map((o, r) => ({
      x: ys[r]!,
      ...(o.d.recvTopkWeights ? { topkWeights: asHost(o.d.recvTopkWeights) } : {}),
    })),
  );
  for (let r = 0; r < R; r++) {
    assertTensorEqual(out[r]!.combined.combinedX, combined[r]!.combinedX, `rank ${r} combinedX`);
    assertTensorEqual(
      out[r]!.combined.combinedTopkWeights,
      combined[r]!.combinedTopkWeights,
      `rank ${r} combinedTopkWeights`,
    );
    if (inputs[r]!.topkWeights) checkWeightsComeBack(inputs[r]!, out[r]!.combined.combinedTopkWeights!);
  }
}

/** Without the oracle: each row is its source token's row; blocks are in source order, tokens ascending. */
function checkRowsArriveIntact(inputs: RankInput[], out: RankOutcome[]): void {
  const prefix = values(out[0]!.d.handle.rankPrefixMatrix);
  for (let r = 0; r < R; r++) {
    const { recvX, handle } = out[r]!.d;
    const H = recvX.shape[1]!;
    const src = values(handle.recvSrcIdx);
    const rows = asHost(recvX).contiguous().data as Uint8Array | Uint16Array;
    for (let s = 0; s < R; s++) {
      const begin = s > 0 ? prefix[(s - 1) * R + r]! : 0;
      const end = prefix[s * R + r]!;
      const x = inputs[s]!.x.data as Uint8Array | Uint16Array;
      for (let i = begin; i < end; i++) {
        const t = src[i]!;
        if (i > begin) assert.ok(t > src[i - 1]!, `rank ${r} row ${i}: tokens of source ${s} out of order`);
        for (let c = 0; c < H; c++) {
          if (rows[i * H + c] !== x[t * H + c])
            assert.fail(`rank ${r} row ${i} differs from rank ${s} token ${t}`);
        }
      }
    }
    // Every token routed here arrived: count matches the tokens' own isTokenInRank.
    const total = prefix[(R - 1) * R + r]!;
    const routed = out.reduce(
      (n, o) => n + values(o.layout.isTokenInRank).filter((v, i) => v && i % R === r).length,
      0,
    );
    assert.equal(total, routed, `rank ${r} received ${total} rows, ${routed} were routed to it`);
  }
}

/**
 * Without the oracle: each received row's scales are its source token's (logical [row, j], whatever the
 * strides), its top-k ids are the local ids of this rank's experts (global − r·E_l) and −1 elsewhere, its
 * weights the token's where the expert is local and 0 elsewhere; worst-case padding rows hold zeros and −1.
 */
function checkRowMetadata(inputs: RankInput[], out: RankOutcome[], sc: Scenario): void {
  const El = sc.numExperts / R;
  const K = sc.numTopk;
  const prefix = values(out[0]!.d.handle.rankPrefixMatrix);
  // Each source's routing and weights, read once (not per received row).
  const srcIdsOf = inputs.map((inp) => values(inp.topkIdx));
  const srcWeightsOf = inputs.map((inp) => (inp.topkWeights ? values(inp.topkWeights) : undefined));
  for (let r = 0; r < R; r++) {
    const { d } = out[r]!;
    const src = values(d.handle.recvSrcIdx);
    const recvX = values(d.recvX);
    const ids = d.recvTopkIdx ? values(d.recvTopkIdx) : undefined;
    const ws = d.recvTopkWeights ? values(d.recvTopkWeights) : undefined;
    const scales = d.recvScales ? asHost(d.recvScales) : undefined;
    const rows = d.handle.numRecvRows;
    const total = prefix[(R - 1) * R + r]!;
    for (let i = 0; i < rows; i++) {
      let s = -1; // the source whose block holds row i
      if (i < total) for (s = 0; i >= prefix[s * R + r]!; s++);
      const t = i < total ? src[i]! : -1;
      const inp = s >= 0 ? inputs[s]! : undefined;
      if (scales) {
        const S = scales.shape[1]!;
        for (let j = 0; j < S; j++) {
          const got: number = Number(scales.data[scales.offsetOf(i, j)]);
          const want: number = inp ? Number(inp.scales!.data[inp.scales!.offsetOf(t, j)]) : 0;
          assert.equal(got, want, `rank ${r} row ${i} scale ${j}`);
        }
      }
      const srcIds = s >= 0 ? srcIdsOf[s]!.slice(t * K, t * K + K) : new Array<number>(K).fill(-1);
      const srcW = s >= 0 ? srcWeightsOf[s]?.slice(t * K, t * K + K) : undefined;
      for (let k = 0; k < K; k++) {
        const e = srcIds[k]!;
        const local = e >= 0 && Math.floor(e / El) === r;
        if (ids) assert.equal(ids[i * K + k], local ? e - r * El : -1, `rank ${r} row ${i} id ${k}`);
        if (ws) assert.equal(ws[i * K + k], local ? srcW![k] : 0, `rank ${r} row ${i} weight ${k}`);
      }
      if (i >= total) {
        assert.equal(src[i], -1, `rank ${r} padding row ${i} source index`);
        const H = sc.hidden;
        const x = recvX.slice(i * H, i * H + H);
        assert.ok(
          x.every((v) => v === 0),
          `rank ${r} padding row ${i} of recvX is not zeros`,
        );
      }
    }
  }
}

/**
 * Without the oracle, from the definition: owner s's token t = bf16(f32(bias0 + bias1) + Σ over the ranks it
 * reached, ascending, of that rank's expert output row for it), each add rounded to float32; the rows are
 * found through the handle's prefix matrix and source indices.
 */
function checkCombineFromDefinition(
  inputs: RankInput[],
  out: RankOutcome[],
  ys: HostTensor[],
  sc: Scenario,
): void {
  const H = sc.hidden;
  const prefix = values(out[0]!.d.handle.rankPrefixMatrix);
  // rowOf[r][s]: source s's token -> its row at rank r.
  const rowOf = out.map((o, r) => {
    const src = values(o.d.handle.recvSrcIdx);
    return inputs.map((_, s) => {
      const m = new Map<number, number>();
      for (let i = s > 0 ? prefix[(s - 1) * R + r]! : 0; i < prefix[s * R + r]!; i++) m.set(src[i]!, i);
      return m;
    });
  });
  const y = ys.map((t) => t.data as Uint16Array);
  for (let s = 0; s < R; s++) {
    const inp = inputs[s]!;
    const got = asHost(out[s]!.combined.combinedX).data as Uint16Array;
    const bias = inp.bias.map((b) => b.data as Uint16Array);
    for (let t = 0; t < sc.tokens[s]!; t++) {
      for (let c = 0; c < H; c++) {
        let acc = Math.fround(
          (bias[0] ? bf16ToF32(bias[0][t * H + c]!) : 0) + (bias[1] ? bf16ToF32(bias[1][t * H + c]!) : 0),
        );
        for (let r = 0; r < R; r++) {
          const row = rowOf[r]![s]!.get(t);
          if (row !== undefined) acc = Math.fround(acc + bf16ToF32(y[r]![row * H + c]!));
        }
        if (got[t * H + c] !== f32ToBf16(acc))
          assert.fail(`owner ${s} token ${t} channel ${c}: combine differs`);
      }
    }
  }
}

/** Without the oracle: per-expert counts = (token, expert) pairs routed there, aligned. */
function checkExpertCounts(inputs: RankInput[], out: RankOutcome[], sc: Scenario): void {
  const El = sc.numExperts / R;
  const counts = new Array<number>(sc.numExperts).fill(0);
  for (const inp of inputs) for (const e of values(inp.topkIdx)) if (e >= 0) counts[e]!++;
  for (let r = 0; r < R; r++) {
    const want = counts
      .slice(r * El, (r + 1) * El)
      .map((c) => Math.ceil(c / sc.expertAlignment) * sc.expertAlignment);
    assert.deepEqual(out[r]!.d.numRecvTokensPerExpert, want, `rank ${r} per-expert counts`);
  }
}

/** Weights routed out and summed back equal the original ones (0 for -1 slots). */
function checkWeightsComeBack(inp: RankInput, back: Tensor): void {
  const ids = values(inp.topkIdx);
  const w = values(inp.topkWeights!);
  const got = values(back);
  for (let i = 0; i < ids.length; i++)
    assert.equal(got[i], ids[i]! < 0 ? 0 : w[i], `weight ${i} came back wrong`);
}

describe('CPU backend, normal mode, against the reference', () => {
  it('random scenarios', async () => {
    // The scenario's shape comes from its own stream, so shape and data draws stay independent.
    await forSeeds(150, (_rng, seed) => check(seed, randomScenario(new Rng(seed ^ 0x5bd1e995))));
  });

  const cases: [string, Partial<Scenario>][] = [
    ['0 tokens on every rank', { tokens: [0, 0, 0, 0] }],
    ['1 token in the world', { tokens: [0, 1, 0, 0] }],
    ['all -1 rows', { routing: { dropRate: 1 } }],
    ['every token to one expert (top-1)', { numTopk: 1, routing: { hotExpert: 5 } }],
    ['one hot expert among top-8', { numExperts: 16, numTopk: 8, routing: { hotExpert: 0 } }],
    ['a rank that receives nothing', { routing: { allowed: [0, 1, 2, 3, 6, 7] } }],
    ['hidden 7168', { hidden: 7168, tokens: [2, 1, 0, 3], maxTokensPerRank: 3 }],
    ['hidden 2560, FP8 UE8M0', { hidden: 2560, tokens: [3, 0, 2, 1], maxTokensPerRank: 3, payload: 'ue8m0' }],
    ['top-8 of 32, int64 ids', { numExperts: 32, numTopk: 8, ids: 'i64' }],
    ['FP8 with f32 scales', { payload: 'f32', hidden: 272 }],
    ['FP8 with column-major scales', { payload: 'f32-column-major', hidden: 400 }],
    ['expert alignment 4', { expertAlignment: 4 }],
    ['worst-case tokens', { worstCase: true }],
    ['worst-case tokens with 0 tokens', { worstCase: true, tokens: [0, 0, 0, 0] }],
    ['two biases', { biases: 2 }],
    ['no weights', { weights: false, biases: 1 }],
  ];
  for (const [name, overrides] of cases) {
    it(name, async () => {
      await forSeeds(3, (_rng, seed) => check(seed, base(overrides)));
    });
  }
});

describe('CPU backend, normal mode, without the oracle', () => {
  it('combine of the received rows gives each token times the number of ranks it reached', async () => {
    await forSeeds(5, async (rng) => {
      const sc = base({ numExperts: 16, numTopk: 4 });
      const inputs = makeInputs(rng, sc);
      const buffers = await createWorld(R, {
        hidden: sc.hidden,
        maxTokensPerRank: 6,
        numExperts: 16,
        numTopk: 4,
      });
      const out = await onAllRanks(buffers, async (buf, r) => {
        const d = await buf.dispatch({ x: inputs[r]!.x, topkIdx: inputs[r]!.topkIdx });
        return (await buf.combine({ x: d.recvX, handle: d.handle })).combinedX;
      });
      await destroyWorld(buffers);
      for (let r = 0; r < R; r++) {
        const map = values(referenceLayout(inputs[r]!.topkIdx, 16, R).isTokenInRank);
        const x = inputs[r]!.x.data as Uint16Array;
        const got = asHost(out[r]!).data as Uint16Array;
        for (let t = 0; t < sc.tokens[r]!; t++) {
          const copies = map.slice(t * R, t * R + R).reduce((a, b) => a + b, 0);
          for (let c = 0; c < sc.hidden; c++) {
            let acc = 0;
            for (let i = 0; i < copies; i++) acc = Math.fround(acc + bf16ToF32(x[t * sc.hidden + c]!));
            assert.equal(got[t * sc.hidden + c], f32ToBf16(acc), `rank ${r} token ${t} channel ${c}`);
          }
        }
      }
    });
  });
});
