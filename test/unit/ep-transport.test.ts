import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { chooseTransport } from '../../src/ep/transport.ts';
import { ValidationError } from '../../src/errors.ts';

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
});
