// The reference oracle against hand-computed cases, so a bug in it cannot hide behind the backend
// (which runs the same code). World: 2 ranks, 4 experts (rank 0: experts 0, 1; rank 1: experts 2, 3).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  combineForRank,
  type DispatchSource,
  dispatchToRank,
  referenceLayout,
  referenceLowLatencyCombine,
  referenceLowLatencyDispatch,
} from '../../src/cpu/reference.ts';
import { bf16ToF32, f32ToBf16, f32ToFp8E4m3 } from '../../src/device/dtypes.ts';
import { HostTensor } from '../../src/device/tensor.ts';
import { assertTensorEqual, bf16, bool, f32, i32, i64, values } from './helpers/tensors.ts';

// Rank 0: t0 → experts 0, 3; t1 → 1; t2 → 2, 3.   Rank 1: t0 → nothing; t1 → 2, 0.
const topk = [i32([3, 2], [0, 3, 1, -1, 2, 3]), i32([2, 2], [-1, -1, 2, 0])];
const weights = [f32([3, 2], [0.5, 0.25, 1, 0, 0.125, 0.75]), f32([2, 2], [0, 0, 0.5, 0.5])];
const xs = [bf16([3, 2], [1, 2, 3, 4, 5, 6]), bf16([2, 2], [7, 8, 9, 10])];

function sources(): DispatchSource[] {
  return [0, 1].map((r) => {
    const layout = referenceLayout(topk[r]!, 4, 2);
    return {
      x: xs[r]!,
      topkIdx: topk[r]!,
      topkWeights: weights[r]!,
      isTokenInRank: layout.isTokenInRank,
      numTokensPerExpert: layout.numTokensPerExpert,
    };
  });
}

describe('reference layout', () => {
  it('counts tokens per rank (deduplicated) and per expert, and maps tokens to ranks', () => {
    const l0 = referenceLayout(topk[0]!, 4, 2);
    assert.deepEqual(values(l0.numTokensPerRank), [2, 2]);
    assert.deepEqual(values(l0.numTokensPerExpert), [1, 1, 1, 2]);
    assert.deepEqual(values(l0.isTokenInRank), [1, 1, 1, 0, 0, 1]);
    const l1 = referenceLayout(topk[1]!, 4, 2);
    assert.deepEqual(values(l1.numTokensPerRank), [1, 1]);
    assert.deepEqual(values(l1.numTokensPerExpert), [1, 0, 1, 0]);
    assert.deepEqual(values(l1.isTokenInRank), [0, 0, 1, 1]);
  });
});

