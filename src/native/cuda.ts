// CUDA driver API through koffi. Raw functions are bound lazily on first use; every call goes through
// `cu(...)`, which turns a non-zero CUresult into a CudaError with the call name, code, name and text.
// Pointers cross this boundary as bigint (device addresses, handles) so nothing above sees a koffi type.

import koffi, { type LibraryHandle as KoffiLibrary } from 'koffi';
import { CudaError, ValidationError } from '../errors.ts';
import { CUDA_DRIVER, loadLibrary } from './loader.ts';

// Opaque handles are declared as `void *` and handled as koffi externals internally; the layers above
// get bigint addresses. Out-parameters are typed arrays so results come back without koffi wrappers.
const DECLS = {
  cuInit: 'int cuInit(unsigned int flags)',
  cuDriverGetVersion: 'int cuDriverGetVersion(int *version)',
  cuGetErrorName: 'int cuGetErrorName(int error, _Out_ const char **str)',
  cuGetErrorString: 'int cuGetErrorString(int error, _Out_ const char **str)',
  cuDeviceGetCount: 'int cuDeviceGetCount(int *count)',
  cuDeviceGet: 'int cuDeviceGet(int *device, int ordinal)',
  cuDeviceGetName: 'int cuDeviceGetName(uint8_t *name, int len, int dev)',
  cuDeviceGetAttribute: 'int cuDeviceGetAttribute(int *pi, int attrib, int dev)',
  cuDeviceTotalMem_v2: 'int cuDeviceTotalMem_v2(uint64_t *bytes, int dev)',
  cuDeviceGetPCIBusId: 'int cuDeviceGetPCIBusId(uint8_t *pciBusId, int len, int dev)',
  cuDeviceGetUuid_v2: 'int cuDeviceGetUuid_v2(uint8_t *uuid, int dev)',
  cuDeviceCanAccessPeer: 'int cuDeviceCanAccessPeer(int *canAccessPeer, int dev, int peerDev)',
  cuDevicePrimaryCtxRetain: 'int cuDevicePrimaryCtxRetain(uint64_t *pctx, int dev)',
  cuDevicePrimaryCtxRelease_v2: 'int cuDevicePrimaryCtxRelease_v2(int dev)',
  cuCtxSetCurrent: 'int cuCtxSetCurrent(uint64_t ctx)',
  cuCtxSynchronize: 'int cuCtxSynchronize()',
  cuCtxEnablePeerAccess: 'int cuCtxEnablePeerAccess(uint64_t peerContext, unsigned int flags)',
  cuMemGetInfo_v2: 'int cuMemGetInfo_v2(uint64_t *free, uint64_t *total)',
  cuMemAlloc_v2: 'int cuMemAlloc_v2(uint64_t *dptr, size_t bytesize)',
  cuMemFree_v2: 'int cuMemFree_v2(uint64_t dptr)',
  cuMemAllocAsync: 'int cuMemAllocAsync(uint64_t *dptr, size_t bytesize, uint64_t stream)',
  cuMemFreeAsync: 'int cuMemFreeAsync(uint64_t dptr, uint64_t stream)',
  cuDeviceGetDefaultMemPool: 'int cuDeviceGetDefaultMemPool(uint64_t *pool, int dev)',
  cuMemPoolSetAttribute: 'int cuMemPoolSetAttribute(uint64_t pool, int attr, void *value)',
  cuMemPoolTrimTo: 'int cuMemPoolTrimTo(uint64_t pool, size_t minBytesToKeep)',
  cuStreamIsCapturing: 'int cuStreamIsCapturing(uint64_t stream, int *status)',
  cuMemHostAlloc: 'int cuMemHostAlloc(_Out_ void **pp, size_t bytesize, unsigned int flags)',
  cuMemFreeHost: 'int cuMemFreeHost(void *p)',
  cuMemHostGetDevicePointer_v2:
    'int cuMemHostGetDevicePointer_v2(uint64_t *pdptr, void *p, unsigned int flags)',
  cuMemsetD8Async: 'int cuMemsetD8Async(uint64_t dstDevice, uint8_t uc, size_t n, uint64_t stream)',
  cuMemsetD32Async: 'int cuMemsetD32Async(uint64_t dstDevice, unsigned int ui, size_t n, uint64_t stream)',
  cuMemcpyDtoH_v2: 'int cuMemcpyDtoH_v2(void *dst, uint64_t src, size_t bytes)',
  cuMemcpyHtoDAsync_v2:
    'int cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t bytes, uint64_t stream)',
  cuMemcpyDtoHAsync_v2: 'int cuMemcpyDtoHAsync_v2(void *dst, uint64_t src, size_t bytes, uint64_t stream)',
  cuMemcpyDtoDAsync_v2: 'int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, uint64_t stream)',
  cuStreamCreateWithPriority:
    'int cuStreamCreateWithPriority(uint64_t *stream, unsigned int flags, int priority)',
  cuStreamDestroy_v2: 'int cuStreamDestroy_v2(uint64_t stream)',
  cuStreamSynchronize: 'int cuStreamSynchronize(uint64_t stream)',
  cuStreamQuery: 'int cuStreamQuery(uint64_t stream)',
  cuStreamWaitEvent: 'int cuStreamWaitEvent(uint64_t stream, uint64_t event, unsigned int flags)',
  cuStreamBeginCapture_v2: 'int cuStreamBeginCapture_v2(uint64_t stream, int mode)',
  cuStreamEndCapture: 'int cuStreamEndCapture(uint64_t stream, uint64_t *graph)',
  cuCtxGetStreamPriorityRange: 'int cuCtxGetStreamPriorityRange(int *least, int *greatest)',
  cuEventCreate: 'int cuEventCreate(uint64_t *event, unsigned int flags)',
  cuEventRecord: 'int cuEventRecord(uint64_t event, uint64_t stream)',
  cuEventQuery: 'int cuEventQuery(uint64_t event)',
  cuEventSynchronize: 'int cuEventSynchronize(uint64_t event)',
  cuEventElapsedTime_v2: 'int cuEventElapsedTime_v2(float *ms, uint64_t start, uint64_t end)',
  cuEventDestroy_v2: 'int cuEventDestroy_v2(uint64_t event)',
  cuModuleLoadData: 'int cuModuleLoadData(uint64_t *module, const void *image)',
  cuLinkCreate_v2:
    'int cuLinkCreate_v2(unsigned int numOptions, int *options, uint64_t *optionValues, uint64_t *stateOut)',
  cuLinkAddData_v2:
    'int cuLinkAddData_v2(uint64_t state, int type, const void *data, size_t size, const char *name, unsigned int numOptions, int *options, uint64_t *optionValues)',
  cuLinkAddFile_v2:
    'int cuLinkAddFile_v2(uint64_t state, int type, const char *path, unsigned int numOptions, int *options, uint64_t *optionValues)',
  cuLinkComplete: 'int cuLinkComplete(uint64_t state, _Out_ void **cubinOut, _Out_ size_t *sizeOut)',
  cuLinkDestroy: 'int cuLinkDestroy(uint64_t state)',
  cuModuleUnload: 'int cuModuleUnload(uint64_t module)',
  cuModuleGetFunction: 'int cuModuleGetFunction(uint64_t *fn, uint64_t module, const char *name)',
  cuModuleGetGlobal_v2:
    'int cuModuleGetGlobal_v2(uint64_t *dptr, uint64_t *bytes, uint64_t module, const char *name)',
  cuFuncSetAttribute: 'int cuFuncSetAttribute(uint64_t fn, int attrib, int value)',
  cuFuncGetAttribute: 'int cuFuncGetAttribute(int *pi, int attrib, uint64_t fn)',
  cuOccupancyMaxActiveBlocksPerMultiprocessor:
    'int cuOccupancyMaxActiveBlocksPerMultiprocessor(int *numBlocks, uint64_t fn, int blockSize, size_t smem)',
  cuLaunchKernel:
    'int cuLaunchKernel(uint64_t f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by, unsigned int bz, unsigned int smem, uint64_t stream, void *params, uint64_t extra)',
  cuGraphInstantiateWithFlags:
    'int cuGraphInstantiateWithFlags(uint64_t *exec, uint64_t graph, uint64_t flags)',
  cuGraphLaunch: 'int cuGraphLaunch(uint64_t exec, uint64_t stream)',
  cuGraphExecUpdate_v2: 'int cuGraphExecUpdate_v2(uint64_t exec, uint64_t graph, uint8_t *resultInfo)',
  cuGraphExecDestroy: 'int cuGraphExecDestroy(uint64_t exec)',
  cuGraphDestroy: 'int cuGraphDestroy(uint64_t graph)',
  cuIpcGetMemHandle: 'int cuIpcGetMemHandle(uint8_t *handle, uint64_t dptr)',
  cuIpcCloseMemHandle: 'int cuIpcCloseMemHandle(uint64_t dptr)',
  cuPointerGetAttribute: 'int cuPointerGetAttribute(void *data, int attribute, uint64_t ptr)',
} as const;

