// The TCP store in one process: a real server and real clients over loopback.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { encodeFrame, FrameDecoder } from '../../src/dist/frame.ts';
import { StoreClient, StoreServer } from '../../src/dist/store.ts';
import { DisposedError, RendezvousError, ValidationError } from '../../src/errors.ts';
import { freePort } from './helpers/launch.ts';

let server: StoreServer;
const clients: StoreClient[] = [];

async function client(timeoutMs = 2000): Promise<StoreClient> {
  const c = await StoreClient.connect('127.0.0.1', server.port, { timeoutMs });
  clients.push(c);
  return c;
}

before(async () => {
  server = await StoreServer.listen();
});

after(async () => {
  for (const c of clients) await c.close();
  await server.close();
});

const text = (b: Uint8Array): string => new TextDecoder().decode(b);

test('set then get returns the bytes, as a plain Uint8Array', async () => {
  const a = await client();
  const b = await client();
  const value = randomBytes(1000);
  await a.set('plain', value);
  const got = await b.get('plain');
  assert.equal(Object.getPrototypeOf(got), Uint8Array.prototype);
  assert.deepEqual(Buffer.from(got), value);
  await a.set('plain', 'replaced');
  assert.equal(text(await b.get('plain')), 'replaced');
});

test('get blocks until another client sets the key', async () => {
  const a = await client();
  const b = await client();
  const pending = b.get('later');
  let settled = false;
  void pending.then(() => {
    settled = true;
  });
  await sleep(100);
  assert.equal(settled, false);
  await a.set('later', 'now');
  assert.equal(text(await pending), 'now');
});

test('get times out with a RendezvousError naming the key, and the client stays usable', async () => {
  const a = await client();
  const started = performance.now();
  const err = await a.get('never-set', { timeoutMs: 200 }).catch((e: unknown) => e);
  assert.ok(err instanceof RendezvousError);
  assert.equal(err.code, 'TSEP_RENDEZVOUS_ERROR');
  assert.equal(err.key, 'never-set');
  assert.match(err.message, /get of key "never-set" timed out after 0.2 s/);
  assert.ok(performance.now() - started >= 190);
  // The cancelled wait must not answer a later request, nor linger on the server.
  await a.set('never-set', 'late');
  assert.equal(text(await a.get('never-set')), 'late');
});

test('16 MiB values round-trip intact, several at once', async () => {
  const a = await client(20_000);
  const b = await client(20_000);
  const values = [randomBytes(16 * 1024 * 1024), randomBytes(16 * 1024 * 1024 + 13), randomBytes(3)];
  await Promise.all(values.map((v, i) => a.set(`big/${i}`, v)));
  const got = await Promise.all(values.map((_, i) => b.get(`big/${i}`)));
  for (let i = 0; i < values.length; i++) assert.ok(Buffer.from(got[i]!).equals(values[i]!), `value ${i}`);
  await Promise.all(values.map((_, i) => a.delete(`big/${i}`)));
});

test('add is atomic across clients and returns the new value', async () => {
  const cs = await Promise.all([client(), client(), client()]);
  const results = await Promise.all(cs.flatMap((c) => Array.from({ length: 50 }, () => c.add('count', 2))));
  assert.deepEqual(
    results.sort((x, y) => x - y),
    Array.from({ length: 150 }, (_, i) => 2 * (i + 1)),
  );
  assert.equal(text(await cs[0]!.get('count')), '300');
  assert.equal(await cs[1]!.add('count', -301), -1);
  assert.equal(await cs[1]!.add('fresh-counter'), 1);
});

test('add on a value that is not an integer is a ValidationError', async () => {
  const a = await client();
  await a.set('words', 'not a number');
  await assert.rejects(
    a.add('words', 1),
    (e: unknown) => e instanceof ValidationError && /words/.test(e.message),
  );
  await assert.rejects(a.add('words', 0.5), ValidationError);
});

test('wait resolves only once every key exists; check never waits', async () => {
  const a = await client();
  const b = await client();
  assert.deepEqual(await a.check(['w/1', 'w/2']), [false, false]);
  let done = false;
  const waiting = a.wait(['w/1', 'w/2']).then(() => {
    done = true;
  });
  await b.set('w/1', '');
  await sleep(50);
  assert.equal(done, false);
  assert.deepEqual(await a.check(['w/1', 'w/2']), [true, false]);
  await b.set('w/2', '');
  await waiting;
  assert.equal(done, true);
  const err = await a.wait(['w/1', 'w/missing'], { timeoutMs: 100 }).catch((e: unknown) => e);
  assert.ok(err instanceof RendezvousError);
  assert.match(err.message, /w\/missing/);
});

