// A world of simulated ranks (LocalGroup) each holding an EpBuffer, driven concurrently.

import assert from 'node:assert/strict';
import { LocalGroup } from '../../../src/dist/local-group.ts';
import { EpBuffer } from '../../../src/ep/buffer.ts';
import type { EpBufferOptions } from '../../../src/ep/types.ts';
import { RendezvousError } from '../../../src/errors.ts';

export async function createWorld(numRanks: number, options: EpBufferOptions): Promise<EpBuffer[]> {
  const groups = LocalGroup.create(numRanks);
  return Promise.all(groups.map((g) => EpBuffer.create(g, options)));
}

/** Runs `body` on every rank at once and returns the per-rank results. */
export function onAllRanks<T>(
  buffers: readonly EpBuffer[],
  body: (buffer: EpBuffer, rank: number) => T | Promise<T>,
): Promise<T[]> {
  return Promise.all(buffers.map((b, r) => body(b, r)));
}

export async function destroyWorld(buffers: readonly EpBuffer[]): Promise<void> {
  await Promise.all(buffers.map((b) => b.destroy()));
}

/** `reason` (a peer's failed call) is a RendezvousError naming rank `failed` as the one that failed first. */
export function assertNamesFailedRank(reason: unknown, failed: number, where: string): RendezvousError {
  assert.ok(reason instanceof RendezvousError, `${where}: ${String(reason)}`);
  assert.deepEqual(reason.missingRanks, [failed]);
  return reason;
}
