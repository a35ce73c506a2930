// All communication of the CPU backend: one group.allGather per call. Calls may prepare their payload
// asynchronously (after a previous event), so exchanges are issued strictly in call order — every
// rank makes the same calls in the same order, and the n-th allGather of each rank must meet the n-th
// of the others. A rank that fails to prepare still takes part, sending an error marker, so its peers
// fail too instead of waiting forever.

import type { Group } from '../dist/group.ts';
import { RendezvousError } from '../errors.ts';
import { decodeMessage, encodeMessage, type WireMessage } from './wire.ts';

export class Exchanger {
  private readonly group: Group;
  private lastIssued: Promise<void> = Promise.resolve();

  constructor(group: Group) {
    this.group = group;
  }

  /**
   * Contributes `payload` (when it is ready and every earlier exchange has been issued) and resolves
   * with every rank's message, indexed by rank. `what` names the call in error messages.
   */
  exchange(what: string, payload: Uint8Array | Promise<Uint8Array>): Promise<WireMessage[]> {
    const previous = this.lastIssued;
    let markIssued!: () => void;
    this.lastIssued = new Promise<void>((resolve) => {
      markIssued = resolve;
    });
    // Settle the payload at once, so a failure waiting behind earlier exchanges is never "unhandled".
    const prepared = Promise.resolve(payload).then(
      (bytes) => ({ bytes, failure: undefined }),
      (error: unknown) => ({
        bytes: encodeMessage({ failed: error instanceof Error ? error.message : String(error) }, {}),
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
      return messages;
    })();
  }
}