test('delete reports whether the key existed', async () => {
  const a = await client();
  await a.set('gone-soon', 'x');
  assert.equal(await a.delete('gone-soon'), true);
  assert.equal(await a.delete('gone-soon'), false);
  assert.deepEqual(await a.check(['gone-soon']), [false]);
});

test('compareAndSet swaps only on a match; undefined expects an absent key', async () => {
  const a = await client();
  const first = await a.compareAndSet('cas', undefined, 'one');
  assert.equal(first.swapped, true);
  assert.equal(text(first.value!), 'one');
  const again = await a.compareAndSet('cas', undefined, 'two');
  assert.equal(again.swapped, false);
  assert.equal(text(again.value!), 'one');
  const wrong = await a.compareAndSet('cas', 'nope', 'two');
  assert.equal(wrong.swapped, false);
  assert.equal(text(wrong.value!), 'one');
  const right = await a.compareAndSet('cas', 'one', 'two');
  assert.equal(right.swapped, true);
  assert.equal(text(right.value!), 'two');
  const absent = await a.compareAndSet('cas-absent', 'x', 'y');
  assert.deepEqual(absent, { swapped: false, value: undefined });
});

test('compareAndSet wakes a get waiting for the key', async () => {
  const a = await client();
  const b = await client();
  const pending = b.get('cas-wake');
  await a.compareAndSet('cas-wake', undefined, 'woken');
  assert.equal(text(await pending), 'woken');
});

test('connect retries until the server comes up', async () => {
  const port = await freePort();
  const connecting = StoreClient.connect('127.0.0.1', port, { timeoutMs: 3000 });
  await sleep(300);
  const late = await StoreServer.listen({ port });
  const c = await connecting;
  await c.set('k', 'v');
  assert.equal(text(await c.get('k')), 'v');
  await c.close();
  await late.close();
});

test('connect gives up after its timeout with a RendezvousError', async () => {
  const port = await freePort();
  const started = performance.now();
  await assert.rejects(
    StoreClient.connect('127.0.0.1', port, { timeoutMs: 300 }),
    (e: unknown) =>
      e instanceof RendezvousError && new RegExp(`127\\.0\\.0\\.1:${port} within 0.3 s`).test(e.message),
  );
  assert.ok(performance.now() - started < 1500);
});

test('losing the server fails pending and later operations with RendezvousError', async () => {
  const own = await StoreServer.listen();
  const c = await StoreClient.connect('127.0.0.1', own.port, { timeoutMs: 5000 });
  const pending = c.get('never');
  await own.close();
  await assert.rejects(
    pending,
    (e: unknown) => e instanceof RendezvousError && /Lost the connection/.test(e.message),
  );
  await assert.rejects(c.set('x', 'y'), RendezvousError);
  await c.close();
});

test('a closed client throws DisposedError', async () => {
  const c = await client();
  await c.close();
  await assert.rejects(c.get('x'), DisposedError);
});

test('hosting the store on a taken port is a RendezvousError', async () => {
  await assert.rejects(
    StoreServer.listen({ port: server.port }),
    (e: unknown) => e instanceof RendezvousError && /EADDRINUSE/.test(e.message),
  );
});

test('the server parks no request after its client disconnects', async () => {
  const own = await StoreServer.listen();
  const c = await StoreClient.connect('127.0.0.1', own.port, { timeoutMs: 5000 });
  const pending = c.get('never').catch(() => {});
  await sleep(50);
  await c.close();
  await pending;
  assert.equal(await own.whenIdle(1000), true);
  assert.equal(own.connectionCount, 0);
  await own.close();
});

test('frames survive arbitrary splitting', () => {
  const big = randomBytes(70_000);
  const frames = [
    encodeFrame(1, 7, [Uint8Array.of(1, 2, 3), new Uint8Array(0)]),
    encodeFrame(2, 0xffffffff, []),
    encodeFrame(3, 9, [big]),
  ];
  const stream = Buffer.concat(frames);
  for (const step of [1, 3, 13, 4096, stream.length]) {
    const decoder = new FrameDecoder();
    const out = [];
    for (let at = 0; at < stream.length; at += step)
      out.push(...decoder.push(stream.subarray(at, at + step)));
    assert.equal(out.length, 3, `step ${step}`);
    assert.deepEqual(
      out.map((f) => [f.tag, f.id, f.fields.length]),
      [
        [1, 7, 2],
        [2, 0xffffffff, 0],
        [3, 9, 1],
      ],
    );
    assert.deepEqual([...out[0]!.fields[0]!], [1, 2, 3]);
    assert.ok(Buffer.from(out[2]!.fields[0]!).equals(big));
  }
  assert.throws(() => new FrameDecoder().push(Buffer.from([0xff, 0xff, 0xff, 0xff])), RangeError);
});
