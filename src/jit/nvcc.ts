// The nvcc fallback, used when NVRTC cannot be loaded but a CUDA toolkit is installed.

import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CompileError } from '../errors.ts';
import type { KernelSource } from './sources.ts';

const run = promisify(execFile);

export async function nvccVersion(nvcc = 'nvcc'): Promise<string | undefined> {
  try {
    const { stdout } = await run(nvcc, ['--version']);
    return stdout.trim().split('\n').pop();
  } catch {
    return undefined;
  }
}

/** Compiles with nvcc to a cubin; `options` are NVRTC-style and mostly shared with nvcc. */
export async function nvccCompile(
  src: KernelSource,
  options: readonly string[],
  arch: string,
): Promise<Uint8Array> {
  const dir = mkdtempSync(join(tmpdir(), 'tsep-nvcc-'));
  try {
    for (const [name, text] of Object.entries(src.headers)) writeFileSync(join(dir, name), text);
    const file = join(dir, 'kernel.cu');
    writeFileSync(file, src.source);
    const out = join(dir, 'kernel.cubin');
    const cc = arch.replace('sm_', '');
    const args = [
      '-cubin',
      `-gencode=arch=compute_${cc},code=sm_${cc}`,
      ...options.filter((o) => !o.startsWith('--gpu-architecture')),
      '-o',
      out,
      file,
    ];
    try {
      await run('nvcc', args);
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new CompileError(`${src.name} with nvcc`, err.stderr || err.message);
    }
    return new Uint8Array(readFileSync(out));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
