// Host-side arithmetic of the low-latency mode that the kernels rely on: the NCCL path's block layout
// (ll-nccl-layout.ts, against the defaults compiled into kernels/ll_nccl.cu) and the launch shapes,
// capacity limits and one-shot hooks both transports share (ll-call.ts).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import {
  combineRecvGrid,
  defaultLlGrids,
  dispatchSendGrid,
  hookOnce,
  llBufferShape,
  llSharedBytes,
} from '../../src/ep/gpu/ll-call.ts';
import { callTag, llNcclDefines, llNcclLayout } from '../../src/ep/gpu/ll-nccl-layout.ts';
import { TsepError, ValidationError } from '../../src/errors.ts';

const STANDARD = { numRanks: 4, localExperts: 72, hidden: 7168, maxTokensPerRank: 128, numTopk: 8 };

test('NCCL layout of the standard shape: the byte counts docs/low-latency.md gives', () => {
  const l = llNcclLayout(STANDARD);
  assert.deepEqual(l.msgBytes, { fp8: 7392, bf16: 14336 });
  assert.equal(l.routeOffset, 128);
  assert.equal(l.msgOffset, 4224);
  assert.deepEqual(l.blockBytes, { fp8: 950_400, bf16: 1_839_232 });
  assert.equal(l.dispatchSendBytes, 1_839_232);
  assert.equal(l.dispatchRecvHalfBytes, 7_356_928);
  assert.equal(l.combineRowsOffset, 128);
  assert.equal(l.combineBlockBytes, 14_680_192);
  assert.equal(l.combineSendBytes, 58_720_768);
  assert.equal(l.combineRecvHalfBytes, 58_720_768);
  assert.equal(l.totalBytes, 192_715_392);
});

test('NCCL layout: aligned offsets, messages that hold a row and its scales, blocks that hold T_max of them', () => {
  for (const [R, El, H, T, K] of [
    [2, 4, 2048, 128, 8],
    [4, 16, 4096, 7, 8],
    [8, 36, 7168, 256, 8],
    [16, 18, 2560, 1, 1],
    [3, 1, 16, 5, 3],
  ] as const) {
    const l = llNcclLayout({ numRanks: R, localExperts: El, hidden: H, maxTokensPerRank: T, numTopk: K });
    const where = `R=${R} H=${H} T=${T} K=${K}`;
    assert.ok(l.routeOffset >= 4, `${where}: the token count fits before the routing`);
    assert.ok(l.msgOffset >= l.routeOffset + T * K * 4 && l.msgOffset % 128 === 0, where);
    assert.ok(l.msgBytes.bf16 >= 2 * H && l.msgBytes.bf16 % 16 === 0, where);
    assert.ok(l.msgBytes.fp8 >= H + 4 * Math.ceil(H / 128) && l.msgBytes.fp8 % 16 === 0, where);
    for (const kind of ['fp8', 'bf16'] as const) {
      assert.ok(l.blockBytes[kind] >= l.msgOffset + T * l.msgBytes[kind], `${where} ${kind}`);
      assert.equal(
        l.blockBytes[kind] % 128,
        0,
        `${where} ${kind}: blocks stay 16-byte aligned when gathered`,
      );
      assert.ok(l.blockBytes[kind] <= l.dispatchSendBytes, `${where} ${kind}`);
    }
    assert.equal(l.dispatchRecvHalfBytes, R * l.dispatchSendBytes, where);
    assert.equal(l.combineBlockBytes, l.combineRowsOffset + T * K * 2 * H, where);
    assert.ok(
      l.combineRowsOffset >= 4 && l.combineRowsOffset % 128 === 0,
      `${where}: the tag fits before the rows`,
    );
    assert.equal(
      l.totalBytes,
      l.dispatchSendBytes + 2 * l.dispatchRecvHalfBytes + R * l.combineBlockBytes * 3,
      `${where}: one send block set and two receive halves per call kind`,
    );
    assert.deepEqual(llNcclDefines(l), {
      LL_R: R,
      LL_EL: El,
      LL_H: H,
      LL_TMAX: T,
      LL_KMAX: K,
      LLN_ROUTE: l.routeOffset,
      LLN_MSGS: l.msgOffset,
      LLN_CROWS: l.combineRowsOffset,
    });
  }
});

