// EpBuffer behaviour beyond single calls: backend selection, events and hooks, previous events and
// call ordering, ranks that disagree, size hints, destroy.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Rng } from '../../src/cpu/random.ts';
import {
  referenceDispatch,
  referenceLayout,
  referenceLowLatencyCombine,
  referenceLowLatencyDispatch,
} from '../../src/cpu/reference.ts';
import type { Group } from '../../src/dist/group.ts';
import { LocalGroup } from '../../src/dist/local-group.ts';
import { StoreClient, StoreServer } from '../../src/dist/store.ts';
import { StoreGroup } from '../../src/dist/store-group.ts';
import { EpBuffer } from '../../src/ep/buffer.ts';
import { selectBackend } from '../../src/ep/select.ts';
import type { EpBufferOptions, EpEvent, Tensor } from '../../src/ep/types.ts';
import { RendezvousError, TsepError, ValidationError } from '../../src/errors.ts';
import { assertNamesFailedRank, createWorld, destroyWorld, onAllRanks } from './helpers/ep-world.ts';
import { randomBf16, randomFp8, randomRouting, randomWeights } from './helpers/inputs.ts';
import { asHost, assertTensorEqual, i32 } from './helpers/tensors.ts';

const R = 4;
const OPTIONS: EpBufferOptions = {
  hidden: 128,
  maxTokensPerRank: 4,
  numExperts: 8,
  numTopk: 3,
  mode: 'both',
};

function makeInputs(seed: number, T = 3) {
  const rng = new Rng(seed);
  return Array.from({ length: R }, () => ({
    x: randomBf16(rng, T, OPTIONS.hidden),
    topkIdx: i32([T, 3], Array.from(randomRouting(rng, T, 3, 8, { dropRate: 0.2 }))),
    topkWeights: randomWeights(rng, T, 3),
  }));
}

function expectedDispatch(inputs: ReturnType<typeof makeInputs>) {
  const sources = inputs.map((inp) => ({ ...inp, ...referenceLayout(inp.topkIdx, 8, R) }));
  return referenceDispatch(sources, { numExperts: 8, expertAlignment: 1, worstCaseTokens: 0 });
}

/** What a BF16 low-latency dispatch of `inputs` must produce on each rank. */
function expectedLowLatency(inputs: ReturnType<typeof makeInputs>) {
  return referenceLowLatencyDispatch(inputs, {
    numExperts: 8,
    maxTokensPerRank: 4,
    fp8: false,
    roundScale: false,
    ue8m0: false,
  });
}

/** Every rank's recvX equals the expected rank's (BF16 dispatch outputs of either mode). */
function assertRecvX(got: readonly { recvX: Tensor }[], expected: readonly { recvX: Tensor }[]): void {
  for (let r = 0; r < R; r++) assertTensorEqual(got[r]!.recvX, expected[r]!.recvX, `rank ${r}`);
}

/** A normal dispatch of `inputs` on every rank pairs up and is exact (e.g. after a failed call). */
async function assertNextDispatchExact(buffers: EpBuffer[], inputs: ReturnType<typeof makeInputs>) {
  assertRecvX(await onAllRanks(buffers, (b, r) => b.dispatch(inputs[r]!)), expectedDispatch(inputs));
}

/** A topkIdx [3, 3] that validation refuses: expert 99 of 8. */
const BAD_TOPK = i32([3, 3], [0, 1, 99, 2, 3, 4, 5, 6, 7]);

/** An event the test completes by hand. */
function manualEvent(): EpEvent & { resolve(): void; reject(e: Error): void } {
  let done = false;
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const p = new Promise<void>((res, rej) => {
    resolve = () => {
      done = true;
      res();
    };
    reject = (e) => {
      done = true;
      rej(e);
    };
  });
  p.catch(() => undefined);
  return { query: () => done, wait: () => p, resolve, reject };
}

const tick = () => new Promise((r) => setTimeout(r, 5));

