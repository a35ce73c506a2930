import assert from 'node:assert/strict';
import { hostname } from 'node:os';
import { describe, it } from 'node:test';
import type { Device } from '../../src/device/context.ts';
import { LocalGroup } from '../../src/dist/local-group.ts';
import { decodePlace, encodePlace, gatherPlaces, sharedGpu } from '../../src/dist/rank-place.ts';
import { chooseTransport } from '../../src/ep/transport.ts';
import { RendezvousError, ValidationError } from '../../src/errors.ts';

const oneHostP2p = { ranks: 4, localRanks: 4, peerAccess: true };
const oneHostNoP2p = { ranks: 4, localRanks: 4, peerAccess: false };
const twoHosts = { ranks: 8, localRanks: 4, peerAccess: true };

describe('transport selection', () => {
  it("'auto' picks NVLink only on one host with peer access everywhere", () => {
    assert.equal(chooseTransport('auto', oneHostP2p).transport, 'nvlink');
    assert.match(chooseTransport('auto', oneHostP2p).reason, /4 ranks are on one host/);
    assert.deepEqual(chooseTransport('auto', oneHostNoP2p), {
      transport: 'nccl',
      reason: 'not every pair of the GPUs has peer access',
    });
    const multi = chooseTransport('auto', twoHosts);
    assert.equal(multi.transport, 'nccl');
    assert.match(multi.reason, /span several hosts \(4 on this one\)/);
  });

  it("'nccl' is always honoured", () => {
    for (const f of [oneHostP2p, oneHostNoP2p, twoHosts])
      assert.equal(chooseTransport('nccl', f).transport, 'nccl');
  });

  it("'nvlink' is honoured where it works and refused with the reason elsewhere", () => {
    assert.equal(chooseTransport('nvlink', oneHostP2p).transport, 'nvlink');
    assert.throws(
      () => chooseTransport('nvlink', oneHostNoP2p),
      (e: unknown) =>
        e instanceof ValidationError && e.argument === 'transport' && /peer access/.test(e.message),
    );
    assert.throws(
      () => chooseTransport('nvlink', twoHosts),
      (e: unknown) => e instanceof ValidationError && /several hosts/.test(e.message),
    );
  });

  it('a single rank counts as one host with peer access to itself', () => {
    assert.equal(chooseTransport('auto', { ranks: 1, localRanks: 1, peerAccess: true }).transport, 'nvlink');
  });

  it("'nvshmem' needs NVSHMEM on every rank and peer access inside each host", () => {
    const virtualHosts = { ranks: 4, localRanks: 2, peerAccess: true, nvshmem: true };
    const c = chooseTransport('nvshmem', virtualHosts);
    assert.equal(c.transport, 'nvshmem');
    assert.match(c.reason, /2 host\(s\) of 2 ranks, NVSHMEM between them/);
    assert.throws(
      () => chooseTransport('nvshmem', { ...virtualHosts, nvshmem: false }),
      (e: unknown) => e instanceof ValidationError && /no NVSHMEM install/.test(e.message),
    );
    assert.throws(
      () => chooseTransport('nvshmem', { ...virtualHosts, peerAccess: false }),
      (e: unknown) => e instanceof ValidationError && /peer access/.test(e.message),
    );
    // 'auto' keeps NCCL across hosts until the normal mode runs over NVSHMEM too.
    assert.equal(chooseTransport('auto', virtualHosts).transport, 'nccl');
  });
  it('finds two ranks on one GPU by its UUID (the same bus id on two hosts is two GPUs)', () => {
    const places = [
      { gpu: 'u0', bus: '0000:19:00.0', host: 'a' },
      { gpu: 'u1', bus: '0000:19:00.0', host: 'b' },
      { gpu: 'u2', bus: '0000:3b:00.0', host: 'a' },
      { gpu: 'u0', bus: '0000:19:00.0', host: 'a' },
    ];
    assert.equal(sharedGpu(places), 'ranks 0 and 3 share GPU 0000:19:00.0 on host a');
    assert.equal(sharedGpu(places.slice(0, 3)), undefined);
    assert.equal(sharedGpu([]), undefined);
  });

  it('gatherPlaces gives every rank every place, by rank', async () => {
    const groups = LocalGroup.create(3);
    const gpus = ['u0', 'u1', 'u0'];
    const all = await Promise.all(
      groups.map((g) =>
        gatherPlaces(g, {
          info: { uuid: gpus[g.rank]!, pciBusId: `bus-${gpus[g.rank]}` },
        } as unknown as Device),
      ),
    );
    for (const places of all) {
      assert.deepEqual(
        places.map((p) => [p.gpu, p.bus, p.host]),
        gpus.map((u) => [u, `bus-${u}`, hostname()]),
      );
      assert.equal(sharedGpu(places), `ranks 0 and 2 share GPU bus-u0 on host ${hostname()}`);
    }
    await Promise.all(groups.map((g) => g.destroy()));
  });

  it('a rank place round-trips through its text form, a host name with newlines included', () => {
    for (const p of [
      { gpu: '0123abcd', bus: '0000:19:00.0', host: 'node-7' },
      { gpu: 'ff', bus: '0000:3b:00.0', host: 'odd\nname' },
      { gpu: '', bus: '', host: '' },
    ])
      assert.deepEqual(decodePlace(encodePlace(p)), p);
    assert.throws(
      () => decodePlace('no separators'),
      (e: unknown) => e instanceof RendezvousError && /same tsep version/.test(e.message),
    );
  });

  it('NCCL is refused, with the ranks named, where two ranks share a GPU; NVLink and NVSHMEM are not', () => {
    const shared = 'ranks 0 and 1 share GPU 0000:19:00.0 on host a';
    const isShared = (re: RegExp) => (e: unknown) =>
      e instanceof ValidationError &&
      e.argument === 'transport' &&
      e.message.includes(shared) &&
      re.test(e.message);
    assert.throws(
      () => chooseTransport('nccl', { ...oneHostP2p, sharedGpu: shared }),
      isShared(/or use 'nvlink'/),
    );
    assert.throws(
      () => chooseTransport('auto', { ...twoHosts, sharedGpu: shared }),
      isShared(/'auto', which chose NCCL because the 8 ranks span several hosts/),
    );
    assert.throws(
      () => chooseTransport('nccl', { ...twoHosts, sharedGpu: shared }),
      isShared(/or use 'nvshmem'/),
    );
    assert.equal(chooseTransport('auto', { ...oneHostP2p, sharedGpu: shared }).transport, 'nvlink');
    assert.equal(chooseTransport('nvlink', { ...oneHostP2p, sharedGpu: shared }).transport, 'nvlink');
    const vh = { ranks: 4, localRanks: 2, peerAccess: true, nvshmem: true, sharedGpu: shared };
    assert.equal(chooseTransport('nvshmem', vh).transport, 'nvshmem');
  });
});