test("the kernels' stand-alone defaults are the standard shape's layout", () => {
  const defines = (file: string): Record<string, number> => {
    const text = readFileSync(new URL(`../../kernels/${file}`, import.meta.url), 'utf8');
    return Object.fromEntries(
      [...text.matchAll(/^#define (LLN?_\w+) (\d+)$/gm)].map((m) => [m[1], Number(m[2])]),
    );
  };
  const want = llNcclDefines(llNcclLayout(STANDARD));
  const got = { ...defines('ll_core.cuh'), ...defines('ll_nccl.cu') };
  for (const [name, value] of Object.entries(want)) assert.equal(got[name], value, name);
});

test('buffer shape: local experts from the ranks; the receive scan bounds maxTokensPerRank and R × it', () => {
  const options = (maxTokensPerRank: number) => ({
    numExperts: 288,
    hidden: 7168,
    maxTokensPerRank,
    numTopk: 8,
  });
  assert.deepEqual(llBufferShape(4, options(128)), STANDARD);
  llBufferShape(1, options(16384));
  llBufferShape(8, options(2048));
  llBufferShape(64, options(256));
  for (const [R, T] of [
    [1, 65536],
    [2, 8193],
    [8, 2049],
  ] as const) {
    assert.throws(
      () => llBufferShape(R, options(T)),
      (e: unknown) => {
        assert.ok(e instanceof ValidationError);
        assert.equal(e.argument, 'maxTokensPerRank');
        assert.match(e.message, new RegExp(`${R} ranks`));
        return true;
      },
    );
  }
});

test('launch shapes: defaults follow the SM count; grids cover the work, at least one block', () => {
  const g = defaultLlGrids(132, 72);
  assert.deepEqual(g, {
    dispatchSendBlocks: 264,
    dispatchRecvParts: 3,
    combineSendBlocks: 132,
    combineRecvBlocks: 528,
  });
  assert.equal(defaultLlGrids(132, 288).dispatchRecvParts, 1);
  // A warp per (token, 512 channels), 16 warps per block.
  assert.equal(dispatchSendGrid(g, 128, 7168), 112);
  assert.equal(dispatchSendGrid(g, 0, 7168), 1);
  assert.equal(dispatchSendGrid(g, 4096, 7168), 264);
  // A thread per (token, 8 channels), 512 threads per block.
  assert.equal(combineRecvGrid(g, 128, 7168), 224);
  assert.equal(combineRecvGrid(g, 0, 7168), 1);
  assert.equal(combineRecvGrid(g, 4096, 7168), 528);
  assert.deepEqual(llSharedBytes(STANDARD), { dispatchRecv: 4096, combineSend: 4 * (2 * 288 + 73) });
});

test('a receive hook runs once; its check runs first and can refuse it', () => {
  let runs = 0;
  let refuse = true;
  const hook = hookOnce(
    'dispatch',
    () => {
      if (refuse) throw new TsepError('TSEP_UNSUPPORTED', 'not now');
    },
    () => {
      runs++;
    },
  );
  assert.throws(() => hook(), /not now/);
  assert.equal(runs, 0);
  refuse = false;
  hook();
  assert.equal(runs, 1);
  assert.throws(
    () => hook(),
    (e: unknown) =>
      e instanceof TsepError && e.code === 'TSEP_UNSUPPORTED' && /already called/.test(e.message),
  );
  assert.equal(runs, 1);
});

test('call tags: never 0, distinct for the calls a receive half can hold, and per reset', () => {
  const seen = new Set<number>();
  for (const epoch of [0, 1, 255])
    for (let call = 0; call < 1000; call++) {
      const t = callTag(epoch, call);
      assert.ok(t > 0 && t <= 0xffffffff && Number.isInteger(t), `tag ${t}`);
      assert.equal(t >>> 24, epoch);
      seen.add(t);
    }
  assert.equal(seen.size, 3000);
  // Half i & 1 holds call i until call i + 2: consecutive calls of a half never share a tag, also when the
  // 24-bit index wraps.
  for (const call of [0, 0xfffffd, 0xfffffe, 0xffffff, 2 * 0xffffff - 1])
    assert.notEqual(callTag(3, call), callTag(3, call + 2));
  assert.equal(callTag(256, 0), callTag(0, 0)); // the epoch's 8 bits wrap
});
