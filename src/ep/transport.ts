// Which transport the GPU backend uses. Pure decision logic (unit-tested); the facts come from the GPUs
// and the group (ep/gpu/transport-probe.ts) and `tsep doctor` prints the same decision.

import { ValidationError } from '../errors.ts';
import type { TransportKind } from './types.ts';

export interface TransportFacts {
  /** Ranks in the job and on this host. */
  ranks: number;
  localRanks: number;
  /** Every pair of the host's ranks' GPUs can access each other directly (NVLink or PCIe P2P). */
  peerAccess: boolean;
}

export interface TransportChoice {
  transport: 'nvlink' | 'nccl';
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
  if (requested === 'nccl') return { transport: 'nccl', reason: "transport 'nccl' was requested" };
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
    : { transport: 'nccl', reason: why };
}
