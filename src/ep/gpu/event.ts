// The GPU backend's EpEvent: a CUDA event recorded on the communication stream after a call's work.
//
// Creating a CUDA event costs microseconds, so calls record events from a ring per stream instead. Reusing
// one is safe: it is only re-recorded later on the same stream, so a holder of an old GpuEvent can at worst
// see it complete later than its own call did, never earlier. Inside a graph capture a fresh event is
// used, because the graph may be replayed on another stream.

import { Event, type Stream } from '../../device/stream.ts';
import { EpTimeoutError } from '../../errors.ts';
import type { EpEvent } from '../types.ts';

const RING = 256;
const rings = new WeakMap<Stream, { events: Event[]; next: number }>();

function nextEvent(stream: Stream): Event {
  if (stream.isCapturing()) return Event.create(stream.device);
  let ring = rings.get(stream);
  if (!ring) {
    ring = { events: [], next: 0 };
    rings.set(stream, ring);
  }
  const i = ring.next;
  ring.next = (i + 1) % RING;
  ring.events[i] ??= Event.create(stream.device);
  return ring.events[i];
}

/** Frees the ring of `stream` (call before disposing the stream). */
export function releaseEvents(stream: Stream): void {
  for (const e of rings.get(stream)?.events ?? []) e.dispose();
  rings.delete(stream);
}

export interface GpuEventOptions {
  /** Host work (e.g. a counts read) the event also covers. */
  after?: Promise<void>;
  /** Runs once the GPU work is done; throws if a kernel reported a failure (a timed-out wait). */
  check?: () => void;
  /**
   * Bounds `wait()` where no kernel bounds its own waits (NCCL transfers): after `ms` milliseconds
   * `expire()` runs (e.g. aborts the communicator, so the stream moves on) and `wait()` rejects with the
   * error it returns.
   */
  bound?: { ms: number; expire: () => EpTimeoutError };
}

export class GpuEvent implements EpEvent {
  /** The CUDA event; other streams can wait on it with `stream.waitEvent(event.cuda)`. */
  readonly cuda: Event;
  private readonly options: GpuEventOptions;

  /** Records an event on `stream` after the work enqueued so far. */
  constructor(stream: Stream, options: GpuEventOptions = {}) {
    this.cuda = nextEvent(stream).record(stream);
    this.options = options;
  }

  query(): boolean {
    return this.cuda.query();
  }

  /** Resolves when the work is done; rejects with EpTimeoutError if a kernel of the call gave up waiting. */
  async wait(): Promise<void> {
    await this.options.after;
    const bound = this.options.bound;
    try {
      await this.cuda.synchronize(bound ? { timeoutMs: bound.ms } : {});
    } catch (e) {
      if (bound && e instanceof EpTimeoutError) throw bound.expire();
      throw e;
    }
    this.options.check?.();
  }

  /** Makes `stream` wait for this event on the device (no host wait). */
  streamWait(stream: Stream): void {
    stream.waitEvent(this.cuda);
  }
}
