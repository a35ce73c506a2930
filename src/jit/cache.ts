// Content-addressed cubin cache on disk. Writes go to a unique temporary file and are renamed into place,
// so concurrent processes compiling the same kernel never see a torn file; the last rename wins and both
// files are identical anyway.

import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

export function cacheDir(): string {
  return process.env.TSEP_CACHE_DIR || join(homedir(), '.cache', 'tsep');
}

/** Key over everything that determines the cubin. */
export function cacheKey(parts: {
  source: string;
  headers: Record<string, string>;
  options: readonly string[];
  compiler: string;
  arch: string;
}): string {
  const h = createHash('sha256');
  const field = (s: string) => {
    h.update(String(s.length));
    h.update(':');
    h.update(s);
  };
  field(parts.source);
  for (const name of Object.keys(parts.headers).sort()) {
    field(name);
    field(parts.headers[name]!);
  }
  for (const o of parts.options) field(o);
  field(parts.compiler);
  field(parts.arch);
  return h.digest('hex');
}

export function cachePath(key: string): string {
  return join(cacheDir(), `${key}.cubin`);
}

export function readCached(key: string): Uint8Array | undefined {
  try {
    return new Uint8Array(readFileSync(cachePath(key)));
  } catch {
    return undefined;
  }
}

export function writeCached(key: string, cubin: Uint8Array): void {
  const dir = cacheDir();
  mkdirSync(dir, { recursive: true });
  const tmp = join(dir, `.${key}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    writeFileSync(tmp, cubin);
    renameSync(tmp, cachePath(key));
  } catch (e) {
    rmSync(tmp, { force: true });
    // An unwritable cache only costs a recompile next time; say so once, never fail the compile.
    warnOnce(
      `tsep: could not write the kernel cache in ${dir} (${(e as Error).message}); set TSEP_CACHE_DIR.`,
    );
  }
}

let warned = false;
function warnOnce(msg: string): void {
  if (warned) return;
  warned = true;
  process.emitWarning(msg);
}
