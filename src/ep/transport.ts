// Which transport the GPU backend uses. Pure decision logic (unit-tested); the facts come from the GPUs
// and the group (ep/gpu/transport-probe.ts) and `tsep doctor` prints the same decision.

import { ValidationError } from '../errors.ts';
import type { ChosenTransport, TransportKind } from './types.ts';

export interface TransportFacts {
  /** Ranks in the job and on this host (the `ranksPerHost` option: a host may be virtual). */
  ranks: number;
  localRanks: number;
  /** Every pair of the host's ranks' GPUs can access each other directly (NVLink or PCIe P2P). */
  peerAccess: boolean;
  /** An NVSHMEM install was found on every rank (transport 'nvshmem'); absent means no. */
  nvshmem?: boolean;
  /** Two ranks use one GPU (named: "ranks 0 and 2 share GPU … on host …"); absent when each has its own. */
  sharedGpu?: string;
}

export interface TransportChoice {
  transport: ChosenTransport;
  reason: string;
}

/** The transport for `requested` given the facts; 'nvlink' that cannot work is a ValidationError. */
export function chooseTransport(requested: TransportKind, f: TransportFacts): TransportChoice {
  const oneHost = f.ranks === f.localRanks;
  const why = !oneHost
    ? `the ${f.ranks} ranks span several hosts (${f.localRanks} on this one)`
    : !f.peerAccess
      ? 'not every pair of the GPUs has peer access'
      : undefined;
  if (requested === 'nccl') return ncclOnOwnGpus(requested, f, "transport 'nccl' was requested");
  if (requested === 'nvshmem') {
    const problem = !f.nvshmem
      ? 'no NVSHMEM install was found on every rank (set TSEP_NVSHMEM_HOME, or pip install nvidia-nvshmem-cu13)'
      : !f.peerAccess
        ? "not every pair of a host's GPUs has peer access (NVLink carries the traffic inside a host)"
        : undefined;
    if (problem !== undefined) {
      throw new ValidationError(
        'transport',
        "'nvshmem'",
        `NVSHMEM between hosts, but ${problem}; use 'nccl'`,
      );
    }
    const hosts = f.ranks / f.localRanks;
    return {
      transport: 'nvshmem',
      reason: `transport 'nvshmem' was requested: NVLink inside each of ${hosts} host(s) of ${f.localRanks} ranks, NVSHMEM between them`,
    };
  }
  if (requested === 'nvlink') {
    if (why !== undefined) {
      throw new ValidationError(
        'transport',
        "'nvlink'",
        `all ranks on one host with peer access between their GPUs, but ${why}; use 'nccl' or 'auto'`,
      );
    }
    return { transport: 'nvlink', reason: "transport 'nvlink' was requested" };
  }
  return why === undefined
    ? { transport: 'nvlink', reason: `all ${f.ranks} ranks are on one host and their GPUs have peer access` }
    : ncclOnOwnGpus(requested, f, why);
}

/** NCCL refuses two ranks on one GPU (its communicator fails to form): say so before it does. */
function ncclOnOwnGpus(requested: TransportKind, f: TransportFacts, reason: string): TransportChoice {
  if (f.sharedGpu !== undefined) {
    throw new ValidationError(
      'transport',
      requested === 'nccl' ? "'nccl'" : `'${requested}', which chose NCCL because ${reason}`,
      `one GPU per rank for NCCL, but ${f.sharedGpu}; run one rank per GPU, or use ` +
        (f.ranks === f.localRanks
          ? "'nvlink'"
          : "'nvshmem' (NVLink inside each host, NVSHMEM between hosts)"),
    );
  }
  return { transport: 'nccl', reason };
}