describe('backend selection', () => {
  it("'auto' and 'cpu' give the CPU backend; 'gpu' throws TSEP_NO_GPU", async () => {
    const [one] = LocalGroup.create(1);
    assert.equal((await selectBackend('auto', one!)).name, 'cpu');
    assert.equal((await selectBackend('cpu', one!)).name, 'cpu');
    await assert.rejects(
      selectBackend('gpu', one!),
      (e: unknown) => e instanceof TsepError && e.code === 'TSEP_NO_GPU',
    );
    const auto = await createWorld(R, OPTIONS);
    assert.equal(auto[0]!.backend, 'cpu');
    await destroyWorld(auto);
    const groups = LocalGroup.create(R);
    const results = await Promise.allSettled(
      groups.map((g) => EpBuffer.create(g, { ...OPTIONS, backend: 'gpu' })),
    );
    for (const r of results) {
      assert.equal(r.status, 'rejected');
      assert.equal(((r as PromiseRejectedResult).reason as TsepError).code, 'TSEP_NO_GPU');
    }
  });

  it('resolves defaults and exposes the shape of the world', async () => {
    const buffers = await createWorld(2, { hidden: 64, maxTokensPerRank: 2, numExperts: 6, numTopk: 2 });
    assert.deepEqual(buffers[1]!.options, {
      hidden: 64,
      maxTokensPerRank: 2,
      numExperts: 6,
      numTopk: 2,
      mode: 'normal',
      fp8: false,
      backend: 'auto',
      transport: 'auto',
      ranksPerHost: 2,
    });
    assert.equal(buffers[1]!.rank, 1);
    assert.equal(buffers[1]!.numRanks, 2);
    assert.equal(buffers[1]!.numLocalExperts, 3);
    // GPU-only facilities are absent on the CPU backend, and tuning knobs are validated.
    assert.equal(buffers[0]!.stream, undefined);
    assert.equal(await buffers[0]!.phaseTimes(), undefined);
    await Promise.all(buffers.map((b) => b.reset())); // no device state: resolves, buffer stays usable
    buffers[0]!.setNumSms(16);
    assert.throws(() => buffers[0]!.setNumSms(0), ValidationError);
    await destroyWorld(buffers);
  });
});

describe('events and hooks', () => {
  it('a resolved dispatch or combine is complete; low-latency outputs are ready once the event is', async () => {
    const inputs = makeInputs(1);
    const buffers = await createWorld(R, OPTIONS);
    await onAllRanks(buffers, async (b, r) => {
      const d = await b.dispatch(inputs[r]!);
      assert.ok(d.event.query());
      await d.event.wait();
      const c = await b.combine({ x: d.recvX, handle: d.handle });
      assert.ok(c.event.query());
      const ll = b.lowLatencyDispatch({ ...inputs[r]!, fp8: true });
      assert.equal(ll.event.query(), false, 'the receive runs after the call returns');
      assert.equal(ll.hook, undefined);
      await ll.event.wait();
      assert.ok(ll.event.query());
    });
    await destroyWorld(buffers);
  });

  it('with returnRecvHook nothing is received until the hook runs; calling it twice is harmless', async () => {
    const inputs = makeInputs(2);
    const buffers = await createWorld(R, OPTIONS);
    const out = await onAllRanks(buffers, async (b, r) => {
      const ll = b.lowLatencyDispatch({ ...inputs[r]!, returnRecvHook: true });
      await tick();
      assert.equal(ll.event.query(), false);
      assert.deepEqual(Array.from(asHost(ll.recvCount).data as Int32Array), [0, 0]);
      const first = ll.hook!();
      assert.equal(ll.hook!(), first);
      await first;
      assert.ok(ll.event.query());
      return ll;
    });
    assertRecvX(out, expectedLowLatency(inputs));
    await destroyWorld(buffers);
  });

  it('a low-latency combine may take the dispatch outputs before they are filled', async () => {
    const inputs = makeInputs(3);
    const buffers = await createWorld(R, OPTIONS);
    const combined = await onAllRanks(buffers, async (b, r) => {
      const d = b.lowLatencyDispatch(inputs[r]!);
      // No wait: the CPU backend reads x and the handle once the dispatch has filled them.
      const c = b.lowLatencyCombine({ ...inputs[r]!, x: d.recvX, handle: d.handle });
      await c.event.wait();
      return c.combinedX;
    });
    const received = expectedLowLatency(inputs);
    const expected = referenceLowLatencyCombine(
      inputs,
      received.map((d) => ({
        x: d.recvX,
        packedRecvSrcInfo: d.packedRecvSrcInfo,
        packedRecvLayoutRange: d.packedRecvLayoutRange,
      })),
      8,
    );
    for (let r = 0; r < R; r++) assertTensorEqual(combined[r], expected[r], `rank ${r}`);
    await destroyWorld(buffers);
  });
});

