// All communication of the CPU backend: one group.allGather per call. Calls may prepare their payload
// asynchronously (after a previous event), so exchanges are issued strictly in call order — every
// rank makes the same calls in the same order, and the n-th allGather of each rank must meet the n-th
// of the others. A rank that fails to prepare, or whose call was refused before it reached the backend
// (`refuse`), still takes part, sending an error marker, so its peers fail too instead of pairing the
// call with its next one or waiting forever. Every message names its call, so ranks that made different
// calls all fail with the same ValidationError.

import type { HostTensor } from '../device/tensor.ts';
import type { Group } from '../dist/group.ts';
import type { EpDataCall } from '../ep/types.ts';
import { RendezvousError, ValidationError } from '../errors.ts';
import { decodeMessage, encodeMessage, type WireMessage, type WireScalar } from './wire.ts';

/** What a rank contributes to one exchange, before encoding. */
export interface ExchangeParts {
  meta?: Record<string, WireScalar>;
  tensors: Record<string, HostTensor | undefined>;
}

export class Exchanger {
  private readonly group: Group;
  private lastIssued: Promise<void> = Promise.resolve();

  constructor(group: Group) {
    this.group = group;
  }

  /**
   * Contributes `payload` (when it is ready and every earlier exchange has been issued) and resolves
   * with every rank's message, indexed by rank. `what` names the call; every rank must make the same one.
   */
  exchange(what: EpDataCall, payload: ExchangeParts | Promise<ExchangeParts>): Promise<WireMessage[]> {
    const previous = this.lastIssued;
    let markIssued!: () => void;
    this.lastIssued = new Promise<void>((resolve) => {
      markIssued = resolve;
    });
    // Settle the payload at once, so a failure waiting behind earlier exchanges is never "unhandled".
    // Encoding runs before the settle, so its failure (e.g. out of memory) is this rank's marker too.
    const prepared = Promise.resolve(payload)
      .then((parts) => encodeMessage({ ...parts.meta, call: what }, parts.tensors))
      .then(
        (bytes) => ({ bytes, failure: undefined }),
        (error: unknown) => ({
          bytes: encodeMessage(
            { call: what, failed: error instanceof Error ? error.message : String(error) },
            {},
          ),
          failure: { error },
        }),
      );
    return (async () => {
      await previous;
      const { bytes, failure } = await prepared;
      let gathered: Promise<Uint8Array[]>;
      try {
        gathered = this.group.allGather(bytes);
      } finally {
        markIssued();
      }
      const messages = (await gathered).map(decodeMessage);
      if (failure) throw failure.error;
      const failed = messages.findIndex((m) => m.meta.failed !== undefined);
      if (failed >= 0) {
        throw new RendezvousError(
          `${what}: rank ${failed} failed before sending its part: ${messages[failed]!.meta.failed}`,
          {
            missingRanks: [failed],
          },
        );
      }
      // Against rank 0's call, so every rank throws the same error.
      const first = String(messages[0]!.meta.call);
      const other = messages.findIndex((m) => m.meta.call !== first);
      if (other >= 0) {
        throw new ValidationError(
          'call order',
          `${String(messages[other]!.meta.call)} on rank ${other} but ${first} on rank 0`,
          'the same EpBuffer calls in the same order on every rank',
        );
      }
      return messages;
    })();
  }

  /**
   * Takes part in the exchange of a call this rank refused (it threw before its exchange was issued), sending
   * `error`'s message as a failure marker, so the peers' same call fails with a RendezvousError naming
   * this rank and the calls after it still pair up.
   */
  refuse(what: EpDataCall, error: unknown): Promise<unknown> {
    // Settled either way (the caller already has the error): for destroy() to wait on, never "unhandled".
    return this.exchange(what, Promise.reject(error)).catch(() => undefined);
  }
}