describe('reference normal dispatch', () => {
  const config = { numExperts: 4, expertAlignment: 1, worstCaseTokens: 0 };

  it('orders rows by source rank then token, localizes ids and zeroes foreign weights', () => {
    const r0 = dispatchToRank(sources(), 0, config);
    assertTensorEqual(r0.recvX, bf16([3, 2], [1, 2, 3, 4, 9, 10]), 'rank 0 recvX');
    assertTensorEqual(r0.recvSrcIdx, i32([3], [0, 1, 1]), 'rank 0 recvSrcIdx');
    assertTensorEqual(r0.recvTopkIdx, i32([3, 2], [0, -1, 1, -1, -1, 0]), 'rank 0 recvTopkIdx');
    assertTensorEqual(r0.recvTopkWeights, f32([3, 2], [0.5, 0, 1, 0, 0, 0.5]), 'rank 0 weights');
    assert.deepEqual(r0.numRecvTokensPerExpert, [2, 1]);
    assert.equal(r0.numRecvTokens, 3);
    assertTensorEqual(r0.rankPrefixMatrix, i32([2, 2], [2, 2, 3, 3]), 'rankPrefixMatrix');

    const r1 = dispatchToRank(sources(), 1, config);
    assertTensorEqual(r1.recvX, bf16([3, 2], [1, 2, 5, 6, 9, 10]), 'rank 1 recvX');
    assertTensorEqual(r1.recvSrcIdx, i32([3], [0, 2, 1]), 'rank 1 recvSrcIdx');
    assertTensorEqual(r1.recvTopkIdx, i32([3, 2], [-1, 1, 0, 1, 0, -1]), 'rank 1 recvTopkIdx');
    assertTensorEqual(r1.recvTopkWeights, f32([3, 2], [0, 0.25, 0.125, 0.75, 0.5, 0]), 'rank 1 weights');
    assert.deepEqual(r1.numRecvTokensPerExpert, [2, 2]);
  });

  it('keeps int64 ids int64', () => {
    const src = sources().map((s, r) => ({ ...s, topkIdx: i64(topk[r]!.shape, values(topk[r]!)) }));
    assertTensorEqual(
      dispatchToRank(src, 1, config).recvTopkIdx,
      i64([3, 2], [-1, 1, 0, 1, 0, -1]),
      'recvTopkIdx',
    );
  });

  it('rounds per-expert counts up to the alignment', () => {
    assert.deepEqual(
      dispatchToRank(sources(), 0, { ...config, expertAlignment: 2 }).numRecvTokensPerExpert,
      [2, 2],
    );
    assert.deepEqual(
      dispatchToRank(sources(), 1, { ...config, expertAlignment: 3 }).numRecvTokensPerExpert,
      [3, 3],
    );
  });

  it('pads worst-case outputs: zero rows, -1 ids and source indices, no per-expert list', () => {
    const r0 = dispatchToRank(sources(), 0, { ...config, worstCaseTokens: 5 });
    assertTensorEqual(r0.recvX, bf16([5, 2], [1, 2, 3, 4, 9, 10, 0, 0, 0, 0]), 'recvX');
    assertTensorEqual(r0.recvTopkIdx, i32([5, 2], [0, -1, 1, -1, -1, 0, -1, -1, -1, -1]), 'recvTopkIdx');
    assertTensorEqual(r0.recvSrcIdx, i32([5], [0, 1, 1, -1, -1]), 'recvSrcIdx');
    assert.deepEqual(r0.numRecvTokensPerExpert, []);
    assert.equal(r0.numRecvTokens, 3);
  });

  it('passes FP8 rows and any-stride scales through, returning row-major scales', () => {
    const fp8 = [
      HostTensor.from('fp8_e4m3', [3, 2], Uint8Array.from([1, 2, 3, 4, 5, 6])),
      HostTensor.from('fp8_e4m3', [2, 2], Uint8Array.from([7, 8, 9, 10])),
    ];
    // Rank 0's scales are column-major ([1, 3] stored, seen as [3, 1]); rank 1's row-major.
    const scales = [f32([1, 3], [0.5, 1.5, 2.5]).transpose(0, 1), f32([2, 1], [3.5, 4.5])];
    const src = sources().map((s, r) => ({ ...s, x: fp8[r]!, scales: scales[r]! }));
    const r1 = dispatchToRank(src, 1, config);
    assertTensorEqual(
      r1.recvX,
      HostTensor.from('fp8_e4m3', [3, 2], Uint8Array.from([1, 2, 5, 6, 9, 10])),
      'x',
    );
    assertTensorEqual(r1.recvScales, f32([3, 1], [0.5, 2.5, 4.5]), 'scales');
    assert.deepEqual(r1.recvScales!.strides, [1, 1]);
  });

  it('sends without topkIdx (cached mode): no top-k outputs, no per-expert list', () => {
    const src = sources().map((s) => ({ x: s.x, isTokenInRank: s.isTokenInRank }));
    const r1 = dispatchToRank(src, 1, config);
    assertTensorEqual(r1.recvX, bf16([3, 2], [1, 2, 5, 6, 9, 10]), 'recvX');
    assert.equal(r1.recvTopkIdx, undefined);
    assert.deepEqual(r1.numRecvTokensPerExpert, []);
  });
});

