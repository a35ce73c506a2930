// kernels/*.cu -> cubin for the GPU's architecture. NVRTC first (nvcc when NVRTC is missing); results
// are cached on disk by content hash and in memory per process, so a kernel compiles once per machine.

import type { Device } from '../device/context.ts';
import { Module } from '../device/module.ts';
import { LibraryNotFoundError, TsepError } from '../errors.ts';
import { nvrtcCompile, nvrtcVersion } from '../native/nvrtc.ts';
import { cacheKey, readCached, writeCached } from './cache.ts';
import { nvccCompile, nvccVersion } from './nvcc.ts';
import { readKernelSource } from './sources.ts';

export type Define = string | number | boolean;

export interface CompileRequest {
  /** Source file under kernels/. */
  file: string;
  /** Preprocessor definitions (-DNAME=VALUE) that specialize the kernel. */
  defines?: Record<string, Define>;
  /** Target, e.g. "sm_90a"; defaults to the device's (see archFor). */
  arch: string;
}

export interface CompileResult {
  cubin: Uint8Array;
  key: string;
  cached: boolean;
  compiler: string;
  ms: number;
}

const stats = { compiles: 0, diskHits: 0, memoryHits: 0 };

/** Counts of real compiles and cache hits in this process. */
export function jitStats(): Readonly<typeof stats> {
  return { ...stats };
}

/** Compile target for a compute capability: the "a" variant on Hopper so wgmma/TMA/setmaxnreg are usable. */
export function archFor(cc: readonly [number, number]): string {
  const n = cc[0] * 10 + cc[1];
  return n === 90 ? 'sm_90a' : `sm_${n}`;
}

function debug(msg: string): void {
  if (process.env.TSEP_DEBUG === '1') process.stderr.write(`tsep[jit]: ${msg}\n`);
}

let compiler: { name: string; version: string } | undefined;

async function pickCompiler(): Promise<{ name: string; version: string }> {
  if (compiler) return compiler;
  try {
    const [maj, min] = nvrtcVersion();
    compiler = { name: 'nvrtc', version: `nvrtc ${maj}.${min}` };
  } catch (e) {
    if (!(e instanceof LibraryNotFoundError)) throw e;
    const v = await nvccVersion();
    if (!v) {
      throw new TsepError(
        'TSEP_LIBRARY_NOT_FOUND',
        `${e.message}\nnvcc was not found on PATH either, so kernels cannot be compiled.`,
      );
    }
    compiler = { name: 'nvcc', version: `nvcc ${v}` };
  }
  return compiler;
}

/** Shows elapsed time on a terminal while a compile runs longer than a second. */
function progress(file: string): () => void {
  if (!process.stderr.isTTY) return () => {};
  const start = Date.now();
  let shown = false;
  const timer = setInterval(() => {
    shown = true;
    process.stderr.write(
      `\rtsep: compiling ${file} for the GPU... ${((Date.now() - start) / 1000).toFixed(1)} s`,
    );
  }, 500);
  timer.unref();
  return () => {
    clearInterval(timer);
    if (shown) process.stderr.write('\r\x1b[K');
  };
}

/** `-DNAME=value` options in name order (booleans as 0/1), so equal specializations give equal cache keys. */
export function defineOptions(defines: Record<string, Define> = {}): string[] {
  return Object.entries(defines)
    .sort(([a], [b]) => (a < b ? -1 : 1))
    .map(([k, v]) => `-D${k}=${typeof v === 'boolean' ? Number(v) : v}`);
}

/** Compiles (or fetches from the disk cache) one kernel source with the given specialization. */
export async function compileKernel(req: CompileRequest): Promise<CompileResult> {
  const t0 = performance.now();
  const src = readKernelSource(req.file);
  const cc = await pickCompiler();
  const defines = defineOptions(req.defines);
  const options = [`--gpu-architecture=${req.arch}`, '-std=c++17', '-lineinfo', ...defines];
  const key = cacheKey({ ...src, options, compiler: cc.version, arch: req.arch });
  const hit = readCached(key);
  if (hit) {
    stats.diskHits++;
    debug(`cache hit ${req.file} ${defines.join(' ')} (${key.slice(0, 12)})`);
    return { cubin: hit, key, cached: true, compiler: cc.version, ms: performance.now() - t0 };
  }
  const done = progress(req.file);
  let cubin: Uint8Array;
  try {
    if (cc.name === 'nvrtc') {
      const r = await nvrtcCompile({ name: req.file, source: src.source, headers: src.headers, options });
      cubin = r.cubin;
      if (r.log.trim()) debug(`${req.file} log:\n${r.log}`);
    } else {
      cubin = await nvccCompile(src, options, req.arch);
    }
  } finally {
    done();
  }
  stats.compiles++;
  writeCached(key, cubin);
  const ms = performance.now() - t0;
  debug(
    `compiled ${req.file} ${defines.join(' ')} with ${cc.version} in ${ms.toFixed(0)} ms (${key.slice(0, 12)})`,
  );
  return { cubin, key, cached: false, compiler: cc.version, ms };
}

const modules = new Map<string, Promise<Module>>();

/**
 * The module `make` builds, once per (kind of build, device, source, specialization) in this process. A
 * failed build is not kept, so fixing the source and retrying works in the same process.
 */
export function moduleOnce(
  kind: string,
  device: Device,
  file: string,
  defines: Record<string, Define>,
  make: () => Promise<Module>,
): Promise<Module> {
  const id = `${kind}|${device.ordinal}|${file}|${JSON.stringify(Object.entries(defines).sort())}`;
  const cached = modules.get(id);
  if (cached) {
    stats.memoryHits++;
    return cached;
  }
  const m = make();
  modules.set(id, m);
  m.catch(() => modules.delete(id));
  return m;
}

/** Compiles and loads a kernel module on `device`, once per (device, source, specialization). */
export function loadKernelModule(
  device: Device,
  file: string,
  defines: Record<string, Define> = {},
): Promise<Module> {
  return moduleOnce('nvrtc', device, file, defines, () =>
    compileKernel({ file, defines, arch: archFor(device.info.computeCapability) }).then((r) =>
      Module.load(r.cubin, device),
    ),
  );
}