describe('previous events and call order', () => {
  it('dispatch starts after previousEvent; calls made meanwhile still pair up across ranks', async () => {
    const inputs = makeInputs(4);
    const buffers = await createWorld(R, OPTIONS);
    const events = buffers.map(() => manualEvent());
    const out = await onAllRanks(buffers, async (b, r) => {
      const pending = b.dispatch({ ...inputs[r]!, previousEvent: events[r]! });
      // Issued while the dispatch waits; on ranks whose event resolves first it would otherwise go first.
      const ll = b.lowLatencyDispatch(inputs[r]!);
      setTimeout(() => events[r]!.resolve(), r * 3);
      const [d] = await Promise.all([pending, ll.event.wait()]);
      return { d, ll };
    });
    const expected = expectedDispatch(inputs);
    const ll = expectedLowLatency(inputs);
    for (let r = 0; r < R; r++) {
      assertTensorEqual(out[r]!.d.recvX, expected[r]!.recvX, `rank ${r} dispatch`);
      assertTensorEqual(out[r]!.ll.recvX, ll[r]!.recvX, `rank ${r} low-latency dispatch`);
    }
    await destroyWorld(buffers);
  });

  it('a failed previousEvent fails the call on every rank and leaves the buffers usable', async () => {
    const inputs = makeInputs(5);
    const buffers = await createWorld(R, OPTIONS);
    const broken = manualEvent();
    broken.reject(new Error('upstream failure'));
    const results = await Promise.allSettled(
      buffers.map((b, r) => b.dispatch({ ...inputs[r]!, ...(r === 0 ? { previousEvent: broken } : {}) })),
    );
    assert.match(((results[0] as PromiseRejectedResult).reason as Error).message, /upstream failure/);
    for (const r of [1, 2, 3]) {
      const reason = assertNamesFailedRank((results[r] as PromiseRejectedResult).reason, 0, `rank ${r}`);
      assert.match(reason.message, /rank 0 .*upstream failure/);
    }
    await assertNextDispatchExact(buffers, inputs);
    await destroyWorld(buffers);
  });
});

describe('ranks that make mismatched calls', () => {
  it('a cached dispatch on one rank and fresh ones elsewhere fails everywhere, then works', async () => {
    const inputs = makeInputs(6);
    const buffers = await createWorld(R, OPTIONS);
    const first = await onAllRanks(buffers, (b, r) => b.dispatch(inputs[r]!));
    const mixed = await Promise.allSettled(
      buffers.map((b, r) => b.dispatch(r === 0 ? { x: inputs[0]!.x, handle: first[0]!.handle } : inputs[r]!)),
    );
    for (const res of mixed)
      assert.equal(((res as PromiseRejectedResult).reason as ValidationError).argument, 'handle');
    await assertNextDispatchExact(buffers, inputs);
    await destroyWorld(buffers);
  });

  it('FP8 on one rank and BF16 elsewhere fails everywhere', async () => {
    const inputs = makeInputs(7);
    const fp8 = randomFp8(new Rng(7), 3, 128, 'f32');
    const buffers = await createWorld(R, OPTIONS);
    const mixed = await Promise.allSettled(
      buffers.map((b, r) => b.dispatch(r === 2 ? { ...inputs[r]!, ...fp8 } : inputs[r]!)),
    );
    for (const res of mixed)
      assert.equal(((res as PromiseRejectedResult).reason as ValidationError).argument, 'x');
    await destroyWorld(buffers);
  });
});

