// One test per bad input: each is rejected with a ValidationError naming the argument, before any
// work starts, and the same buffers then complete a good call whose result is checked. The calls are
// collectives: a call refused on rank 0 still counts as its call, so the peers make the same call with
// good arguments, and it fails there with a RendezvousError naming rank 0 (peersMeetRefusal).

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';
import {
  referenceCombine,
  referenceDispatch,
  referenceLayout,
  referenceLowLatencyDispatch,
} from '../../src/cpu/reference.ts';
import { HostTensor } from '../../src/device/tensor.ts';
import { LocalGroup } from '../../src/dist/local-group.ts';
import { EpBuffer } from '../../src/ep/buffer.ts';
import type {
  CombineArgs,
  DispatchArgs,
  DispatchResult,
  EpBufferOptions,
  LowLatencyCombineArgs,
  LowLatencyDispatchArgs,
  LowLatencyDispatchResult,
} from '../../src/ep/types.ts';
import { DisposedError, ValidationError } from '../../src/errors.ts';
import { assertNamesFailedRank, createWorld, destroyWorld, onAllRanks } from './helpers/ep-world.ts';
import { randomBf16, randomFp8, randomRouting, randomWeights } from './helpers/inputs.ts';
import { asHost, assertTensorEqual, bf16, f32, i32 } from './helpers/tensors.ts';

const R = 4;
const H = 256;
const E = 8;
const K = 4;
const TMAX = 4;
const T = 3;
const OPTIONS: EpBufferOptions = {
  hidden: H,
  maxTokensPerRank: TMAX,
  numExperts: E,
  numTopk: K,
  mode: 'both',
  backend: 'cpu',
};

const rng = new Rng(7);
const inputs = Array.from({ length: R }, () => ({
  x: randomBf16(rng, T, H),
  topkIdx: i32([T, K], Array.from(randomRouting(rng, T, K, E, { dropRate: 0.2 }))),
  topkWeights: randomWeights(rng, T, K),
}));

let world: EpBuffer[];
/** A buffer of another world: its handles must be refused by `world`. */
let stranger: EpBuffer[];
let foreignDispatch: DispatchResult;
let foreignLowLatency: LowLatencyDispatchResult;

before(async () => {
  world = await createWorld(R, OPTIONS);
  stranger = await createWorld(R, OPTIONS);
  const [d] = await onAllRanks(stranger, (b, r) => b.dispatch(inputs[r]!));
  foreignDispatch = d!;
  const [ll] = await onAllRanks(stranger, async (b, r) => {
    const res = b.lowLatencyDispatch(inputs[r]!);
    await res.event.wait();
    return res;
  });
  foreignLowLatency = ll!;
});

after(async () => {
  await destroyWorld(world);
  await destroyWorld(stranger);
});

function isValidation(argument: string | RegExp): (e: unknown) => boolean {
  return (e) => {
    assert.ok(e instanceof ValidationError, `expected a ValidationError, got ${e}`);
    if (typeof argument === 'string') assert.equal(e.argument, argument, e.message);
    else assert.match(e.argument, argument, e.message);
    assert.equal(e.code, 'TSEP_VALIDATION_ERROR');
    return true;
  };
}

/**
 * Rank 0's call was refused: the peers make the same call (`peerCall`, good arguments) and it fails on each
 * with a RendezvousError naming rank 0, which keeps every rank's calls paired.
 */
async function peersMeetRefusal(peerCall: (b: EpBuffer, r: number) => Promise<unknown>): Promise<void> {
  const outcomes = await Promise.allSettled(world.slice(1).map((b, i) => peerCall(b, i + 1)));
  outcomes.forEach((o, i) => {
    assert.equal(o.status, 'rejected', `rank ${i + 1}'s call paired with rank 0's refused one`);
    assertNamesFailedRank((o as PromiseRejectedResult).reason, 0, `rank ${i + 1}`);
  });
}

