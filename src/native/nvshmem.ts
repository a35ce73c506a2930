// NVSHMEM's host library through koffi, for kernels that tsep compiles at run time (issue #9 spike).
//
// An install is a folder with lib/ (libnvshmem_host.so.3, libnvshmem_device.a, the bootstrap and transport
// plugins) and include/: TSEP_NVSHMEM_HOME, else NVSHMEM_HOME, else the Python wheel nvidia-nvshmem-cu*
// (site-packages/nvidia/nvshmem). The host library and the headers/device library must come from one
// install, so the folder is found first and the .so is opened by full path (never by bare soname).
//
// Initialization: the header's nvshmem_init / nvshmemx_init_attr are static inlines around
// nvshmemi_init_thread, which lives in libnvshmem_device.a (host code that registers the *application's*
// statically linked device state), not in the .so. A process whose device code is linked at run time uses
// the exported host-only entry nvshmemx_hostlib_init_attr instead (as nvshmem4py does) and hands every
// loaded module to nvshmemx_cumodule_init, which fills that module's copy of the device state.

import { existsSync } from 'node:fs';
import { join } from 'node:path';
import koffi from 'koffi';
import { LibraryNotFoundError, NvshmemError, TsepError, ValidationError } from '../errors.ts';
import { allocNative, freeNative } from './cuda.ts';
import { sitePackagesDirs } from './loader.ts';

export const NVSHMEM_HOST_SONAME = 'libnvshmem_host.so.3';
export const NVSHMEM_HOME_ENV = 'TSEP_NVSHMEM_HOME';

/** Where one NVSHMEM install keeps what tsep needs. */
export interface NvshmemInstall {
  home: string;
  /** libnvshmem_host.so.3 (full path). */
  hostLibrary: string;
  /** libnvshmem_device.a: relocatable device code, linked into run-time-compiled kernels. */
  deviceLibrary: string;
  /** Folder with nvshmem.h, nvshmemx.h, device/, non_abi/ ... for NVRTC's -I. */
  includeDir: string;
}

/** The paths of an install at `home` (whether they exist is not checked). */
export function installAt(home: string): NvshmemInstall {
  return {
    home,
    hostLibrary: join(home, 'lib', NVSHMEM_HOST_SONAME),
    deviceLibrary: join(home, 'lib', 'libnvshmem_device.a'),
    includeDir: join(home, 'include'),
  };
}

/** Candidate install folders in search order (an explicit TSEP_NVSHMEM_HOME is the only one). */
export function nvshmemHomeCandidates(env: NodeJS.ProcessEnv = process.env): string[] {
  if (env[NVSHMEM_HOME_ENV]) return [env[NVSHMEM_HOME_ENV]];
  const out: string[] = [];
  if (env.NVSHMEM_HOME) out.push(env.NVSHMEM_HOME);
  for (const site of sitePackagesDirs(env)) out.push(join(site, 'nvidia', 'nvshmem'));
  return [...new Set(out)];
}

/**
 * Finds an NVSHMEM install that has the host library, the device library and the headers. Throws
 * LibraryNotFoundError (code TSEP_LIBRARY_NOT_FOUND) listing each folder tried and what it lacked.
 */
export function findNvshmem(env: NodeJS.ProcessEnv = process.env): NvshmemInstall {
  const homes = nvshmemHomeCandidates(env);
  const reasons: string[] = [];
  for (const home of homes) {
    const i = installAt(home);
    const missing = [i.hostLibrary, i.deviceLibrary, join(i.includeDir, 'nvshmem.h')].filter(
      (p) => !existsSync(p),
    );
    if (missing.length === 0) return i;
    reasons.push(`missing ${missing.map((p) => p.slice(home.length + 1)).join(', ')}`);
  }
  throw new LibraryNotFoundError(
    'NVSHMEM (a folder with lib/libnvshmem_host.so.3, lib/libnvshmem_device.a and include/nvshmem.h; ' +
      'e.g. pip install nvidia-nvshmem-cu13)',
    homes,
    NVSHMEM_HOME_ENV,
    reasons,
    'folder',
  );
}

