// A world of simulated ranks (LocalGroup) each holding an EpBuffer, driven concurrently.

import { LocalGroup } from '../../../src/dist/local-group.ts';
import { EpBuffer } from '../../../src/ep/buffer.ts';
import type { EpBufferOptions } from '../../../src/ep/types.ts';

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
