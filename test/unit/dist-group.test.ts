// StoreGroup and initProcessGroup in one process: each rank is an async task with its own store client.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { initProcessGroup } from '../../src/dist/init.ts';
import { StoreClient, StoreServer } from '../../src/dist/store.ts';
import { StoreGroup } from '../../src/dist/store-group.ts';
import { DisposedError, RendezvousError, ValidationError } from '../../src/errors.ts';
import { freePort } from './helpers/launch.ts';

let server: StoreServer;

before(async () => {
  server = await StoreServer.listen();
});

after(async () => {
  await server.close();
});

/** Joins `size` ranks on the shared server (each with its own connection). */
async function world(size: number, timeoutMs = 2000): Promise<StoreGroup[]> {
  const stores = await Promise.all(
    Array.from({ length: size }, () => StoreClient.connect('127.0.0.1', server.port, { timeoutMs })),
  );
  return Promise.all(
    stores.map((store, rank) => StoreGroup.join(store, { rank, size, localRank: rank, localSize: size })),
  );
}

async function destroyAll(groups: StoreGroup[]): Promise<void> {
  await Promise.all(groups.map((g) => g.destroy()));
}

test('allGather, broadcast and barrier give every rank the right values, call after call', async () => {
  const groups = await world(4);
  const payloads = groups.map((_, r) => randomBytes(r === 2 ? 2 * 1024 * 1024 : 17 * r));
  for (let round = 0; round < 3; round++) {
    const gathered = await Promise.all(groups.map((g) => g.allGather(payloads[(g.rank + round) % 4]!)));
    for (const got of gathered) {
      assert.deepEqual(
        got.map((b) => Buffer.from(b)),
        groups.map((_, r) => payloads[(r + round) % 4]),
      );
    }
    const root = round % 4;
    const sent = await Promise.all(
      groups.map((g) => g.broadcast(g.rank === root ? payloads[root] : undefined, root)),
    );
    for (const got of sent) assert.ok(Buffer.from(got).equals(payloads[root]!));
    await Promise.all(groups.map((g) => g.barrier()));
  }
  // Every collective deleted its keys; only the join counter remains.
  assert.equal(server.keyCount, 1);
  assert.equal(new TextDecoder().decode(await groups[0]!.store.get('tsep/pg/4/joins')), '4');
  await destroyAll(groups);
});

test('returned values are copies: mutating the input afterwards changes nothing', async () => {
  const groups = await world(2);
  const inputs = groups.map(() => Uint8Array.of(1, 2, 3));
  const results = await Promise.all(groups.map((g) => g.allGather(inputs[g.rank]!)));
  inputs[0]![0] = 99;
  assert.deepEqual(results[0]![0], Uint8Array.of(1, 2, 3));
  assert.deepEqual(results[1]![0], Uint8Array.of(1, 2, 3));
  await destroyAll(groups);
});

test('a barrier holds until the last rank arrives', async () => {
  const groups = await world(3);
  const arrived: number[] = [];
  const left: number[] = [];
  await Promise.all(
    groups.map(async (g) => {
      if (g.rank === 1) await sleep(200);
      arrived.push(g.rank);
      await g.barrier();
      left.push(arrived.length);
    }),
  );
  assert.deepEqual(left, [3, 3, 3]);
  await destroyAll(groups);
});

test('a rank that never arrives is named in missingRanks after the timeout', async () => {
  const stores = await Promise.all([0, 1, 2].map(() => StoreClient.connect('127.0.0.1', server.port)));
  const groups = stores.map(
    (store, rank) =>
      new StoreGroup(store, {
        rank,
        size: 3,
        localRank: rank,
        localSize: 3,
        timeoutMs: 300,
        namespace: 'missing',
      }),
  );
  const started = performance.now();
  const errors = await Promise.all(groups.slice(0, 2).map((g) => g.barrier().catch((e: unknown) => e)));
  assert.ok(performance.now() - started < 2000);
  for (const err of errors) {
    assert.ok(err instanceof RendezvousError);
    assert.deepEqual(err.missingRanks, [2]);
    assert.equal(err.key, 'missing/0/barrier/2');
    assert.match(err.message, /barrier on rank \d timed out after 0.3 s: rank 2 never arrived/);
  }
  // Broadcast from the absent rank: the root is what is missing.
  const bcast = await groups[0]!.broadcast(undefined, 2).catch((e: unknown) => e);
  assert.ok(bcast instanceof RendezvousError);
  assert.deepEqual(bcast.missingRanks, [2]);
  await destroyAll(groups);
});