// ---------------------------------------------------------------- init attribute layout
// From include/device_host/nvshmem_types.h and bootstrap_device_host/nvshmem_uniqueid.h of NVSHMEM 3.4
// (their static_asserts pin the sizes): every versioned struct starts with `int version`, which is
// (1 << 16) + sizeof(struct), as nvshmemx_init_init_attr_ver_only and NVSHMEMX_UNIQUEID_INITIALIZER set it.
//   nvshmemx_uniqueid_t     128 B: version, char internal[124]
//   nvshmemx_uniqueid_args_t 24 B: version @0, nvshmemx_uniqueid_t *id @8, myrank @16, nranks @20
//   nvshmemx_init_args_t    128 B: version @0, uid_args @8, char content[96]
//   nvshmemx_init_attr_t    144 B: version @0, void *mpi_comm @8, args @16
// so in the attribute: id pointer at 32, myrank at 40, nranks at 44 (the library's own
// nvshmemx_set_attr_uniqueid_args writes exactly those offsets; nvshmemInit checks that it agrees).
export const NVSHMEM_UNIQUE_ID_BYTES = 128;
export const NVSHMEM_INIT_ATTR_BYTES = 144;
const UNIQUEID_ARGS_BYTES = 24;
const INIT_ARGS_BYTES = 128;
const version = (bytes: number): number => (1 << 16) + bytes;
/** NVSHMEMX_INIT_WITH_UNIQUEID (host/nvshmemx_api.h). */
export const NVSHMEMX_INIT_WITH_UNIQUEID = 1 << 3;

/** A unique-id buffer with its version field set, ready for nvshmemx_get_uniqueid to fill. */
export function emptyUniqueId(): Uint8Array {
  const id = new Uint8Array(NVSHMEM_UNIQUE_ID_BYTES);
  new DataView(id.buffer).setInt32(0, version(NVSHMEM_UNIQUE_ID_BYTES), true);
  return id;
}

/** The bytes of an nvshmemx_init_attr_t for a unique-id bootstrap; `idAddress` is where the id lives. */
export function encodeInitAttr(idAddress: bigint, rank: number, nranks: number): Uint8Array {
  if (!Number.isSafeInteger(nranks) || nranks < 1)
    throw new ValidationError('NVSHMEM nranks', String(nranks), 'an integer ≥ 1');
  if (!Number.isSafeInteger(rank) || rank < 0 || rank >= nranks)
    throw new ValidationError('NVSHMEM rank', String(rank), `an integer in [0, ${nranks})`);
  const attr = new Uint8Array(NVSHMEM_INIT_ATTR_BYTES);
  const v = new DataView(attr.buffer);
  v.setInt32(0, version(NVSHMEM_INIT_ATTR_BYTES), true);
  v.setInt32(16, version(INIT_ARGS_BYTES), true);
  v.setInt32(24, version(UNIQUEID_ARGS_BYTES), true);
  v.setBigUint64(32, idAddress, true);
  v.setInt32(40, rank, true);
  v.setInt32(44, nranks, true);
  return attr;
}

// ---------------------------------------------------------------- bindings

// biome-ignore lint/suspicious/noExplicitAny: FFI boundary
type Raw = any;
let fns: Record<string, Raw> | undefined;
let install: NvshmemInstall | undefined;

/** The install in use (found once per process). */
export function nvshmemInstall(): NvshmemInstall {
  install ??= findNvshmem();
  return install;
}

