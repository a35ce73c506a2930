// The facts behind the transport choice, gathered collectively: how the ranks sit on hosts (the buffer's
// `ranksPerHost`, so a machine may be split into virtual hosts), whether every pair of a host's ranks' GPUs
// has peer access, whether two ranks share a GPU (NCCL refuses that), and (for transport 'nvshmem') whether
// every rank finds NVSHMEM. Ranks may see different GPUs
// (CUDA_VISIBLE_DEVICES per rank), so GPUs are matched by PCI bus id; a peer GPU this rank cannot see
// counts as no access.

import { Device } from '../../device/context.ts';
import { gatherPlaces, sharedGpu } from '../../dist/rank-place.ts';
import { nvshmemInstall } from '../../native/nvshmem.ts';
import type { TransportFacts } from '../transport.ts';
import type { TransportKind } from '../types.ts';
import type { GpuRuntime } from './runtime.ts';

/** Collective. `requested`: the transport asked for (the same on every rank); NVSHMEM is looked for only for 'nvshmem'. */
export async function probeTransportFacts(rt: GpuRuntime, requested: TransportKind): Promise<TransportFacts> {
  const g = rt.group;
  const mine = rt.device.info.pciBusId;
  const places = await gatherPlaces(g, rt.device);
  const buses = places.map((p) => p.bus);
  const visible = Device.pciBusIds();
  const perHost = rt.options.ranksPerHost;
  const first = g.rank - (g.rank % perHost);
  let ok = true;
  for (let l = 0; l < perHost; l++) {
    const bus = buses[first + l]!;
    if (bus === mine) continue;
    const ordinal = visible.indexOf(bus);
    ok &&= ordinal >= 0 && rt.device.canAccessPeer(ordinal);
  }
  // Only transport 'nvshmem' reads this fact.
  let nvshmem = requested === 'nvshmem';
  if (nvshmem) {
    try {
      nvshmemInstall();
    } catch {
      nvshmem = false;
    }
  }
  const shared = sharedGpu(places);
  const votes = await g.allGather(Uint8Array.of((ok ? 1 : 0) | (nvshmem ? 2 : 0)));
  return {
    ranks: g.size,
    localRanks: perHost,
    peerAccess: votes.every((v) => (v[0]! & 1) === 1),
    nvshmem: votes.every((v) => (v[0]! & 2) === 2),
    ...(shared !== undefined ? { sharedGpu: shared } : {}),
  };
}
