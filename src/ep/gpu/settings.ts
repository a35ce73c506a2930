// Tuning knobs of the GPU normal mode read from the environment. `tsep launch` hands every rank the same
// environment, which matters: the chunk count shapes the buffers every rank maps.

import { ValidationError } from '../../errors.ts';

/** The integer in environment variable `name` (default `fallback`), checked to lie in [min, max]. */
export function intSetting(name: string, fallback: number, min: number, max: number): number {
  const raw = process.env[name];
  const v = raw === undefined || raw === '' ? fallback : Number(raw);
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new ValidationError(name, String(raw), `an integer from ${min} to ${max}`);
  }
  return v;
}