/** What the good normal round trip must produce (y = recvX, weights sent back). */
function expectedNormal() {
  const layouts = inputs.map((inp) => referenceLayout(inp.topkIdx, E, R));
  const sources = inputs.map((inp, r) => ({ ...inp, ...layouts[r]! }));
  const dispatched = referenceDispatch(sources, { numExperts: E, expertAlignment: 1, worstCaseTokens: 0 });
  const combined = referenceCombine(
    layouts.map((l) => ({ isTokenInRank: l.isTokenInRank, bias: [] })),
    dispatched[0]!.rankPrefixMatrix,
    dispatched.map((e) => ({ x: e.recvX, topkWeights: e.recvTopkWeights! })),
  );
  return { dispatched, combined };
}

/** A good dispatch + combine on every rank, checked against the reference. */
async function goodNormalRoundTrip(buffers: EpBuffer[] = world): Promise<DispatchResult[]> {
  const out = await onAllRanks(buffers, async (b, r) => {
    const d = await b.dispatch(inputs[r]!);
    const c = await b.combine({ x: d.recvX, handle: d.handle, topkWeights: d.recvTopkWeights! });
    return { d, c };
  });
  const { dispatched, combined } = expectedNormal();
  for (let r = 0; r < R; r++) {
    assertTensorEqual(out[r]!.d.recvX, dispatched[r]!.recvX, `rank ${r} recvX after the bad call`);
    assertTensorEqual(out[r]!.c.combinedX, combined[r]!.combinedX, `rank ${r} combinedX after the bad call`);
    assertTensorEqual(
      out[r]!.c.combinedTopkWeights,
      combined[r]!.combinedTopkWeights,
      `rank ${r} weights back`,
    );
  }
  return out.map((o) => o.d);
}

/** A good low-latency dispatch + combine on every rank, checked against the reference. */
async function goodLowLatencyRoundTrip(buffers: EpBuffer[] = world): Promise<void> {
  const out = await onAllRanks(buffers, async (b, r) => {
    const d = b.lowLatencyDispatch({ ...inputs[r]!, fp8: false });
    const c = b.lowLatencyCombine({ ...inputs[r]!, x: d.recvX, handle: d.handle });
    await c.event.wait();
    return { d, c };
  });
  const expected = referenceLowLatencyDispatch(inputs, {
    numExperts: E,
    maxTokensPerRank: TMAX,
    fp8: false,
    roundScale: false,
    ue8m0: false,
  });
  for (let r = 0; r < R; r++) {
    assertTensorEqual(out[r]!.d.recvX, expected[r]!.recvX, `rank ${r} LL recvX after the bad call`);
    assertTensorEqual(
      out[r]!.d.recvCount,
      expected[r]!.recvCount,
      `rank ${r} LL recvCount after the bad call`,
    );
  }
}

const x0 = () => inputs[0]!.x;
const idx0 = () => inputs[0]!.topkIdx;
const w0 = () => inputs[0]!.topkWeights;

