// Fresh seeds per run (Date.now()), or TSEP_TEST_SEED to replay; a failure names its seed.

import { Rng } from '../../../src/cpu/random.ts';

export const BASE_SEED = process.env.TSEP_TEST_SEED
  ? Number(process.env.TSEP_TEST_SEED) >>> 0
  : Date.now() >>> 0;

/** Runs `body` for `count` consecutive seeds from BASE_SEED; a failure's message gains its seed. */
export async function forSeeds(count: number, body: (rng: Rng, seed: number) => unknown): Promise<void> {
  for (let i = 0; i < count; i++) {
    const seed = (BASE_SEED + i) >>> 0;
    try {
      await body(new Rng(seed), seed);
    } catch (error) {
      if (error instanceof Error) {
        // Reporters print the stack, which embeds the message as it was when the error was made.
        const original = error.message;
        error.message += ` (seed ${seed}; replay with TSEP_TEST_SEED=${seed})`;
        error.stack = error.stack?.replace(original, error.message);
      }
      throw error;
    }
  }
}
