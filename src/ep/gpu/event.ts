// The GPU backend's EpEvent: a CUDA event recorded on the communication stream after a call's work.

import type { Stream } from '../../device/stream.ts';
import { Event } from '../../device/stream.ts';
import type { EpEvent } from '../types.ts';

export class GpuEvent implements EpEvent {
  /** The CUDA event; other streams can wait on it with `stream.waitEvent(event.cuda)`. */
  readonly cuda: Event;
  private readonly after: Promise<void> | undefined;

  /** Records a new event on `stream`; `after` is host work (e.g. a counts read) the event also covers. */
  constructor(stream: Stream, after?: Promise<void>) {
    this.cuda = Event.create(stream.device).record(stream);
    this.after = after;
  }

  query(): boolean {
    return this.cuda.query();
  }

  async wait(): Promise<void> {
    await this.after;
    await this.cuda.synchronize();
  }

  /** Makes `stream` wait for this event on the device (no host wait). */
  streamWait(stream: Stream): void {
    stream.waitEvent(this.cuda);
  }
}