describe('EpBuffer.create rejects bad options', () => {
  const cases: [string, string, Partial<EpBufferOptions> | null][] = [
    ['hidden not a multiple of 16', 'hidden', { hidden: 100 }],
    ['hidden not an integer', 'hidden', { hidden: 16.5 }],
    ['hidden missing', 'hidden', { hidden: undefined as unknown as number }],
    ['maxTokensPerRank 0', 'maxTokensPerRank', { maxTokensPerRank: 0 }],
    ['numExperts not divisible by the ranks', 'numExperts', { numExperts: 6 }],
    ['numTopk 0', 'numTopk', { numTopk: 0 }],
    ['numTopk above numExperts', 'numTopk', { numExperts: 4, numTopk: 5 }],
    ['numTopk above 32', 'numTopk', { numExperts: 64, numTopk: 33 }],
    ['unknown mode', 'mode', { mode: 'fast' as never }],
    ['unknown backend', 'backend', { backend: 'tpu' as never }],
    ['unknown transport', 'transport', { transport: 'pcie' as never }],
    ['fp8 not a boolean', 'fp8', { fp8: 1 as never }],
    ['ranksPerHost not dividing the ranks of the machine', 'ranksPerHost', { ranksPerHost: 3 }],
    ['ranksPerHost 0', 'ranksPerHost', { ranksPerHost: 0 }],
    ['options not an object', 'options', null],
  ];
  for (const [name, argument, patch] of cases) {
    it(name, async () => {
      const groups = LocalGroup.create(R);
      const opts = patch === null ? (null as unknown as EpBufferOptions) : { ...OPTIONS, ...patch };
      const results = await Promise.allSettled(groups.map((g) => EpBuffer.create(g, opts)));
      for (const res of results) {
        assert.equal(res.status, 'rejected');
        isValidation(argument)((res as PromiseRejectedResult).reason);
      }
      // The same groups still make a working buffer afterwards.
      const fresh = await Promise.all(groups.map((g) => EpBuffer.create(g, OPTIONS)));
      await goodNormalRoundTrip(fresh);
      await destroyWorld(fresh);
    });
  }

  it('options that differ between ranks (every rank fails, the invalid one with its own error)', async () => {
    const groups = LocalGroup.create(R);
    const results = await Promise.allSettled(
      groups.map((g) => EpBuffer.create(g, g.rank === 2 ? { ...OPTIONS, hidden: 512 } : OPTIONS)),
    );
    for (const res of results) isValidation('options')((res as PromiseRejectedResult).reason);
    const invalid = await Promise.allSettled(
      groups.map((g) => EpBuffer.create(g, g.rank === 1 ? { ...OPTIONS, hidden: 7 } : OPTIONS)),
    );
    isValidation('hidden')((invalid[1] as PromiseRejectedResult).reason);
    for (const r of [0, 2, 3]) isValidation('options')((invalid[r] as PromiseRejectedResult).reason);
  });
});

describe('getDispatchLayout rejects bad input', () => {
  const cases: [string, string | RegExp, () => [HostTensor, number]][] = [
    ['topkIdx of dtype f32', 'topkIdx', () => [f32([T, K], new Array(T * K).fill(0)), E]],
    ['topkIdx of rank 1', 'topkIdx', () => [i32([T * K], Array.from(idx0().data as Int32Array)), E]],
    ['topkIdx with more than numTopk columns', 'topkIdx', () => [i32([1, K + 1], [0, 1, 2, 3, 4]), E]],
    ['more tokens than maxTokensPerRank', 'topkIdx', () => [i32([TMAX + 1, 1], [0, 1, 2, 3, 4]), E]],
    ['expert id = numExperts', /^topkIdx\[1, 0\]$/, () => [i32([2, 1], [0, E]), E]],
    ['expert id below -1', /^topkIdx\[0, 1\]$/, () => [i32([1, 2], [0, -2]), E]],
    ['the same expert twice in a token', /^topkIdx\[0\]$/, () => [i32([1, 3], [5, -1, 5]), E]],
    ['numExperts different from the buffer', 'numExperts', () => [idx0(), 16]],
    ['column-major topkIdx', 'topkIdx', () => [i32([K, T], new Array(T * K).fill(-1)).transpose(0, 1), E]],
  ];
  for (const [name, argument, bad] of cases) {
    it(name, async () => {
      assert.throws(() => world[0]!.getDispatchLayout(...bad()), isValidation(argument));
      await goodNormalRoundTrip();
    });
  }
});

