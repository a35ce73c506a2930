// The buffer layout of the normal mode across hosts (src/ep/gpu/hier-layout.ts), which kernels/hier.cu
// takes as -D defines: regions in order without overlap, aligned, big enough for their largest content,
// and a record that holds any payload the buffer accepts.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';
import { alignUp, rankPrefixMatrix } from '../../src/cpu/ref-dispatch.ts';
import { referenceLayout } from '../../src/cpu/ref-layout.ts';
import { countsFromMatrix, HIER_CTRL, hierDefines, hierLayout } from '../../src/ep/gpu/hier-layout.ts';
import { randomRouting, routingTensor, tokensPerHost } from './helpers/inputs.ts';

const shapes = [
  { numRanks: 4, ranksPerHost: 2, hidden: 7168, maxTokensPerRank: 4096, numTopk: 8, numExperts: 256 },
  { numRanks: 2, ranksPerHost: 1, hidden: 2560, maxTokensPerRank: 127, numTopk: 6, numExperts: 64 },
  { numRanks: 16, ranksPerHost: 8, hidden: 4096, maxTokensPerRank: 1, numTopk: 1, numExperts: 16 },
  { numRanks: 32, ranksPerHost: 8, hidden: 16, maxTokensPerRank: 3, numTopk: 32, numExperts: 1024 },
];

describe('hierarchical normal-mode layout', () => {
  for (const s of shapes) {
    it(`${s.numRanks} ranks in hosts of ${s.ranksPerHost}, H=${s.hidden}, T=${s.maxTokensPerRank}, K=${s.numTopk}`, () => {
      const l = hierLayout(s);
      const R = s.numRanks;
      const NH = R / s.ranksPerHost;
      const H = s.hidden;
      const T = s.maxTokensPerRank;
      const K = s.numTopk;
      assert.equal(l.hosts, NH);
      assert.equal(l.countWords, R + NH + s.numExperts + 1);
      // The record: a bf16 row, f32 scales, i64 ids, weights, the source index, P positions, in order.
      assert.ok(l.recordScales >= 2 * H);
      assert.ok(l.recordTopk >= l.recordScales + 4 * Math.ceil(H / 128) && l.recordTopk % 8 === 0);
      assert.ok(l.recordWeights >= l.recordTopk + 8 * K);
      assert.ok(l.recordSrc >= l.recordWeights + 4 * K);
      assert.equal(l.recordPos, l.recordSrc + 4);
      assert.ok(l.recordBytes >= l.recordPos + 4 * s.ranksPerHost && l.recordBytes % 16 === 0);
      // Regions: control block, count row, matrix, inboxes, outboxes, combine rows and weights, partials.
      const regions: [string, number, number][] = [
        ['control', 0, 4096],
        ['count row', l.offCounts, 4 * l.countWords],
        ['count matrix', l.offMatrix, 4 * R * l.countWords],
        ['inbox', l.offInbox, NH * l.slotBytes],
        ['outbox', l.offOutbox, NH * l.slotBytes],
        ['combine rows', l.offCombineRows, R * T * 2 * H],
        ['combine weights', l.offCombineWeights, R * T * 4 * K],
        ['partials', l.offPartials, NH * T * l.partialRowBytes],
        ['partials in', l.offPartialsIn, NH * T * l.partialRowBytes],
      ];
      for (let i = 1; i < regions.length; i++) {
        const [name, at] = regions[i]!;
        const [prev, prevAt, prevBytes] = regions[i - 1]!;
        assert.ok(
          at >= prevAt + prevBytes,
          `${name} at ${at} overlaps ${prev} [${prevAt}, ${prevAt + prevBytes})`,
        );
        assert.equal(at % 16, 0, `${name} is 16-byte aligned`);
      }
      const [, lastAt, lastBytes] = regions[regions.length - 1]!;
      assert.ok(l.totalBytes >= lastAt + lastBytes);
      assert.ok(l.slotBytes >= T * l.recordBytes);
      assert.ok(l.partialRowBytes >= 4 * H + 4 * K && l.partialRowBytes % 16 === 0);
      // Every define the kernels read, from the layout.
      const d = hierDefines(l);
      assert.equal(d.HIER_R, R);
      assert.equal(d.HIER_P, s.ranksPerHost);
      assert.equal(d.HIER_OFF_CIN, l.offPartialsIn);
      assert.equal(d.HIER_REC, l.recordBytes);
      assert.equal(Object.values(d).filter((v) => !Number.isSafeInteger(v)).length, 0);
    });
  }

  it('control block words do not overlap at the largest shape (32 ranks, 32 hosts) and fit in it', () => {
    const R = 32;
    const NH = 32;
    const words: [string, number, number][] = [
      ['abort', HIER_CTRL.abort, 4],
      ['dispatchEpoch', HIER_CTRL.dispatchEpoch, 4],
      ['combineEpoch', HIER_CTRL.combineEpoch, 4],
      ['round', HIER_CTRL.round, 4],
      ['arrive', HIER_CTRL.arrive, 4],
      ['rdmaTokens', HIER_CTRL.rdmaTokens, 8],
      ['rdmaBytes', HIER_CTRL.rdmaBytes, 8],
      ['signalDispatch', HIER_CTRL.signalDispatch, 8 * NH],
      ['signalCombine', HIER_CTRL.signalCombine, 8 * NH],
      ['signalRows', HIER_CTRL.signalRows, 8],
      ['signalCounts', HIER_CTRL.signalCounts, 8 * R],
      ['barrier', HIER_CTRL.barrier, 4 * R],
      ['signalRepublish', HIER_CTRL.signalRepublish, 8 * NH],
    ];
    const sorted = [...words].sort((a, b) => a[1] - b[1]);
    for (let i = 0; i < sorted.length; i++) {
      const [name, at, bytes] = sorted[i]!;
      assert.equal(at % Math.min(bytes, 8), 0, `${name} is aligned`);
      const end = i + 1 < sorted.length ? sorted[i + 1]![1] : HIER_CTRL.bytes;
      assert.ok(at + bytes <= end, `${name} [${at}, ${at + bytes}) runs into the next word at ${end}`);
    }
    // Every word reaches the kernels as a define.
    const d = hierDefines(
      hierLayout({
        numRanks: 4,
        ranksPerHost: 2,
        hidden: 2048,
        maxTokensPerRank: 64,
        numTopk: 8,
        numExperts: 16,
      }),
    );
    assert.equal(d.HC_SIG_R, HIER_CTRL.signalRepublish);
    assert.equal(d.HC_SIG_D, HIER_CTRL.signalDispatch);
  });

  it('refuses hosts that do not divide the ranks, more than 32 ranks or more than 8 per host', () => {
    const base = shapes[0]!;
    assert.throws(() => hierLayout({ ...base, ranksPerHost: 3 }), RangeError);
    assert.throws(() => hierLayout({ ...base, numRanks: 64, ranksPerHost: 8 }), RangeError);
    assert.throws(() => hierLayout({ ...base, numRanks: 16, ranksPerHost: 16 }), RangeError);
  });
});

