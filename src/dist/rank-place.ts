// Where each rank of a group runs: its GPU (UUID and PCI bus id) and its host. The transport choice reads
// it (peer access, virtual hosts) and NCCL needs it: NCCL refuses two ranks on one GPU, so the
// communicator says so first, naming the ranks.

import { hostname } from 'node:os';
import type { Device } from '../device/context.ts';
import { RendezvousError } from '../errors.ts';
import type { Group } from './group.ts';

/** Where a rank runs: its GPU's UUID and PCI bus id, and its host's name (for messages). */
export interface RankPlace {
  gpu: string;
  bus: string;
  host: string;
}

/** One line each for the UUID and the bus id (neither holds a newline); the host name is the rest. */
export function encodePlace(p: RankPlace): string {
  return `${p.gpu}\n${p.bus}\n${p.host}`;
}

export function decodePlace(text: string): RankPlace {
  const a = text.indexOf('\n');
  const b = text.indexOf('\n', a + 1);
  if (a < 0 || b < 0) {
    throw new RendezvousError(
      `A rank described its GPU as ${JSON.stringify(text)}, not "uuid\\nbus\\nhost": run the same tsep version on every rank.`,
    );
  }
  return { gpu: text.slice(0, a), bus: text.slice(a + 1, b), host: text.slice(b + 1) };
}

/** The first two ranks that run on the same GPU (same UUID), described; undefined if none do. */
export function sharedGpu(places: readonly RankPlace[]): string | undefined {
  const seen = new Map<string, number>();
  for (let r = 0; r < places.length; r++) {
    const { gpu, bus, host } = places[r]!;
    const other = seen.get(gpu);
    if (other !== undefined) return `ranks ${other} and ${r} share GPU ${bus} on host ${host}`;
    seen.set(gpu, r);
  }
  return undefined;
}

/** Collective: every rank's place, by rank (this rank's GPU is `device`). */
export async function gatherPlaces(group: Group, device: Device): Promise<RankPlace[]> {
  const mine = encodePlace({ gpu: device.info.uuid, bus: device.info.pciBusId, host: hostname() });
  return (await group.allGather(new TextEncoder().encode(mine))).map((b) =>
    decodePlace(new TextDecoder().decode(b)),
  );
}