describe('dispatch rejects bad input', () => {
  const fp8 = randomFp8(new Rng(3), T, H, 'f32');
  const cases: [string, string, () => DispatchArgs][] = [
    ['x of dtype f32', 'x', () => ({ x: f32([T, H], new Array(T * H).fill(0)), topkIdx: idx0() })],
    ['x of rank 1', 'x', () => ({ x: bf16([H], new Array(H).fill(0)), topkIdx: idx0() })],
    ['x with the wrong hidden size', 'x', () => ({ x: randomBf16(rng, T, H + 16), topkIdx: idx0() })],
    ['x with more tokens than maxTokensPerRank', 'x', () => ({ x: randomBf16(rng, TMAX + 1, H) })],
    ['column-major x', 'x', () => ({ x: randomBf16(rng, H, T).transpose(0, 1), topkIdx: idx0() })],
    ['topkIdx rows different from x', 'topkIdx', () => ({ x: randomBf16(rng, 2, H), topkIdx: idx0() })],
    [
      'topkWeights rows different from x',
      'topkWeights',
      () => ({ x: x0(), topkIdx: idx0(), topkWeights: randomWeights(rng, 2, K) }),
    ],
    [
      'topkWeights of dtype bf16',
      'topkWeights',
      () => ({ x: x0(), topkIdx: idx0(), topkWeights: randomBf16(rng, T, K) }),
    ],
    [
      'topkWeights without topkIdx',
      'topkWeights',
      () => ({ x: x0(), topkWeights: w0(), layout: world[0]!.getDispatchLayout(idx0(), E) }),
    ],
    ['fp8 x without scales', 'scales', () => ({ x: fp8.x, topkIdx: idx0() })],
    [
      'scales of the wrong shape',
      'scales',
      () => ({ x: fp8.x, scales: f32([T, 1], [1, 1, 1]), topkIdx: idx0() }),
    ],
    ['scales of dtype bf16', 'scales', () => ({ x: fp8.x, scales: randomBf16(rng, T, 2), topkIdx: idx0() })],
    ['bf16 x with scales', 'scales', () => ({ x: x0(), scales: fp8.scales, topkIdx: idx0() })],
    [
      'layout for other tokens',
      'layout.isTokenInRank',
      () => ({ x: x0(), layout: world[0]!.getDispatchLayout(i32([1, 1], [0]), E) }),
    ],
    [
      'layout with too few experts',
      'layout.numTokensPerExpert',
      () => ({
        x: x0(),
        layout: {
          ...world[0]!.getDispatchLayout(idx0(), E),
          numTokensPerExpert: i32([E - 1], new Array(E - 1).fill(0)),
        },
      }),
    ],
    ['neither topkIdx, layout nor handle', 'topkIdx', () => ({ x: x0() })],
    ['expertAlignment 0', 'expertAlignment', () => ({ x: x0(), topkIdx: idx0(), expertAlignment: 0 })],
    [
      'worstCaseTokens below ranks × maxTokensPerRank',
      'worstCaseTokens',
      () => ({ x: x0(), topkIdx: idx0(), worstCaseTokens: R * TMAX - 1 }),
    ],
    ['a handle from another buffer', 'handle', () => ({ x: x0(), handle: foreignDispatch.handle })],
    ['a low-latency handle', 'handle', () => ({ x: x0(), handle: foreignLowLatency.handle as never })],
    [
      'previousEvent that is not an event',
      'previousEvent',
      () => ({ x: x0(), topkIdx: idx0(), previousEvent: {} as never }),
    ],
    [
      'out-of-range expert ids',
      'topkIdx[0, 0]',
      () => ({ x: randomBf16(rng, 1, H), topkIdx: i32([1, 1], [E]) }),
    ],
    ['arguments not an object', 'args', () => undefined as never],
    [
      'a tensor not in host memory (CPU backend)',
      'x',
      () => ({
        x: { dtype: 'bf16', shape: [T, H], strides: [H, 1], device: { kind: 'cuda', ordinal: 0 } } as never,
        topkIdx: idx0(),
      }),
    ],
  ];
  for (const [name, argument, bad] of cases) {
    it(name, async () => {
      await assert.rejects(world[0]!.dispatch(bad()), isValidation(argument));
      await peersMeetRefusal((b, r) => b.dispatch(inputs[r]!));
      await goodNormalRoundTrip();
    });
  }

  it('a cached dispatch with topkIdx, or with other tokens', async () => {
    const ds = await goodNormalRoundTrip();
    const cachedOnPeers = (b: EpBuffer, r: number) => b.dispatch({ x: inputs[r]!.x, handle: ds[r]!.handle });
    await assert.rejects(
      world[0]!.dispatch({ x: x0(), handle: ds[0]!.handle, topkIdx: idx0() }),
      isValidation('topkIdx'),
    );
    await peersMeetRefusal(cachedOnPeers);
    await assert.rejects(
      world[0]!.dispatch({ x: randomBf16(rng, 1, H), handle: ds[0]!.handle }),
      isValidation('x'),
    );
    await peersMeetRefusal(cachedOnPeers);
    const cached = await onAllRanks(world, cachedOnPeers);
    for (let r = 0; r < R; r++) assertTensorEqual(cached[r]!.recvX, ds[r]!.recvX, `rank ${r} cached recvX`);
  });

  it('dispatch on a low-latency-only buffer', async () => {
    const ll = await createWorld(R, { ...OPTIONS, mode: 'low-latency' });
    // Every rank's buffer has the mode, so every rank refuses, and the refusals pair up.
    for (const res of await Promise.allSettled(ll.map((b, r) => b.dispatch(inputs[r]!))))
      isValidation('mode')((res as PromiseRejectedResult).reason);
    await goodLowLatencyRoundTrip(ll);
    await destroyWorld(ll);
  });
});

