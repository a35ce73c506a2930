// Option parsers shared by the CLI's commands: commander prints an InvalidArgumentError as one line
// ("error: option '--ranks <n>' argument 'abc' is invalid. need …") with the command's usage, not a stack.

import { InvalidArgumentError } from 'commander';

/** An integer in [min, max], written in decimal digits only. */
export function integerArg(min: number, max: number): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!/^\d+$/.test(value) || n < min || n > max) {
      throw new InvalidArgumentError(`need an integer in [${min}, ${max}].`);
    }
    return n;
  };
}

/** A count (ranks, tokens, sizes): an integer in [1, 2^20]. */
export const countArg = integerArg(1, 1 << 20);

/** A positive, finite number of seconds. */
export function secondsArg(value: string): number {
  const n = Number(value);
  if (!(n > 0) || !Number.isFinite(n)) throw new InvalidArgumentError('need a positive number of seconds.');
  return n;
}
