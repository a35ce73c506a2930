// Shared by the GPU tests: whether a GPU is usable here, and why not. Tests pass `{ skip: gpuSkip }` so a
// machine without a GPU reports a skip with the reason, never a pass.

import { Device } from '../../src/device/context.ts';

let detail = '';

function probe(): string | false {
  try {
    const n = Device.count();
    return n > 0 ? false : 'no GPU is visible (cuDeviceGetCount returned 0; check CUDA_VISIBLE_DEVICES)';
  } catch (e) {
    // One line per test: the first line, how many places were searched and the hint; the whole message once.
    const lines = (e as Error).message.split('\n');
    const searched = lines.filter((l) => l.startsWith('  - ')).length;
    const hint = lines.length > 1 && !lines.at(-1)!.startsWith('  - ') ? ` ${lines.at(-1)}` : '';
    detail = lines.map((l) => `#   ${l}`).join('\n');
    const first = lines[0]!.replace(/\.?\s*Searched:$/, '');
    return `no usable GPU: ${first}${searched ? ` (searched ${searched} places; tsep doctor lists them)` : ''}.${hint}`;
  }
}

/** False when a GPU is usable, else the reason to skip. */
export const gpuSkip: string | false = probe();

if (gpuSkip) process.stdout.write(`# GPU tests skipped: ${gpuSkip}\n${detail ? `${detail}\n` : ''}`);

/** A seeded generator (mulberry32); the seed is printed so a failure can be replayed with TSEP_TEST_SEED. */
export function seededRandom(label: string): () => number {
  let a = Number(process.env.TSEP_TEST_SEED ?? Math.floor(Math.random() * 2 ** 31)) >>> 0;
  process.stdout.write(`# ${label}: seed ${a}\n`);
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
