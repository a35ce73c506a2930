// The CPU backend's exchanger on its own: a rank whose message cannot be encoded still takes part (its
// peers get a RendezvousError naming it), and the exchanges after it pair up.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Exchanger } from '../../src/cpu/exchange.ts';
import type { HostTensor } from '../../src/device/tensor.ts';
import { LocalGroup } from '../../src/dist/local-group.ts';
import { assertNamesFailedRank } from './helpers/ep-world.ts';
import { i32 } from './helpers/tensors.ts';

describe('Exchanger', () => {
  it("a message that fails to encode becomes its rank's failure marker; the next exchange pairs up", async () => {
    const groups = LocalGroup.create(3);
    const ex = groups.map((g) => new Exchanger(g));
    const unencodable = {
      contiguous: () => {
        throw new Error('cannot encode');
      },
    } as unknown as HostTensor;
    const first = await Promise.allSettled(
      ex.map((e, r) => e.exchange('dispatch', { tensors: { x: r === 1 ? unencodable : i32([1], [r]) } })),
    );
    assert.match(((first[1] as PromiseRejectedResult).reason as Error).message, /cannot encode/);
    for (const r of [0, 2]) assertNamesFailedRank((first[r] as PromiseRejectedResult).reason, 1, `rank ${r}`);
    const second = await Promise.all(
      ex.map((e, r) => e.exchange('combine', { tensors: { x: i32([1], [10 + r]) } })),
    );
    for (const messages of second)
      assert.deepEqual(
        messages.map((m) => m.tensors.x!.data[0]),
        [10, 11, 12],
      );
    await Promise.all(groups.map((g) => g.destroy()));
  });
});
