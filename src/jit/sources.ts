// Kernel sources live in the package's kernels/ folder. A source is read together with every header it
// includes by quoted name (recursively), so the cache key covers all of it and NVRTC needs no -I path.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ValidationError } from '../errors.ts';

/** Absolute path of the kernels/ folder (TSEP_KERNELS_DIR overrides it, for development). */
export function kernelsDir(): string {
  if (process.env.TSEP_KERNELS_DIR) return process.env.TSEP_KERNELS_DIR;
  // src/jit/ and dist/jit/ are both two levels below the package root.
  return join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'kernels');
}

export interface KernelSource {
  name: string;
  source: string;
  /** Included headers by include name. */
  headers: Record<string, string>;
}

const INCLUDE = /^\s*#\s*include\s+"([^"]+)"/gm;

/** Reads `file` (relative to kernels/) and the headers it includes with quotes. */
export function readKernelSource(file: string, dir = kernelsDir()): KernelSource {
  const read = (name: string): string => {
    try {
      return readFileSync(join(dir, name), 'utf8');
    } catch {
      throw new ValidationError('kernel source', `"${name}"`, `a file in ${dir}`);
    }
  };
  const source = read(file);
  const headers: Record<string, string> = {};
  const pending = [...source.matchAll(INCLUDE)].map((m) => m[1]!);
  while (pending.length > 0) {
    const h = pending.pop()!;
    if (h in headers) continue;
    headers[h] = read(h);
    for (const m of headers[h].matchAll(INCLUDE)) pending.push(m[1]!);
  }
  return { name: file, source, headers };
}
