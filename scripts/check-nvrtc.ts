// The run-time compile path, offline: every kernel specialization scripts/check-kernels.sh builds with nvcc,
// compiled again the way the library compiles it at run time (NVRTC through src/jit; NVSHMEM sources with
// NVSHMEM's headers and tsep's pre-included shim, relocatable, unlinked). NVRTC and nvcc differ (headers,
// language modes), so a kernel that builds with one can fail with the other; this catches that without a GPU.
//   node scripts/check-nvrtc.ts [--nvshmem] "file -DNAME=V ..." ...
// A spec's file is under kernels/ unless it names a folder; --nvshmem marks the specs after it as NVSHMEM
// device code, compiled with the headers under TSEP_NVSHMEM_HOME (headers are all it needs). Exits non-zero
// on the first failure; prints one line per spec.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { compileKernel, type Define } from '../src/jit/compile.ts';
import { compileNvshmemSource } from '../src/jit/link.ts';
import { kernelsDir, readKernelSource } from '../src/jit/sources.ts';
import { installAt } from '../src/native/nvshmem.ts';

const ARCH = 'sm_90a';
const cache = mkdtempSync(join(tmpdir(), 'tsep-nvrtc-check-'));
process.env.TSEP_CACHE_DIR = cache; // every spec really compiles
try {
  let engine = false;
  for (const spec of process.argv.slice(2)) {
    if (spec === '--nvshmem') {
      engine = true;
      continue;
    }
    const [file, ...flags] = spec.trim().split(/\s+/) as [string, ...string[]];
    const defines: Record<string, Define> = {};
    for (const f of flags) {
      const m = /^-D(\w+)=(.*)$/.exec(f);
      if (!m) throw new Error(`check-nvrtc: "${f}" in "${spec}" is not -DNAME=VALUE`);
      defines[m[1]!] = m[2]!;
    }
    const t0 = performance.now();
    let bytes: number;
    let how: string;
    if (engine) {
      const src = readKernelSource(basename(file), file.includes('/') ? dirname(file) : kernelsDir());
      const home = process.env.TSEP_NVSHMEM_HOME;
      if (!home) throw new Error('check-nvrtc: --nvshmem needs TSEP_NVSHMEM_HOME (the folder with include/)');
      bytes = (await compileNvshmemSource({ ...src, defines }, ARCH, installAt(home))).byteLength;
      how = 'NVRTC -rdc with NVSHMEM';
    } else {
      const r = await compileKernel({ file, defines, arch: ARCH });
      if (!r.compiler.startsWith('nvrtc'))
        throw new Error(`check-nvrtc: compiled with ${r.compiler}, not NVRTC`);
      bytes = r.cubin.byteLength;
      how = r.compiler;
    }
    const ms = (performance.now() - t0).toFixed(0);
    process.stdout.write(`check:nvrtc: ok ${spec.trim()} (${how}, ${bytes} B, ${ms} ms)\n`);
  }
} finally {
  rmSync(cache, { recursive: true, force: true });
}