type Name = keyof typeof DECLS;
// koffi's bound functions are untyped; the checked wrappers below give each use a real signature.
// biome-ignore lint/suspicious/noExplicitAny: FFI boundary
type Raw = (...args: any[]) => any;

let lib: KoffiLibrary | undefined;
let libPath = '';
const bound = new Map<Name, Raw>();
let initialized = false;

function library(): KoffiLibrary {
  if (!lib) {
    const loaded = loadLibrary(CUDA_DRIVER);
    lib = loaded.lib;
    libPath = loaded.path;
  }
  return lib;
}

/** Binds (once) and returns a raw driver function. */
export function raw(name: Name): Raw {
  let f = bound.get(name);
  if (!f) {
    f = library().func(DECLS[name]) as Raw;
    bound.set(name, f);
  }
  return f;
}

export function driverPath(): string {
  library();
  return libPath;
}

function errorText(status: number): { name: string; text: string } {
  const n: (string | null)[] = [null];
  const s: (string | null)[] = [null];
  const okName = raw('cuGetErrorName')(status, n) === 0;
  const okText = raw('cuGetErrorString')(status, s) === 0;
  return {
    name: okName && n[0] ? n[0] : `CUDA_ERROR_${status}`,
    text: okText && s[0] ? s[0] : 'unknown CUDA error',
  };
}