function api(): Record<string, Raw> {
  if (fns) return fns;
  const i = nvshmemInstall();
  let l: ReturnType<typeof koffi.load>;
  try {
    // Opened by full path; its RPATH ($ORIGIN) lets NVSHMEM dlopen its bootstrap and transport plugins
    // from the same lib/ folder, so no LD_LIBRARY_PATH is needed.
    l = koffi.load(i.hostLibrary);
  } catch (e) {
    throw new LibraryNotFoundError(
      'libnvshmem_host (NVSHMEM)',
      [i.hostLibrary],
      NVSHMEM_HOME_ENV,
      [(e as Error).message.split('\n')[0] ?? 'failed to load'],
      'folder',
    );
  }
  // Pointers cross as uint64_t, as in cuda.ts; buffers the library reads or fills are typed arrays.
  fns = {
    getUniqueId: l.func('int nvshmemx_get_uniqueid(uint8_t *uniqueid)'),
    setAttrUniqueIdArgs: l.func(
      'int nvshmemx_set_attr_uniqueid_args(int myrank, int nranks, uint64_t uniqueid, uint8_t *attr)',
    ),
    hostlibInitAttr: l.func('int nvshmemx_hostlib_init_attr(unsigned int flags, uint8_t *attr)'),
    hostlibFinalize: l.func('void nvshmemx_hostlib_finalize()'),
    myPe: l.func('int nvshmem_my_pe()'),
    nPes: l.func('int nvshmem_n_pes()'),
    malloc: l.func('uint64_t nvshmem_malloc(size_t size)'),
    free: l.func('void nvshmem_free(uint64_t ptr)'),
    ptr: l.func('uint64_t nvshmem_ptr(uint64_t dest, int pe)'),
    barrierAll: l.func('void nvshmem_barrier_all()'),
    cumoduleInit: l.func('int nvshmemx_cumodule_init(uint64_t module)'),
    cumoduleFinalize: l.func('int nvshmemx_cumodule_finalize(uint64_t module)'),
    version: l.func('void nvshmemx_vendor_get_version_info(int *major, int *minor, int *patch)'),
  };
  return fns;
}

// nvshmemx_status (non_abi/nvshmemx_error.h).
const STATUS = [
  'NVSHMEMX_SUCCESS',
  'NVSHMEMX_ERROR_INVALID_VALUE',
  'NVSHMEMX_ERROR_OUT_OF_MEMORY',
  'NVSHMEMX_ERROR_NOT_SUPPORTED',
  'NVSHMEMX_ERROR_SYMMETRY',
  'NVSHMEMX_ERROR_GPU_NOT_SELECTED',
  'NVSHMEMX_ERROR_COLLECTIVE_LAUNCH_FAILED',
  'NVSHMEMX_ERROR_INTERNAL',
];

/** A non-zero NVSHMEM status becomes an NvshmemError (code TSEP_NVSHMEM_ERROR). */
function check(call: string, status: number, hint: string): void {
  if (status === 0) return;
  throw new NvshmemError(call, status, STATUS[status] ?? `NVSHMEM status ${status}`, 'NVSHMEM failed', hint);
}

const DEBUG_HINT = 'Run with NVSHMEM_DEBUG=WARN (or INFO) for NVSHMEM’s own account';

/** NVSHMEM version as [major, minor, patch]. */
export function nvshmemVersion(): [number, number, number] {
  const a = new Int32Array(1);
  const b = new Int32Array(1);
  const c = new Int32Array(1);
  api().version(a, b, c);
  return [a[0]!, b[0]!, c[0]!];
}

/** A fresh unique id (rank 0 makes it; every rank passes the same bytes to nvshmemInit). */
export function nvshmemGetUniqueId(): Uint8Array {
  guardMulticast();
  const id = emptyUniqueId();
  check('nvshmemx_get_uniqueid', api().getUniqueId(id), DEBUG_HINT);
  return id;
}

/**
 * NVLink multicast (NVLS) stays off on the machines tsep targets (docs/process-group.md). NVSHMEM reads
 * NVSHMEM_DISABLE_NVLS from the environment when it initializes, so it is set here when absent and any
 * other value is refused.
 */
function guardMulticast(env: NodeJS.ProcessEnv = process.env): void {
  const v = env.NVSHMEM_DISABLE_NVLS;
  if (v === undefined) env.NVSHMEM_DISABLE_NVLS = '1';
  else if (!['1', 'true', 'TRUE', 'y', 'yes'].includes(v)) {
    throw new TsepError(
      'TSEP_UNSUPPORTED',
      `NVSHMEM_DISABLE_NVLS=${v}: tsep keeps NVLink multicast off; unset it or set it to 1.`,
    );
  }
}