describe('combine rejects bad input', () => {
  const cases: [string, string, (d: DispatchResult) => CombineArgs][] = [
    [
      'x of dtype f32',
      'x',
      (d) => ({ x: f32(d.recvX.shape, new Array(d.recvX.shape[0]! * H).fill(0)), handle: d.handle }),
    ],
    [
      'x with other rows than received',
      'x',
      (d) => ({ x: randomBf16(rng, d.handle.numRecvRows + 1, H), handle: d.handle }),
    ],
    [
      'bias of the wrong shape',
      'bias',
      (d) => ({ x: d.recvX, handle: d.handle, bias: randomBf16(rng, T + 1, H) }),
    ],
    ['three biases', 'bias', (d) => ({ x: d.recvX, handle: d.handle, bias: [x0(), x0(), x0()] })],
    [
      'second bias of dtype f32',
      'bias[1]',
      (d) => ({ x: d.recvX, handle: d.handle, bias: [x0(), f32([T, H], new Array(T * H).fill(0))] }),
    ],
    [
      'topkWeights with other rows',
      'topkWeights',
      (d) => ({ x: d.recvX, handle: d.handle, topkWeights: randomWeights(rng, d.handle.numRecvRows + 1, K) }),
    ],
    ['no handle', 'handle', (d) => ({ x: d.recvX }) as CombineArgs],
    ['a handle from another buffer', 'handle', (d) => ({ x: d.recvX, handle: foreignDispatch.handle })],
    ['a low-latency handle', 'handle', (d) => ({ x: d.recvX, handle: foreignLowLatency.handle as never })],
  ];
  for (const [name, argument, bad] of cases) {
    it(name, async () => {
      const ds = await onAllRanks(world, (b, r) => b.dispatch(inputs[r]!));
      await assert.rejects(world[0]!.combine(bad(ds[0]!)), isValidation(argument));
      const goodCombine = (b: EpBuffer, r: number) => b.combine({ x: ds[r]!.recvX, handle: ds[r]!.handle });
      await peersMeetRefusal(goodCombine);
      // A good combine on the same handles.
      const cs = await onAllRanks(world, goodCombine);
      const { combined } = expectedNormal();
      for (let r = 0; r < R; r++)
        assertTensorEqual(cs[r]!.combinedX, combined[r]!.combinedX, `rank ${r} combinedX`);
    });
  }
});