const HINTS: Record<number, string> = {
  2: 'The GPU is out of memory: free tensors or buffers you no longer need, or use smaller shapes',
  100: 'No CUDA-capable GPU is visible: check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)',
  101: 'The device ordinal does not exist: check CUDA_VISIBLE_DEVICES and LOCAL_RANK',
  209: 'The kernel was not compiled for this GPU: clear the kernel cache (TSEP_CACHE_DIR) and retry',
  700: 'A kernel accessed invalid memory; the CUDA context is now unusable: restart the process',
  35: 'The installed NVIDIA driver is older than this CUDA version needs: update the driver',
};

/** Throws CudaError unless `status` is CUDA_SUCCESS. */
export function check(call: string, status: number): void {
  if (status === 0) return;
  const { name, text } = errorText(status);
  throw new CudaError(call, status, name, text, HINTS[status]);
}

/** The text of a NUL-terminated C string in `buf` (all of it if there is no NUL). */
export function cString(buf: Uint8Array): string {
  const end = buf.indexOf(0);
  return Buffer.from(buf.subarray(0, end < 0 ? buf.length : end)).toString('utf8');
}

/** Calls a driver function and checks its status. */
export function cu(name: Name, ...args: unknown[]): void {
  check(name, raw(name)(...args) as number);
}

/** Initializes the driver once per process. */
export function ensureInit(): void {
  if (initialized) return;
  cu('cuInit', 0);
  initialized = true;
}

/** Driver version as [major, minor]. */
export function driverVersion(): [number, number] {
  const v = new Int32Array(1);
  cu('cuDriverGetVersion', v);
  return [Math.floor(v[0]! / 1000), (v[0]! % 1000) / 10];
}

/** Address of a koffi external pointer (used for host allocations). */
export function addressOf(ptr: unknown): bigint {
  return koffi.address(ptr);
}

/** An ArrayBuffer over native memory (pinned host allocations). */
export function viewNative(ptr: unknown, bytes: number): ArrayBuffer {
  return koffi.view(ptr, bytes);
}

/** Allocates pinned, device-mapped host memory; returns the external pointer and its address. */
export function hostAllocMapped(bytes: number): { external: unknown; address: bigint } {
  const out: unknown[] = [null];
  // CU_MEMHOSTALLOC_PORTABLE (1) | CU_MEMHOSTALLOC_DEVICEMAP (2)
  cu('cuMemHostAlloc', out, bytes, 3);
  return { external: out[0], address: koffi.address(out[0]) };
}

export function hostFree(external: unknown): void {
  cu('cuMemFreeHost', external);
}

/** Native scratch memory for kernel argument blocks: stable address, writable through an ArrayBuffer. */
export function allocNative(bytes: number): { external: unknown; address: bigint; view: ArrayBuffer } {
  const external = koffi.alloc('uint8_t', bytes);
  return { external, address: koffi.address(external), view: koffi.view(external, bytes) };
}

export function freeNative(external: unknown): void {
  koffi.free(external);
}

/** Device attributes used by tsep (CUdevice_attribute values). */
export const DEVICE_ATTR = {
  MAX_THREADS_PER_BLOCK: 1,
  MAX_SHARED_MEMORY_PER_BLOCK: 8,
  CLOCK_RATE: 13,
  MULTIPROCESSOR_COUNT: 16,
  CAN_MAP_HOST_MEMORY: 19,
  PCI_BUS_ID: 33,
  PCI_DEVICE_ID: 34,
  UNIFIED_ADDRESSING: 41,
  COMPUTE_CAPABILITY_MAJOR: 75,
  COMPUTE_CAPABILITY_MINOR: 76,
  MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 97,
  L2_CACHE_SIZE: 38,
} as const;

