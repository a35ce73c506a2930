// Waiting for the GPU without blocking the event loop: poll a cheap query with a short, growing delay.

import { EpTimeoutError } from '../errors.ts';

export interface PollOptions {
  /** Give up after this many milliseconds (default: no limit). */
  timeoutMs?: number;
  /** What is being waited for, for the timeout message. */
  what?: string;
}

/** Resolves once `done()` returns true; spins briefly on setImmediate, then backs off to 1 ms timers. */
export async function pollUntil(done: () => boolean, options: PollOptions = {}): Promise<void> {
  if (done()) return;
  const start = performance.now();
  for (;;) {
    // For the first 20 ms, polls ride the event loop's check phase (µs apart, other events still run);
    // after that, 1 ms timers, so a long wait costs no CPU.
    const fast = performance.now() - start < 20;
    await new Promise<void>((r) => (fast ? setImmediate(r) : setTimeout(r, 1)));
    if (done()) return;
    if (options.timeoutMs !== undefined && performance.now() - start > options.timeoutMs) {
      throw new EpTimeoutError(
        `Timed out after ${Math.round(options.timeoutMs)} ms waiting for ${options.what ?? 'the GPU'}.`,
      );
    }
  }
}