describe('a call refused on one rank', () => {
  it('bad arguments on one rank fail that call on every rank; the next calls pair up and are exact', async () => {
    const inputs = makeInputs(8);
    const buffers = await createWorld(R, OPTIONS);
    const results = await Promise.allSettled(
      buffers.map((b, r) => b.dispatch(r === 1 ? { ...inputs[r]!, topkIdx: BAD_TOPK } : inputs[r]!)),
    );
    const own = (results[1] as PromiseRejectedResult).reason;
    assert.ok(own instanceof ValidationError, String(own));
    for (const r of [0, 2, 3]) {
      const reason = assertNamesFailedRank((results[r] as PromiseRejectedResult).reason, 1, `rank ${r}`);
      assert.match(reason.message, /dispatch: rank 1 failed before sending its part: Invalid topkIdx/);
    }
    await assertNextDispatchExact(buffers, inputs);
    await destroyWorld(buffers);
  });

  it('the same for a low-latency call refused on one rank: the events of its peers fail', async () => {
    const inputs = makeInputs(9);
    const buffers = await createWorld(R, OPTIONS);
    const outcomes = await Promise.allSettled(
      buffers.map(async (b, r) => {
        const args = r === 2 ? { ...inputs[r]!, x: randomBf16(new Rng(9), 3, 64) } : inputs[r]!;
        return b.lowLatencyDispatch(args).event.wait();
      }),
    );
    const own = (outcomes[2] as PromiseRejectedResult).reason;
    assert.ok(own instanceof ValidationError, String(own));
    for (const r of [0, 1, 3])
      assertNamesFailedRank((outcomes[r] as PromiseRejectedResult).reason, 2, `rank ${r}`);
    const ll = await onAllRanks(buffers, async (b, r) => {
      const d = b.lowLatencyDispatch(inputs[r]!);
      await d.event.wait();
      return d;
    });
    assertRecvX(ll, expectedLowLatency(inputs));
    await destroyWorld(buffers);
  });

  it('destroy() waits for the exchange of a refused call', async () => {
    const inputs = makeInputs(11);
    const buffers = await createWorld(R, OPTIONS);
    // Rank 0 refuses alone: its marker waits for the peers' same call, which comes after destroy() began.
    await assert.rejects(buffers[0]!.dispatch({ ...inputs[0]!, topkIdx: BAD_TOPK }), ValidationError);
    let destroyed = false;
    const destroying = buffers[0]!.destroy().then(() => {
      destroyed = true;
    });
    await tick();
    assert.equal(destroyed, false, 'destroy() returned while the refused call was still exchanging');
    const peers = await Promise.allSettled(buffers.slice(1).map((b, i) => b.dispatch(inputs[i + 1]!)));
    for (const p of peers) assert.ok((p as PromiseRejectedResult).reason instanceof RendezvousError);
    await destroying;
    await Promise.all(buffers.slice(1).map((b) => b.destroy()));
  });

  it('different calls on different ranks fail everywhere with the same ValidationError', async () => {
    const inputs = makeInputs(10);
    const buffers = await createWorld(R, OPTIONS);
    const outcomes = await Promise.allSettled(
      buffers.map(async (b, r) =>
        r === 3 ? b.lowLatencyDispatch(inputs[r]!).event.wait() : b.dispatch(inputs[r]!),
      ),
    );
    for (let r = 0; r < R; r++) {
      const reason = (outcomes[r] as PromiseRejectedResult).reason;
      assert.ok(reason instanceof ValidationError, `rank ${r}: ${String(reason)}`);
      assert.equal(reason.argument, 'call order');
      assert.match(reason.message, /the same EpBuffer calls in the same order on every rank/);
      // The same error on every rank, naming the odd rank against rank 0.
      assert.equal(reason.message, (outcomes[0] as PromiseRejectedResult).reason.message, `rank ${r}`);
    }
    assert.match(
      (outcomes[0] as PromiseRejectedResult).reason.message,
      /got lowLatencyDispatch on rank 3 but dispatch on rank 0/,
    );
    await assertNextDispatchExact(buffers, inputs);
    await destroyWorld(buffers);
  });
});