/** CUfunction_attribute values. */
export const FUNC_ATTR = {
  MAX_THREADS_PER_BLOCK: 0,
  SHARED_SIZE_BYTES: 1,
  NUM_REGS: 4,
  MAX_DYNAMIC_SHARED_SIZE_BYTES: 8,
} as const;

export const IPC_HANDLE_BYTES = 64;
let ipcOpenFn: Raw | undefined;

/** The 64-byte CUDA IPC handle of a cuMemAlloc'd device pointer. */
export function ipcGetMemHandle(ptr: bigint): Uint8Array {
  const h = new Uint8Array(IPC_HANDLE_BYTES);
  cu('cuIpcGetMemHandle', h, ptr);
  return h;
}

/** Maps another process's allocation into this context (peer access enabled lazily by the driver). */
export function ipcOpenMemHandle(handle: Uint8Array): bigint {
  if (!ipcOpenFn) {
    // CUipcMemHandle is passed by value: a 64-byte struct.
    const t = koffi.struct('tsep_CUipcMemHandle', {
      reserved: koffi.array('uint8_t', IPC_HANDLE_BYTES, 'Typed'),
    });
    ipcOpenFn = library().func('cuIpcOpenMemHandle_v2', 'int', ['uint64_t *', t, 'unsigned int']) as Raw;
  }
  const out = new BigUint64Array(1);
  // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS (1)
  check('cuIpcOpenMemHandle_v2', ipcOpenFn(out, { reserved: handle }, 1) as number);
  return out[0]!;
}

export function ipcCloseMemHandle(ptr: bigint): void {
  cu('cuIpcCloseMemHandle', ptr);
}

/** One input of {@link linkDeviceCode}: an image in memory, or a file (an archive of host objects). */
export type LinkInput = { kind: 'cubin'; name: string; data: Uint8Array } | { kind: 'library'; path: string };

// CUjitInputType and CUjit_option values (cuda.h).
const JIT_INPUT = { cubin: 0, library: 4 } as const;
const JIT = { ERROR_LOG: 5, ERROR_LOG_SIZE: 6, TARGET: 9 } as const;
const LINK_LOG_BYTES = 64 * 1024;

/** CUjit_target for an arch such as "sm_90a": 90, plus CU_COMPUTE_ACCELERATED_TARGET_BASE for "a". */
export function jitTarget(arch: string): number {
  const m = /^sm_(\d+)(a?)$/.exec(arch);
  if (!m) throw new ValidationError('link target', JSON.stringify(arch), 'an arch such as "sm_90a"');
  return Number(m[1]) + (m[2] ? 0x10000 : 0);
}

/**
 * Links relocatable device code (NVRTC -rdc cubins, archives such as libnvshmem_device.a) into one
 * executable cubin with the driver's JIT linker, for `arch` (explicit, so an sm_90a input is not linked for
 * the context's plain sm_90). Needs a current context. Failures carry the linker's error log.
 */
export function linkDeviceCode(inputs: readonly LinkInput[], arch: string): Uint8Array {
  // The error log must stay valid for the life of the link state; the driver writes it up to complete.
  const error = allocNative(LINK_LOG_BYTES);
  const text = (b: { view: ArrayBuffer }): string => cString(new Uint8Array(b.view)).trim();
  const options = Int32Array.from([JIT.ERROR_LOG, JIT.ERROR_LOG_SIZE, JIT.TARGET]);
  const values = BigUint64Array.from([error.address, BigInt(LINK_LOG_BYTES), BigInt(jitTarget(arch))]);
  const state = new BigUint64Array(1);
  let created = false;
  try {
    cu('cuLinkCreate_v2', options.length, options, values, state);
    created = true;
    const withLog = (call: Name, f: () => number): void => {
      const status = f();
      if (status === 0) return;
      const { name, text: description } = errorText(status);
      const log = text(error);
      throw new CudaError(call, status, name, description, log ? `Linker log:\n${log}` : undefined);
    };
    for (const input of inputs) {
      if (input.kind === 'cubin') {
        withLog('cuLinkAddData_v2', () =>
          raw('cuLinkAddData_v2')(
            state[0],
            JIT_INPUT.cubin,
            input.data,
            input.data.byteLength,
            input.name,
            0,
            null,
            null,
          ),
        );
      } else {
        withLog('cuLinkAddFile_v2', () =>
          raw('cuLinkAddFile_v2')(state[0], JIT_INPUT.library, input.path, 0, null, null),
        );
      }
    }
    const out: unknown[] = [null];
    const size = [0];
    withLog('cuLinkComplete', () => raw('cuLinkComplete')(state[0], out, size));
    // The image belongs to the link state: copy it out before cuLinkDestroy.
    return new Uint8Array(viewNative(out[0], Number(size[0])).slice(0));
  } finally {
    if (created) cu('cuLinkDestroy', state[0]);
    freeNative(error.external);
  }
}