test('ranks calling different collectives time out instead of mixing', async () => {
  const stores = await Promise.all([0, 1].map(() => StoreClient.connect('127.0.0.1', server.port)));
  const [a, b] = stores.map(
    (store, rank) =>
      new StoreGroup(store, {
        rank,
        size: 2,
        localRank: rank,
        localSize: 2,
        timeoutMs: 300,
        namespace: 'mixed',
      }),
  );
  const [ea, eb] = await Promise.all([
    a!.barrier().catch((e: unknown) => e),
    b!.allGather(Uint8Array.of(1)).catch((e: unknown) => e),
  ]);
  assert.ok(ea instanceof RendezvousError && eb instanceof RendezvousError);
  assert.deepEqual(ea.missingRanks, [1]);
  assert.deepEqual(eb.missingRanks, [0]);
  await destroyAll([a!, b!]);
});

test('a store that goes away fails a collective with the reason, not with invented missing ranks', async () => {
  const own = await StoreServer.listen();
  const store = await StoreClient.connect('127.0.0.1', own.port, { timeoutMs: 2000 });
  const group = new StoreGroup(store, { rank: 0, size: 2, localRank: 0, localSize: 2, namespace: 'lost' });
  const pending = group.barrier().catch((e: unknown) => e);
  await sleep(50);
  await own.close();
  const err = await pending;
  assert.ok(err instanceof RendezvousError);
  assert.deepEqual(err.missingRanks, []);
  assert.match(err.message, /^barrier on rank 0 failed: Lost the connection to the TCP store/);
  await group.destroy();
});

test('successive joins on one store get separate namespaces', async () => {
  const first = await world(2);
  await destroyAll(first);
  const second = await world(2);
  const got = await Promise.all(second.map((g) => g.allGather(Uint8Array.of(g.rank))));
  assert.deepEqual(got[0], [Uint8Array.of(0), Uint8Array.of(1)]);
  await destroyAll(second);
});

test('bad arguments and use after destroy', async () => {
  const [g] = await world(1);
  await assert.rejects(g!.broadcast(undefined, 1), ValidationError);
  assert.deepEqual(await g!.allGather(Uint8Array.of(7)), [Uint8Array.of(7)]);
  await g!.destroy();
  await assert.rejects(g!.barrier(), DisposedError);
  assert.throws(
    () => new StoreGroup(g!.store, { rank: 2, size: 2, localRank: 0, localSize: 1, namespace: 'x' }),
    ValidationError,
  );
});

function rankEnv(rank: number, size: number, port: number): Record<string, string> {
  return {
    RANK: String(rank),
    WORLD_SIZE: String(size),
    LOCAL_RANK: String(rank),
    LOCAL_WORLD_SIZE: String(size),
    MASTER_ADDR: '127.0.0.1',
    MASTER_PORT: String(port),
  };
}

test('initProcessGroup without a launcher: rank 0 hosts the store and outlives the others', async () => {
  const port = await freePort();
  // Rank 2 starts first; it must wait for rank 0's server.
  const late = initProcessGroup({ env: rankEnv(2, 3, port), timeoutMs: 3000 });
  await sleep(100);
  const groups = await Promise.all([
    initProcessGroup({ env: rankEnv(0, 3, port), timeoutMs: 3000 }),
    initProcessGroup({ env: rankEnv(1, 3, port), timeoutMs: 3000 }),
    late,
  ]);
  assert.deepEqual(
    groups.map((g) => [g.rank, g.size, g.localRank, g.localSize]),
    [
      [0, 3, 0, 3],
      [1, 3, 1, 3],
      [2, 3, 2, 3],
    ],
  );
  const got = await Promise.all(groups.map((g) => g.allGather(Uint8Array.of(10 + g.rank))));
  for (const values of got)
    assert.deepEqual(values, [Uint8Array.of(10), Uint8Array.of(11), Uint8Array.of(12)]);
  // Rank 0 leaves first but keeps serving until the others have gone.
  let hostLeft = false;
  const hostDestroy = groups[0]!.destroy().then(() => {
    hostLeft = true;
  });
  await sleep(100);
  assert.equal(hostLeft, false);
  await groups[1]!.store.set('still-served', 'yes');
  assert.equal(new TextDecoder().decode(await groups[2]!.store.get('still-served')), 'yes');
  await Promise.all([groups[1]!.destroy(), groups[2]!.destroy()]);
  await hostDestroy;
  assert.equal(hostLeft, true);
});

test('initProcessGroup names the rank that never joined', async () => {
  const port = await freePort();
  const errors = await Promise.all(
    [0, 1].map((rank) =>
      initProcessGroup({ env: rankEnv(rank, 3, port), timeoutMs: 500 }).catch((e: unknown) => e),
    ),
  );
  for (const err of errors) {
    assert.ok(err instanceof RendezvousError, String(err));
    assert.deepEqual(err.missingRanks, [2]);
  }
});

test('initProcessGroup with TSEP_STORE_HOSTED=1 and nobody hosting fails to connect in time', async () => {
  const port = await freePort();
  await assert.rejects(
    initProcessGroup({ env: { ...rankEnv(0, 1, port), TSEP_STORE_HOSTED: '1' }, timeoutMs: 300 }),
    (e: unknown) => e instanceof RendezvousError && /Could not connect/.test(e.message),
  );
});
