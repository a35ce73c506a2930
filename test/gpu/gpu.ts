// Shared by the GPU tests: whether a GPU is usable here, and why not. Tests pass `{ skip: gpuSkip }` so a
// machine without a GPU reports a skip with the reason, never a pass.

import { Device } from '../../src/device/context.ts';
import { LibraryNotFoundError } from '../../src/errors.ts';

/** Comment lines (`#   `) for the test output, as node:test prints diagnostics. */
export function indent(text: string): string {
  return text
    .trimEnd()
    .split('\n')
    .map((l) => `#   ${l}`)
    .join('\n');
}

/** Why no GPU test can run here (one line for each skip, the whole error once), or false. */
function probe(): { reason: string; detail: string } | false {
  try {
    const n = Device.count();
    return n > 0
      ? false
      : { reason: 'no GPU is visible (cuDeviceGetCount returned 0; check CUDA_VISIBLE_DEVICES)', detail: '' };
  } catch (e) {
    const message = (e as Error).message;
    if (!(e instanceof LibraryNotFoundError))
      return { reason: `no usable GPU: ${message.split('\n')[0]}`, detail: '' };
    const hint = message.slice(message.lastIndexOf('\n') + 1); // "Install it, or set …"
    const where = e.searched.length ? ` (searched ${e.searched.length} places; tsep doctor lists them)` : '';
    return { reason: `no usable GPU: Could not load ${e.library}${where}. ${hint}`, detail: indent(message) };
  }
}

const found = probe();

/** False when a GPU is usable, else the reason to skip. */
export const gpuSkip: string | false = found ? found.reason : false;

if (found)
  process.stdout.write(`# GPU tests skipped: ${found.reason}\n${found.detail ? `${found.detail}\n` : ''}`);

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