describe('lowLatencyDispatch rejects bad input', () => {
  const cases: [string, string, () => LowLatencyDispatchArgs][] = [
    ['x of dtype fp8', 'x', () => ({ x: randomFp8(rng, T, H, 'f32').x, topkIdx: idx0() })],
    [
      'x with more tokens than maxTokensPerRank',
      'x',
      () => ({ x: randomBf16(rng, TMAX + 1, H), topkIdx: i32([TMAX + 1, 1], [0, 1, 2, 3, 4]) }),
    ],
    ['topkIdx rows different from x', 'topkIdx', () => ({ x: randomBf16(rng, 2, H), topkIdx: idx0() })],
    [
      'topkIdx with an expert id out of range',
      'topkIdx[0, 0]',
      () => ({ x: randomBf16(rng, 1, H), topkIdx: i32([1, 1], [-3]) }),
    ],
    [
      'maxTokensPerRank different from the buffer',
      'maxTokensPerRank',
      () => ({ ...inputs[0]!, maxTokensPerRank: TMAX + 1 }),
    ],
    ['numExperts different from the buffer', 'numExperts', () => ({ ...inputs[0]!, numExperts: E * 2 })],
    ['ue8m0 without fp8', 'ue8m0', () => ({ ...inputs[0]!, fp8: false, ue8m0: true })],
    ['roundScale without fp8', 'roundScale', () => ({ ...inputs[0]!, fp8: false, roundScale: true })],
    [
      'ue8m0 with roundScale false',
      'roundScale',
      () => ({ ...inputs[0]!, fp8: true, ue8m0: true, roundScale: false }),
    ],
    [
      'returnRecvHook not a boolean',
      'returnRecvHook',
      () => ({ ...inputs[0]!, returnRecvHook: 'yes' as never }),
    ],
  ];
  for (const [name, argument, bad] of cases) {
    it(name, async () => {
      assert.throws(() => world[0]!.lowLatencyDispatch(bad()), isValidation(argument));
      await peersMeetRefusal((b, r) => b.lowLatencyDispatch({ ...inputs[r]!, fp8: false }).event.wait());
      await goodLowLatencyRoundTrip();
    });
  }

  it('fp8 when hidden is not a multiple of 128', async () => {
    const odd = await createWorld(R, { ...OPTIONS, hidden: 144, mode: 'low-latency' });
    const x = randomBf16(rng, T, 144);
    // FP8 is refused on every rank (the hidden size is the buffer's), so the refusals pair up.
    for (let r = 0; r < R; r++) {
      const xr = r === 0 ? x : randomBf16(new Rng(r), T, 144);
      assert.throws(
        () => odd[r]!.lowLatencyDispatch({ x: xr, topkIdx: inputs[r]!.topkIdx, fp8: true }),
        isValidation('fp8'),
      );
    }
    // BF16 low-latency works at that hidden size.
    const res = await onAllRanks(odd, async (b, r) => {
      const d = b.lowLatencyDispatch({
        x: r === 0 ? x : randomBf16(new Rng(r), T, 144),
        topkIdx: inputs[r]!.topkIdx,
      });
      await d.event.wait();
      return d;
    });
    const total = res.reduce(
      (n, d) => n + (asHost(d.recvCount).data as Int32Array).reduce((a, b) => a + b, 0),
      0,
    );
    const routed = inputs.reduce(
      (n, inp) => n + (inp.topkIdx.data as Int32Array).filter((e) => e >= 0).length,
      0,
    );
    assert.equal(total, routed);
    await destroyWorld(odd);
  });

  it('lowLatencyDispatch on a normal-only buffer', async () => {
    const normal = await createWorld(R, { ...OPTIONS, mode: 'normal' });
    // Every rank's buffer has the mode, so every rank refuses, and the refusals pair up.
    for (let r = 0; r < R; r++) {
      assert.throws(() => normal[r]!.lowLatencyDispatch(inputs[r]!), isValidation('mode'));
    }
    assert.throws(() => normal[0]!.cleanLowLatencyBuffer(), isValidation('mode'));
    await goodNormalRoundTrip(normal);
    await destroyWorld(normal);
  });
});