describe('groups', () => {
  it('the CPU backend runs over a TCP-store group (StoreGroup), not only LocalGroup', async () => {
    const inputs = makeInputs(11);
    const server = await StoreServer.listen();
    const groups = await Promise.all(
      inputs.map(
        async (_, rank) =>
          new StoreGroup(await StoreClient.connect('127.0.0.1', server.port, { timeoutMs: 10_000 }), {
            rank,
            size: R,
            localRank: rank,
            localSize: R,
            namespace: 'ep-buffer-test',
          }),
      ),
    );
    try {
      const buffers = await Promise.all(
        groups.map((g) => EpBuffer.create(g, { ...OPTIONS, backend: 'cpu' })),
      );
      const out = await onAllRanks(buffers, async (b, r) => {
        const d = await b.dispatch(inputs[r]!);
        const ll = b.lowLatencyDispatch({ ...inputs[r]!, fp8: true, ue8m0: true });
        await ll.event.wait();
        return { d, ll };
      });
      const expected = expectedDispatch(inputs);
      const ll = referenceLowLatencyDispatch(inputs, {
        numExperts: 8,
        maxTokensPerRank: 4,
        fp8: true,
        roundScale: true,
        ue8m0: true,
      });
      for (let r = 0; r < R; r++) {
        assertTensorEqual(out[r]!.d.recvX, expected[r]!.recvX, `rank ${r} recvX`);
        assertTensorEqual(
          out[r]!.d.recvTopkWeights,
          expected[r]!.recvTopkWeights,
          `rank ${r} recvTopkWeights`,
        );
        assertTensorEqual(out[r]!.ll.recvX, ll[r]!.recvX, `rank ${r} low-latency recvX`);
        assertTensorEqual(out[r]!.ll.recvScales, ll[r]!.recvScales, `rank ${r} low-latency scales`);
      }
      await destroyWorld(buffers);
    } finally {
      await Promise.all(groups.map((g) => g.destroy()));
      await server.close();
    }
  });
});

describe('handles', () => {
  it('carry the owner buffer and the routing', async () => {
    const inputs = makeInputs(8);
    const buffers = await createWorld(R, OPTIONS);
    const ds = await onAllRanks(buffers, (b, r) => b.dispatch({ ...inputs[r]!, expertAlignment: 2 }));
    const h = ds[1]!.handle;
    assert.equal(h.kind, 'dispatch');
    assert.match(h.owner.label, /rank 1 of 4, cpu backend/);
    assert.equal(h.numTokens, 3);
    assert.equal(h.expertAlignment, 2);
    assert.equal(h.worstCaseTokens, 0);
    assertTensorEqual(
      h.isTokenInRank,
      referenceLayout(inputs[1]!.topkIdx, 8, R).isTokenInRank,
      'isTokenInRank',
    );
    assert.notEqual(ds[0]!.handle.owner, h.owner);
    // dispose() frees nothing on the CPU backend; the handle's host tensors stay readable.
    h.dispose();
    assertTensorEqual(
      h.isTokenInRank,
      referenceLayout(inputs[1]!.topkIdx, 8, R).isTokenInRank,
      'after dispose',
    );
    await destroyWorld(buffers);
  });
});

