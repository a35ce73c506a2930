// Finds and loads the NVIDIA shared libraries. Search order: an explicit env override, the plain soname
// (the dynamic linker's own search), then CUDA_HOME, /usr/local/cuda*, the system library dirs and the
// Python wheel dirs (site-packages/nvidia/*/lib), where pip-installed CUDA and NCCL live.

import { existsSync, readdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import koffi, { type LibraryHandle as KoffiLibrary } from 'koffi';
import { LibraryNotFoundError } from '../errors.ts';

export type LibraryHandle = KoffiLibrary;

// koffi runs each asynchronous call (NVRTC compiles, nvrtc.ts) on a native stack of its own, 128 KiB by
// default: NVRTC overflows that on large header sets (NVSHMEM's device headers: a segfault), so give async
// calls an ordinary thread's 8 MiB. koffi accepts this only before its first library load, and every
// library tsep loads comes through this module.
try {
  koffi.config({ ...koffi.config(), async_stack_size: 8 * 1024 * 1024 });
} catch {
  // Something outside tsep loaded a library through koffi first: keep koffi's defaults.
}

export interface LibrarySpec {
  /** Human name for messages, e.g. "libcuda (CUDA driver)". */
  name: string;
  /** Env var that names the exact file. */
  envVar: string;
  /** Sonames, most preferred first. */
  sonames: readonly string[];
  /** Directory suffixes under CUDA_HOME and /usr/local/cuda* (e.g. "lib64"). */
  cudaSubdirs: readonly string[];
  /** Python wheel package dirs under site-packages/nvidia (e.g. "cuda_nvrtc", "nccl", "cu13"). */
  wheelPackages: readonly string[];
  /** Extra absolute directories. */
  extraDirs?: readonly string[];
}

const SYSTEM_DIRS = [
  '/usr/local/nvidia/lib64',
  '/usr/lib/x86_64-linux-gnu',
  '/usr/lib64',
  '/usr/lib',
  '/lib64',
];

function listDir(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** Top-level CUDA toolkit roots: CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then /usr/local/cuda-*. */
export function cudaRoots(env: NodeJS.ProcessEnv = process.env): string[] {
  const roots: string[] = [];
  for (const v of [env.CUDA_HOME, env.CUDA_PATH]) if (v) roots.push(v);
  roots.push('/usr/local/cuda');
  for (const d of listDir('/usr/local').sort().reverse())
    if (d.startsWith('cuda-')) roots.push(join('/usr/local', d));
  return [...new Set(roots)];
}

/** Python site-packages dirs that may hold NVIDIA wheels. */
export function sitePackagesDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  const bases: string[] = [];
  if (env.VIRTUAL_ENV) bases.push(join(env.VIRTUAL_ENV, 'lib'));
  if (env.CONDA_PREFIX) bases.push(join(env.CONDA_PREFIX, 'lib'));
  bases.push(join(homedir(), '.local/lib'), '/usr/local/lib', '/usr/lib');
  for (const opt of listDir('/opt')) bases.push(join('/opt', opt, '.venv/lib'), join('/opt', opt, 'lib'));
  const dirs: string[] = [];
  for (const base of bases) {
    for (const py of listDir(base)) {
      if (!py.startsWith('python3')) continue;
      for (const kind of ['site-packages', 'dist-packages']) {
        const d = join(base, py, kind);
        if (existsSync(join(d, 'nvidia'))) dirs.push(d);
      }
    }
  }
  return [...new Set(dirs)];
}

/** Every candidate path for a library, in search order (plain sonames first, then full paths). */
export function candidatePaths(spec: LibrarySpec, env: NodeJS.ProcessEnv = process.env): string[] {
  const out: string[] = [];
  const override = env[spec.envVar];
  if (override) return [override];
  out.push(...spec.sonames);
  const dirs: string[] = [];
  for (const root of cudaRoots(env)) for (const sub of spec.cudaSubdirs) dirs.push(join(root, sub));
  dirs.push(...(spec.extraDirs ?? []), ...SYSTEM_DIRS);
  for (const site of sitePackagesDirs(env)) {
    for (const pkg of spec.wheelPackages) dirs.push(join(site, 'nvidia', pkg, 'lib'));
  }
  for (const dir of dirs) for (const so of spec.sonames) out.push(join(dir, so));
  return [...new Set(out)];
}

const loaded = new Map<string, { lib: LibraryHandle; path: string }>();

/** Loads the first candidate that opens; throws LibraryNotFoundError listing every place searched. */
export function loadLibrary(spec: LibrarySpec): { lib: LibraryHandle; path: string } {
  const cached = loaded.get(spec.name);
  if (cached) return cached;
  const candidates = candidatePaths(spec);
  const reasons: string[] = [];
  for (const path of candidates) {
    // Full paths that don't exist are skipped without asking dlopen, so the error list stays readable.
    if (path.includes('/') && !existsSync(path)) {
      reasons.push('not present');
      continue;
    }
    try {
      const lib = koffi.load(path);
      const entry = { lib, path };
      loaded.set(spec.name, entry);
      return entry;
    } catch (e) {
      reasons.push((e as Error).message.split('\n')[0] ?? 'failed to load');
    }
  }
  throw new LibraryNotFoundError(spec.name, candidates, spec.envVar, reasons);
}

export const CUDA_DRIVER: LibrarySpec = {
  name: 'libcuda (CUDA driver)',
  envVar: 'TSEP_CUDA_LIB',
  sonames: ['libcuda.so.1', 'libcuda.so'],
  cudaSubdirs: ['lib64', 'compat'],
  wheelPackages: [],
};

export const NVRTC: LibrarySpec = {
  name: 'libnvrtc (NVRTC)',
  envVar: 'TSEP_NVRTC_LIB',
  sonames: ['libnvrtc.so.13', 'libnvrtc.so.12', 'libnvrtc.so'],
  cudaSubdirs: ['lib64', 'targets/x86_64-linux/lib', 'lib'],
  wheelPackages: ['cu13', 'cuda_nvrtc', 'cu12'],
};

export const NCCL: LibrarySpec = {
  name: 'libnccl (NCCL)',
  envVar: 'TSEP_NCCL_LIB',
  sonames: ['libnccl.so.2', 'libnccl.so'],
  cudaSubdirs: ['lib64', 'targets/x86_64-linux/lib'],
  wheelPackages: ['nccl', 'cu13'],
};

/** The koffi FFI version in use. */
export function koffiVersion(): string {
  return (koffi as unknown as { version?: string }).version ?? 'unknown';
}