describe('lowLatencyCombine rejects bad input', () => {
  const cases: [string, string, (d: LowLatencyDispatchResult) => LowLatencyCombineArgs][] = [
    ['x of the wrong shape', 'x', (d) => ({ ...inputs[0]!, x: randomBf16(rng, T, H), handle: d.handle })],
    [
      'x of dtype fp8',
      'x',
      (d) => ({ ...inputs[0]!, x: HostTensor.zeros('fp8_e4m3', d.recvX.shape), handle: d.handle }),
    ],
    [
      'a normal-mode handle',
      'handle',
      (d) => ({ ...inputs[0]!, x: d.recvX, handle: foreignDispatch.handle as never }),
    ],
    [
      'a handle from another buffer',
      'handle',
      (d) => ({ ...inputs[0]!, x: d.recvX, handle: foreignLowLatency.handle }),
    ],
    [
      'topkIdx rows different from the dispatch',
      'topkIdx',
      (d) => ({ x: d.recvX, topkIdx: i32([1, 1], [0]), topkWeights: f32([1, 1], [1]), handle: d.handle }),
    ],
    [
      'topkWeights of another shape',
      'topkWeights',
      (d) => ({ x: d.recvX, topkIdx: idx0(), topkWeights: randomWeights(rng, T, K - 1), handle: d.handle }),
    ],
  ];
  for (const [name, argument, bad] of cases) {
    it(name, async () => {
      const ds = await onAllRanks(world, async (b, r) => {
        const d = b.lowLatencyDispatch({ ...inputs[r]!, fp8: false });
        await d.event.wait();
        return d;
      });
      assert.throws(() => world[0]!.lowLatencyCombine(bad(ds[0]!)), isValidation(argument));
      const goodCombine = (b: EpBuffer, r: number) =>
        b.lowLatencyCombine({ ...inputs[r]!, x: ds[r]!.recvX, handle: ds[r]!.handle }).event.wait();
      await peersMeetRefusal(goodCombine);
      // Complete the pending round on every rank, then a full good round trip.
      await onAllRanks(world, goodCombine);
      await goodLowLatencyRoundTrip();
    });
  }
});

describe('a destroyed buffer refuses every call', () => {
  const calls: [string, (b: EpBuffer) => unknown][] = [
    ['getDispatchLayout', (b) => b.getDispatchLayout(idx0(), E)],
    ['dispatch', (b) => b.dispatch(inputs[0]!)],
    ['combine', (b) => b.combine({ x: x0(), handle: foreignDispatch.handle })],
    ['lowLatencyDispatch', (b) => b.lowLatencyDispatch(inputs[0]!)],
    [
      'lowLatencyCombine',
      (b) => b.lowLatencyCombine({ ...inputs[0]!, x: x0(), handle: foreignLowLatency.handle }),
    ],
    ['cleanLowLatencyBuffer', (b) => b.cleanLowLatencyBuffer()],
    ['sizeHint', (b) => b.sizeHint()],
  ];
  for (const [name, call] of calls) {
    it(name, async () => {
      const buffers = await createWorld(R, OPTIONS);
      await destroyWorld(buffers);
      assert.ok(buffers[0]!.destroyed);
      await assert.rejects(
        async () => call(buffers[0]!),
        (e: unknown) => e instanceof DisposedError && e.code === 'TSEP_DISPOSED' && e.message.includes(name),
      );
    });
  }
});

describe('a handle whose buffer was destroyed', () => {
  it('is refused by a live buffer, and the message says the buffer was destroyed', async () => {
    const gone = await createWorld(R, OPTIONS);
    const [d] = await onAllRanks(gone, (b, r) => b.dispatch(inputs[r]!));
    await destroyWorld(gone);
    // Every rank passes a handle it must refuse, so the refusals pair up.
    for (const res of await Promise.allSettled(world.map((b) => b.combine({ x: x0(), handle: d!.handle })))) {
      const e = (res as PromiseRejectedResult).reason;
      assert.ok(isValidation('handle')(e) && /made by a destroyed EpBuffer/.test((e as Error).message));
    }
    // A handle of a live buffer of another world still reads "another".
    for (const res of await Promise.allSettled(
      world.map((b) => b.combine({ x: x0(), handle: foreignDispatch.handle })),
    )) {
      const e = (res as PromiseRejectedResult).reason;
      assert.ok(isValidation('handle')(e) && /made by another EpBuffer/.test((e as Error).message));
    }
    await goodNormalRoundTrip();
  });
});