describe('size hints', () => {
  /** Wraps a group, recording the total bytes each allGather delivered. */
  function counting(group: Group, sizes: number[]): Group {
    return new Proxy(group, {
      get(target, prop, receiver) {
        if (prop !== 'allGather') return Reflect.get(target, prop, receiver);
        return async (data: Uint8Array) => {
          const all = await target.allGather(data);
          sizes.push(all.reduce((n, b) => n + b.length, 0));
          return all;
        };
      },
    });
  }

  it('cover the memory of full-capacity calls, per enabled mode', async () => {
    const opts = { hidden: 256, maxTokensPerRank: 4, numExperts: 8, numTopk: 2, mode: 'both' } as const;
    const sizes: number[][] = [[], [], [], []];
    const groups = LocalGroup.create(R).map((g, r) => counting(g, sizes[r]!));
    const buffers = await Promise.all(groups.map((g) => EpBuffer.create(g, opts)));
    const hint = buffers[0]!.sizeHint();
    // Every token to two experts on two different ranks: the most rows any call can move.
    const inputs = Array.from({ length: R }, (_, r) => ({
      x: randomBf16(new Rng(r), 4, 256),
      topkIdx: i32([4, 2], [0, 7, 1, 6, 2, 5, 3, 4]),
      topkWeights: randomWeights(new Rng(r), 4, 2),
    }));
    await onAllRanks(buffers, async (b, r) => {
      sizes[r]!.length = 0;
      const d = await b.dispatch(inputs[r]!);
      await b.combine({ x: d.recvX, handle: d.handle, topkWeights: d.recvTopkWeights! });
    });
    const normal = Math.max(...sizes[0]!);
    await onAllRanks(buffers, async (b, r) => {
      sizes[r]!.length = 0;
      const d = b.lowLatencyDispatch(inputs[r]!);
      await b.lowLatencyCombine({ ...inputs[r]!, x: d.recvX, handle: d.handle }).event.wait();
    });
    const lowLatency = Math.max(...sizes[0]!);
    const headers = R * 4096;
    assert.ok(normal <= hint.normalBytes + headers, `normal: used ${normal}, hint ${hint.normalBytes}`);
    assert.ok(
      lowLatency <= hint.lowLatencyBytes + headers,
      `low-latency: used ${lowLatency}, hint ${hint.lowLatencyBytes}`,
    );
    await destroyWorld(buffers);

    const normalOnly = await createWorld(R, { ...opts, mode: 'normal' });
    assert.equal(normalOnly[0]!.sizeHint().lowLatencyBytes, 0);
    assert.equal(normalOnly[0]!.sizeHint().normalBytes, hint.normalBytes);
    await destroyWorld(normalOnly);
    const llOnly = await createWorld(R, { ...opts, mode: 'low-latency' });
    assert.equal(llOnly[0]!.sizeHint().normalBytes, 0);
    await destroyWorld(llOnly);
  });
});

describe('destroy', () => {
  it('waits for work in flight and is idempotent', async () => {
    const inputs = makeInputs(9);
    const buffers = await createWorld(R, OPTIONS);
    const lls = buffers.map((b, r) => b.lowLatencyDispatch(inputs[r]!));
    const destroyed = buffers.map((b) => b.destroy());
    assert.equal(buffers[0]!.destroy(), destroyed[0]);
    await Promise.all(destroyed);
    for (const ll of lls) assert.ok(ll.event.query(), 'work finished before destroy resolved');
  });

  it('cleanLowLatencyBuffer keeps a low-latency buffer working', async () => {
    const inputs = makeInputs(10);
    const buffers = await createWorld(R, { ...OPTIONS, mode: 'low-latency' });
    const out = await onAllRanks(buffers, async (b, r) => {
      b.cleanLowLatencyBuffer();
      const d = b.lowLatencyDispatch(inputs[r]!);
      await d.event.wait();
      return d;
    });
    assertRecvX(out, expectedLowLatency(inputs));
    await destroyWorld(buffers);
  });
});