describe('the host reading of the count matrix', () => {
  it('gives the reference rows, aligned per-expert counts, rank prefix matrix and proxy records', () => {
    const rng = new Rng(11);
    for (const [R, P, E, K, alignment] of [
      [4, 2, 32, 4, 1],
      [8, 4, 64, 8, 4],
      [6, 3, 12, 2, 2],
      [2, 1, 8, 1, 1],
    ] as const) {
      const NH = R / P;
      const EL = E / R;
      const layouts = Array.from({ length: R }, () => {
        const T = Math.floor(rng.float() * 60);
        const ids = randomRouting(rng, T, K, E, { dropRate: 0.2 });
        return referenceLayout(routingTensor('i32', T, K, ids), E, R);
      });
      // Each rank's count row as hier_route writes it: per rank, per host, per expert, shape word.
      const perHost = layouts.map((l) => tokensPerHost(l.isTokenInRank, P));
      const matrix = layouts.map((l, s) =>
        Int32Array.from([...l.numTokensPerRank.data, ...perHost[s]!, ...l.numTokensPerExpert.data, 7]),
      );
      const prefix = rankPrefixMatrix(layouts.map((l) => l.isTokenInRank)).data;
      for (let me = 0; me < R; me++) {
        const c = countsFromMatrix(
          { numRanks: R, ranksPerHost: P, hosts: NH, numExperts: E },
          matrix,
          me,
          alignment,
        );
        assert.equal(
          c.rows,
          layouts.reduce((a, l) => a + l.numTokensPerRank.data[me]!, 0),
        );
        assert.deepEqual(
          c.perExpert,
          Array.from({ length: EL }, (_, e) =>
            alignUp(
              layouts.reduce((a, l) => a + l.numTokensPerExpert.data[me * EL + e]!, 0),
              alignment,
            ),
          ),
        );
        assert.deepEqual(c.rankPrefix, Array.from(prefix));
        // From the routing, not the matrix: the sources with this rank's local index, their tokens for
        // this rank's host.
        const host = Math.floor(me / P);
        let proxied = 0;
        for (let s = 0; s < R; s++) {
          if (s % P === me % P) proxied += perHost[s]![host]!;
        }
        assert.equal(c.proxyRecords, proxied);
      }
    }
  });
});