/**
 * Joins the NVSHMEM job as PE `rank` of `nranks` with the unique id rank 0 made. Collective and blocking:
 * returns once every PE has joined. The calling thread must have the GPU's context current (Device.get).
 */
export function nvshmemInit(rank: number, nranks: number, id: Uint8Array): void {
  if (id.byteLength !== NVSHMEM_UNIQUE_ID_BYTES) {
    throw new ValidationError('NVSHMEM unique id', `${id.byteLength} bytes`, `${NVSHMEM_UNIQUE_ID_BYTES}`);
  }
  guardMulticast();
  const f = api();
  // The attribute points at the id, so the id lives in native memory with a stable address.
  const idMem = allocNative(NVSHMEM_UNIQUE_ID_BYTES);
  try {
    const idAddress = idMem.address;
    new Uint8Array(idMem.view).set(id);
    const attr = encodeInitAttr(idAddress, rank, nranks);
    // The library's own setter must agree with the layout above; a mismatch means another NVSHMEM ABI.
    const probe = attr.slice();
    probe.fill(0, 32, 48);
    check('nvshmemx_set_attr_uniqueid_args', f.setAttrUniqueIdArgs(rank, nranks, idAddress, probe), '');
    if (Buffer.compare(probe, attr) !== 0) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `NVSHMEM ${nvshmemVersion().join('.')} lays out nvshmemx_init_attr_t differently from the 3.4 ` +
          'layout tsep encodes; use NVSHMEM 3.4 (TSEP_NVSHMEM_HOME).',
      );
    }
    check(
      'nvshmemx_hostlib_init_attr',
      f.hostlibInitAttr(NVSHMEMX_INIT_WITH_UNIQUEID, attr),
      `${DEBUG_HINT}; every rank must call it with the same unique id and nranks`,
    );
  } finally {
    freeNative(idMem.external);
  }
}

export function nvshmemMyPe(): number {
  return api().myPe() as number;
}

export function nvshmemNPes(): number {
  return api().nPes() as number;
}

/** Collective: every PE allocates the same size from the symmetric heap (NVSHMEM_SYMMETRIC_SIZE). */
export function nvshmemMalloc(bytes: number): bigint {
  if (!Number.isSafeInteger(bytes) || bytes < 1)
    throw new ValidationError('NVSHMEM allocation size', String(bytes), 'a positive integer');
  const p = BigInt(api().malloc(bytes));
  if (p === 0n) {
    throw new NvshmemError(
      'nvshmem_malloc',
      2,
      'NVSHMEMX_ERROR_OUT_OF_MEMORY',
      `no ${bytes} bytes left in the symmetric heap`,
      'Raise NVSHMEM_SYMMETRIC_SIZE (bytes, e.g. 4G) for every rank',
    );
  }
  return p;
}

/** Collective: frees a symmetric allocation on every PE. */
export function nvshmemFree(ptr: bigint): void {
  api().free(ptr);
}

/**
 * The address through which this PE's GPU loads and stores PE `pe`'s copy of the symmetric object at
 * `dest` (peer-mapped memory), or 0n when `pe` is reachable only through NVSHMEM's operations.
 */
export function nvshmemPtr(dest: bigint, pe: number): bigint {
  return BigInt(api().ptr(dest, pe));
}

/** Host barrier across all PEs; also completes the NVSHMEM operations issued before it. */
export function nvshmemBarrierAll(): void {
  api().barrierAll();
}

/** Fills a loaded module's NVSHMEM device state; required before launching its NVSHMEM kernels. */
export function nvshmemCumoduleInit(module: bigint): void {
  check('nvshmemx_cumodule_init', api().cumoduleInit(module), 'Call nvshmemInit first');
}

/** Drops a module from NVSHMEM's list; call before unloading it. */
export function nvshmemCumoduleFinalize(module: bigint): void {
  check('nvshmemx_cumodule_finalize', api().cumoduleFinalize(module), '');
}

/** Collective: leaves the NVSHMEM job and frees the symmetric heap. */
export function nvshmemFinalize(): void {
  api().hostlibFinalize();
}
