// The CPU backend's EpEvent: it tracks a promise of work running on the event loop.

import type { EpEvent } from '../ep/types.ts';

export class CpuEvent implements EpEvent {
  private done = false;
  private readonly work: Promise<void>;

  constructor(work: Promise<void>) {
    this.work = work;
    // Marks completion either way; the second handler also keeps a failure that nobody awaits from
    // surfacing as an unhandled rejection: wait() still rejects with it.
    work.then(
      () => {
        this.done = true;
      },
      () => {
        this.done = true;
      },
    );
  }

  /** An event for work that already finished. */
  static completed(): CpuEvent {
    const event = new CpuEvent(Promise.resolve());
    event.done = true;
    return event;
  }

  query(): boolean {
    return this.done;
  }

  wait(): Promise<void> {
    return this.work;
  }
}