describe('reference normal combine', () => {
  const src = sources();
  const prefix = dispatchToRank(src, 0, {
    numExperts: 4,
    expertAlignment: 1,
    worstCaseTokens: 0,
  }).rankPrefixMatrix;
  const expertSides = [
    { x: bf16([3, 2], [10, 20, 30, 40, 50, 60]), topkWeights: f32([3, 2], [0.5, 0, 1, 0, 0, 0.5]) },
    {
      x: bf16([3, 2], [100, 200, 300, 400, 500, 600]),
      topkWeights: f32([3, 2], [0, 0.25, 0.125, 0.75, 0.5, 0]),
    },
  ];

  it('sums the rows each token was sent to and sums the weights back', () => {
    const c0 = combineForRank(0, { isTokenInRank: src[0]!.isTokenInRank, bias: [] }, prefix, expertSides);
    assertTensorEqual(c0.combinedX, bf16([3, 2], [110, 220, 30, 40, 300, 400]), 'rank 0');
    assertTensorEqual(c0.combinedTopkWeights, weights[0], 'rank 0 weights back');
    const c1 = combineForRank(1, { isTokenInRank: src[1]!.isTokenInRank, bias: [] }, prefix, expertSides);
    assertTensorEqual(c1.combinedX, bf16([2, 2], [0, 0, 550, 660]), 'rank 1');
    assertTensorEqual(c1.combinedTopkWeights, f32([2, 2], [0, 0, 0.5, 0.5]), 'rank 1 weights back');
  });

  it('adds a bias before the single bf16 rounding (662 is a tie: rounds to even 664)', () => {
    const bias = bf16([2, 2], [1, 1, 2, 2]);
    const c1 = combineForRank(1, { isTokenInRank: src[1]!.isTokenInRank, bias: [bias] }, prefix, expertSides);
    assertTensorEqual(c1.combinedX, bf16([2, 2], [1, 1, 552, 664]), 'rank 1 with bias');
  });

  it('adds bias0 + bias1 first, then ranks ascending, in float32, and rounds once', () => {
    // One token on each of 4 ranks, sent to all. Rows [2^-24, 2^-24, 1, 2^-8] in ascending rank order
    // sum to 1 + 2^-8 + 2^-23 → bf16 1 + 2^-7; any other order loses the 2^-24s and ties down to 1.
    const map = bool([1, 4], [1, 1, 1, 1]);
    const rowsOf = (v: number) => ({ x: bf16([1, 1], [v]) });
    const p4 = i32([4, 4], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
    const sides = [2 ** -24, 2 ** -24, 1, 2 ** -8].map(rowsOf);
    const asc = combineForRank(3, { isTokenInRank: map, bias: [] }, p4, sides);
    assert.equal(bf16ToF32(asc.combinedX.data[0]!), 1 + 2 ** -7);
    // Biases first: (1 + 2^-8) + 2^-24 + 2^-24 stays at the tie 1 + 2^-8 → 1 (ranks first would give 1 + 2^-7).
    const m2 = bool([1, 2], [1, 1]);
    const p2 = i32([2, 2], [0, 0, 1, 1]);
    const withBias = combineForRank(
      1,
      { isTokenInRank: m2, bias: [bf16([1, 1], [1]), bf16([1, 1], [2 ** -8])] },
      p2,
      [rowsOf(2 ** -24), rowsOf(2 ** -24)],
    );
    assert.equal(bf16ToF32(withBias.combinedX.data[0]!), 1);
    // Single rounding: 1 + 3·2^-9 → 1 + 2^-7 (rounding after each add would stay at 1).
    const once = combineForRank(
      1,
      { isTokenInRank: m2, bias: [bf16([1, 1], [1]), bf16([1, 1], [2 ** -9])] },
      p2,
      [rowsOf(2 ** -9), rowsOf(2 ** -9)],
    );
    assert.equal(bf16ToF32(once.combinedX.data[0]!), 1 + 2 ** -7);
  });

  it('gives +0 for a token sent nowhere, even with -0 bias', () => {
    const c1 = combineForRank(
      1,
      { isTokenInRank: src[1]!.isTokenInRank, bias: [bf16([2, 2], [-0, -0, 0, 0])] },
      prefix,
      expertSides,
    );
    assert.equal(c1.combinedX.data[0], 0x0000);
  });
});

describe('reference low-latency dispatch', () => {
  const config = { numExperts: 4, maxTokensPerRank: 3, fp8: false, roundScale: false, ue8m0: false };

  it('fills [E_l, R·T_max, H] per expert: sources ascending, tokens ascending', () => {
    const [r0, r1] = referenceLowLatencyDispatch(
      [0, 1].map((r) => ({ x: xs[r]!, topkIdx: topk[r]! })),
      config,
    );
    // Rank 0: expert 0 ← (0, t0), (1, t1); expert 1 ← (0, t1).
    assert.deepEqual(values(r0!.recvCount), [2, 1]);
    assert.deepEqual(values(r0!.packedRecvSrcInfo), [0, 1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1]);
    assert.deepEqual(values(r0!.packedRecvLayoutRange), [1, 2 ** 32 + 1, 1, 2 ** 32]);
    const zeros = [0, 0, 0, 0, 0, 0, 0, 0];
    assertTensorEqual(
      r0!.recvX,
      bf16([2, 6, 2], [1, 2, 9, 10, ...zeros, 3, 4, ...zeros, 0, 0]),
      'rank 0 recvX',
    );
    // Rank 1: expert 2 ← (0, t2), (1, t1); expert 3 ← (0, t0), (0, t2).
    assert.deepEqual(values(r1!.recvCount), [2, 2]);
    assert.deepEqual(values(r1!.packedRecvSrcInfo), [2, 1, -1, -1, -1, -1, 0, 2, -1, -1, -1, -1]);
    assert.deepEqual(values(r1!.packedRecvLayoutRange), [1, 2 ** 32 + 1, 2, 2 * 2 ** 32]);
    assert.equal(r0!.recvScales, undefined);
  });

  it('quantizes FP8 per 128 channels with column-major scales; roundScale and UE8M0 packing', () => {
    // One token of 640 channels (5 blocks): block b is all ones except channel 128·b = 2.
    const H = 640;
    const x = bf16(
      [1, H],
      Array.from({ length: H }, (_, c) => (c % 128 === 0 ? 2 : 1)),
    );
    const src = [{ x, topkIdx: i32([1, 1], [1]) }];
    const plain = referenceLowLatencyDispatch(src, {
      numExperts: 2,
      maxTokensPerRank: 2,
      fp8: true,
      roundScale: false,
      ue8m0: false,
    })[0]!;
    // amax 2: scale = f32(2 / 448); 1 → 224 (e4m3 0x76), 2 → 448 (0x7e).
    assert.equal(plain.recvX.dtype, 'fp8_e4m3');
    const row = plain.recvX.data.subarray(2 * H, 2 * H + H); // expert 1, row 0
    assert.equal(row[0], 0x7e);
    assert.equal(row[1], 0x76);
    assert.equal(row[129], f32ToFp8E4m3(224));
    const scales = plain.recvScales!;
    assert.deepEqual(scales.shape, [2, 2, 5]);
    assert.deepEqual(scales.strides, [10, 1, 2], 'column-major in the last two dims');
    assert.equal(scales.data[scales.offsetOf(1, 0, 4)], Math.fround(2 / 448));

    const rounded = referenceLowLatencyDispatch(src, {
      numExperts: 2,
      maxTokensPerRank: 2,
      fp8: true,
      roundScale: true,
      ue8m0: false,
    })[0]!;
    // Scale 2^ceil(log2(2/448)) = 2^-7: 1 → 128 (0x70), 2 → 256 (0x78).
    assert.equal(rounded.recvX.data[2 * H], 0x78);
    assert.equal(rounded.recvX.data[2 * H + 1], 0x70);
    assert.equal(rounded.recvScales!.data[rounded.recvScales!.offsetOf(1, 0, 0)], 2 ** -7);

    const packed = referenceLowLatencyDispatch(src, {
      numExperts: 2,
      maxTokensPerRank: 2,
      fp8: true,
      roundScale: true,
      ue8m0: true,
    })[0]!;
    const p = packed.recvScales!;
    assert.equal(p.dtype, 'i32');
    assert.deepEqual(p.shape, [2, 2, 2]);
    assert.deepEqual(p.strides, [4, 1, 2]);
    // Exponent byte of 2^-7 is 120 = 0x78: four blocks in word 0, the fifth in byte 0 of word 1.
    assert.equal(p.data[p.offsetOf(1, 0, 0)], 0x78787878);
    assert.equal(p.data[p.offsetOf(1, 0, 1)], 0x78);
    assert.equal(p.data[p.offsetOf(0, 0, 0)], 0, 'expert 0 received nothing');
  });
});

describe('reference low-latency combine', () => {
  it('sums w·y over each token valid experts', () => {
    const received = referenceLowLatencyDispatch(
      [0, 1].map((r) => ({ x: xs[r]!, topkIdx: topk[r]! })),
      { numExperts: 4, maxTokensPerRank: 3, fp8: false, roundScale: false, ue8m0: false },
    );
    const sides = received.map((d) => ({
      x: d.recvX,
      packedRecvSrcInfo: d.packedRecvSrcInfo,
      packedRecvLayoutRange: d.packedRecvLayoutRange,
    }));
    const [c0, c1] = referenceLowLatencyCombine(
      [0, 1].map((r) => ({ topkIdx: topk[r]!, topkWeights: weights[r]! })),
      sides,
      4,
    );
    assertTensorEqual(c0, bf16([3, 2], [0.75, 1.5, 3, 4, 4.375, 5.25]), 'rank 0');
    assertTensorEqual(c1, bf16([2, 2], [0, 0, 9, 10]), 'rank 1');
  });

  /** One token routed to experts 0..K-1 of a one-rank world; expert e's row is ys[e]. */
  function combineOne(ys: number[], ws: number[]): number {
    const K = ys.length;
    const x = HostTensor.zeros('bf16', [K, 1, 1]);
    ys.forEach((y, e) => {
      x.data[e] = f32ToBf16(y);
    });
    const ranges = BigInt64Array.from(ys, () => 1n);
    const side = {
      x,
      packedRecvSrcInfo: HostTensor.zeros('i32', [K, 1]),
      packedRecvLayoutRange: HostTensor.from('i64', [K, 1], ranges),
    };
    const ids = i32(
      [1, K],
      Array.from({ length: K }, (_, k) => k),
    );
    const [out] = referenceLowLatencyCombine([{ topkIdx: ids, topkWeights: f32([1, K], ws) }], [side], K);
    return bf16ToF32(out!.data[0] as number);
  }

  it('accumulates in ascending k', () => {
    // 2^-24 + 2^-24 + 1 + 2^-8 → 1 + 2^-7 only in ascending order.
    assert.equal(combineOne([2 ** -24, 2 ** -24, 1, 2 ** -8], [1, 1, 1, 1]), 1 + 2 ** -7);
  });

  it('rounds each product to float32 before adding (no FMA)', () => {
    // -(1 + 2^-7) + f32((1 + 2^-23)(1 + 2^-7)) = 2^-23; an FMA would keep 2^-30 more.
    assert.equal(combineOne([1 + 2 ** -7, 1 + 2 ** -7], [-1, 1 + 2 ** -23]), 2 ** -23);
  });
});
