// Kernels that call NVSHMEM's device API, compiled at run time: NVRTC with -rdc (relocatable code for the
// GPU's arch), linked against libnvshmem_device.a by the CUDA driver's JIT linker, loaded, and registered
// with nvshmemx_cumodule_init so the module's copy of NVSHMEM's device state gets filled in.
//
// Why the driver linker (cuLink*) and not nvJitLink: libnvshmem_device.a (NVSHMEM 3.4 wheel) is an archive
// of host objects whose __nv_relfatbin sections hold *relocatable SASS* for sm_75/80/89/90/100/120 (PTX only
// for sm_120; no LTO-IR), i.e. plain `nvcc -rdc` output. Linking SASS needs no LTO, and the driver links
// such archives itself (CU_JIT_INPUT_LIBRARY), so nothing beyond libcuda is needed. Offline, `nvlink
// -arch=sm_90a` links an sm_90a -rdc cubin with this archive (the sm_90 members go into sm_90a), which is what
// cuLink does here with the target set to sm_90a. libnvshmem_device.bc is LLVM bitcode for LTO (nvJitLink
// or Clang), the route to take if inlining NVSHMEM's device functions into the kernels ever matters.
//
// NVRTC needs, beyond the NVSHMEM include dir: the CUDA include dirs (NVSHMEM's device headers include
// <cuda_runtime.h> and <cuda/std/...>, which CUDA 13 keeps under include/cccl), -default-device (a
// constructor in device_host/nvshmem_tensor.h has no __device__), and a pre-included shim (SHIM) that
// gives uint64_t the gcc/nvcc type, so mangled names match the archive's, and supplies the std:: type
// traits that reduce.cuh names. Checked offline with NVRTC 13.0 + nvlink against the 3.4.5 wheel.

import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Device } from '../device/context.ts';
import { Module } from '../device/module.ts';
import { TsepError } from '../errors.ts';
import { driverVersion, linkDeviceCode } from '../native/cuda.ts';
import { cudaRoots } from '../native/loader.ts';
import { nvrtcCompile, nvrtcVersion } from '../native/nvrtc.ts';
import { type NvshmemInstall, nvshmemCumoduleInit, nvshmemInstall } from '../native/nvshmem.ts';
import { cacheKey, readCached, writeCached } from './cache.ts';
import { archFor, type Define, defineOptions } from './compile.ts';

const SHIM_NAME = 'tsep_nvshmem_nvrtc.h';
const SHIM = `// Pre-included by tsep (src/jit/link.ts) when NVRTC compiles NVSHMEM device code.
// 1. uint64_t and friends as the LP64 types gcc/nvcc use on Linux x86-64 (libcu++ gives NVRTC
//    'unsigned long long'), so C++ names mangled with them match libnvshmem_device.a's, e.g.
//    nvshmemi_transfer_put_signal<...>(void*, void*, unsigned long, void*, unsigned long, ...). Stands in
//    for <cuda/std/cstdint> (its include guard is defined here), with the same names and macros.
#define _CUDA_STD_CSTDINT
#include <cuda/std/detail/__config>
#include <cuda/std/climits>
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef int8_t int_least8_t;
typedef int16_t int_least16_t;
typedef int32_t int_least32_t;
typedef int64_t int_least64_t;
typedef uint8_t uint_least8_t;
typedef uint16_t uint_least16_t;
typedef uint32_t uint_least32_t;
typedef uint64_t uint_least64_t;
typedef int8_t int_fast8_t;
typedef long int_fast16_t;
typedef long int_fast32_t;
typedef int64_t int_fast64_t;
typedef uint8_t uint_fast8_t;
typedef unsigned long uint_fast16_t;
typedef unsigned long uint_fast32_t;
typedef uint64_t uint_fast64_t;
typedef long intptr_t;
typedef unsigned long uintptr_t;
typedef long intmax_t;
typedef unsigned long uintmax_t;
#define INT8_MIN SCHAR_MIN
#define INT16_MIN SHRT_MIN
#define INT32_MIN INT_MIN
#define INT64_MIN LONG_MIN
#define INT8_MAX SCHAR_MAX
#define INT16_MAX SHRT_MAX
#define INT32_MAX INT_MAX
#define INT64_MAX LONG_MAX
#define UINT8_MAX UCHAR_MAX
#define UINT16_MAX USHRT_MAX
#define UINT32_MAX UINT_MAX
#define UINT64_MAX ULONG_MAX
#define INTPTR_MIN LONG_MIN
#define INTPTR_MAX LONG_MAX
#define UINTPTR_MAX ULONG_MAX
#define INTMAX_MIN LONG_MIN
#define INTMAX_MAX LONG_MAX
#define UINTMAX_MAX ULONG_MAX
#define PTRDIFF_MIN LONG_MIN
#define PTRDIFF_MAX LONG_MAX
#define SIZE_MAX ULONG_MAX
#define INT8_C(X) ((::int_least8_t)(X))
#define INT16_C(X) ((::int_least16_t)(X))
#define INT32_C(X) ((::int_least32_t)(X))
#define INT64_C(X) ((::int_least64_t)(X))
#define UINT8_C(X) ((::uint_least8_t)(X))
#define UINT16_C(X) ((::uint_least16_t)(X))
#define UINT32_C(X) ((::uint_least32_t)(X))
#define UINT64_C(X) ((::uint_least64_t)(X))
#define INTMAX_C(X) ((::intmax_t)(X))
#define UINTMAX_C(X) ((::uintmax_t)(X))
_LIBCUDACXX_BEGIN_NAMESPACE_STD
using ::int8_t;
using ::int16_t;
using ::int32_t;
using ::int64_t;
using ::uint8_t;
using ::uint16_t;
using ::uint32_t;
using ::uint64_t;
using ::int_least8_t;
using ::int_least16_t;
using ::int_least32_t;
using ::int_least64_t;
using ::uint_least8_t;
using ::uint_least16_t;
using ::uint_least32_t;
using ::uint_least64_t;
using ::int_fast8_t;
using ::int_fast16_t;
using ::int_fast32_t;
using ::int_fast64_t;
using ::uint_fast8_t;
using ::uint_fast16_t;
using ::uint_fast32_t;
using ::uint_fast64_t;
using ::intptr_t;
using ::uintptr_t;
using ::intmax_t;
using ::uintmax_t;
#if _CCCL_HAS_INT128()
using __cccl_intmax_t = __int128_t;
using __cccl_uintmax_t = __uint128_t;
#else
using __cccl_intmax_t = long long;
using __cccl_uintmax_t = unsigned long long;
#endif
_LIBCUDACXX_END_NAMESPACE_STD
// 2. non_abi/device/coll/reduce.cuh names std::is_integral/is_signed/is_unsigned even under NVRTC.
#include <cuda/std/type_traits>
namespace std {
using cuda::std::is_integral;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
}
`;

/** CUDA include dirs for NVRTC: the first toolkit root with cuda_runtime.h, and its cccl/ (CUDA 13). */
export function cudaIncludeDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  for (const root of cudaRoots(env)) {
    for (const inc of [join(root, 'include'), join(root, 'targets', 'x86_64-linux', 'include')]) {
      if (!existsSync(join(inc, 'cuda_runtime.h'))) continue;
      const cccl = join(inc, 'cccl');
      return existsSync(cccl) ? [inc, cccl] : [inc];
    }
  }
  throw new TsepError(
    'TSEP_LIBRARY_NOT_FOUND',
    `NVSHMEM kernels need the CUDA headers (cuda_runtime.h) and none were found under ${cudaRoots(env).join(', ')}. ` +
      'Install the CUDA toolkit headers or set CUDA_HOME.',
  );
}

/** NVRTC options for an NVSHMEM kernel (relocatable code; see the top of this file for the rest). */
export function nvshmemCompileOptions(
  arch: string,
  install: Pick<NvshmemInstall, 'includeDir'>,
  cudaIncludes: readonly string[],
  defines: Record<string, Define> = {},
): string[] {
  return [
    `--gpu-architecture=${arch}`,
    '--relocatable-device-code=true',
    '-std=c++17',
    '-lineinfo',
    '-default-device',
    `--pre-include=${SHIM_NAME}`,
    `-I${install.includeDir}`,
    ...cudaIncludes.map((i) => `-I${i}`),
    ...defineOptions(defines),
  ];
}

export interface NvshmemKernelSource {
  /** Name for logs and errors, e.g. "nvshmem-put-signal.cu". */
  name: string;
  source: string;
  /** Headers the source includes with quotes, by name and content. */
  headers?: Record<string, string>;
  defines?: Record<string, Define>;
}

export interface NvshmemModule {
  module: Module;
  /** Whether the linked cubin came from the disk cache. */
  cached: boolean;
  /** Compile + link time in ms (0 on a cache hit). */
  ms: number;
  /** Executable cubin size in bytes. */
  bytes: number;
}

/** NVRTC's options and headers for an NVSHMEM source (the shim pre-included). */
function nvrtcInputs(
  src: NvshmemKernelSource,
  arch: string,
  install: Pick<NvshmemInstall, 'includeDir'>,
): { options: string[]; headers: Record<string, string> } {
  return {
    options: nvshmemCompileOptions(arch, install, cudaIncludeDirs(), src.defines),
    headers: { ...src.headers, [SHIM_NAME]: SHIM },
  };
}

/**
 * The relocatable cubin NVRTC makes of an NVSHMEM source, before linking: what loadNvshmemModule compiles,
 * without a GPU (scripts/check-kernels.sh checks the sources with it).
 */
export async function compileNvshmemSource(
  src: NvshmemKernelSource,
  arch: string,
  install: Pick<NvshmemInstall, 'includeDir'> = nvshmemInstall(),
): Promise<Uint8Array> {
  const { options, headers } = nvrtcInputs(src, arch, install);
  return (await nvrtcCompile({ name: src.name, source: src.source, headers, options })).cubin;
}

/**
 * Compiles `src` with NVSHMEM's device headers, links libnvshmem_device.a into it and loads it on `device`,
 * registered with NVSHMEM. Call after nvshmemInit (cumodule_init needs an initialized NVSHMEM). The linked
 * cubin is cached on disk like other kernels (the key also covers the device library file).
 */
export async function loadNvshmemModule(device: Device, src: NvshmemKernelSource): Promise<NvshmemModule> {
  const t0 = performance.now();
  // The install whose host library is loaded: device library and headers must come from the same one.
  const install = nvshmemInstall();
  const arch = archFor(device.info.computeCapability);
  const { options, headers } = nvrtcInputs(src, arch, install);
  const lib = statSync(install.deviceLibrary);
  const [nvMaj, nvMin] = nvrtcVersion();
  const [drvMaj, drvMin] = driverVersion();
  const key = cacheKey({
    source: src.source,
    headers,
    options: [...options, `link:${install.deviceLibrary}:${lib.size}:${lib.mtimeMs}`],
    compiler: `nvrtc ${nvMaj}.${nvMin} + cuLink (driver ${drvMaj}.${drvMin})`,
    arch,
  });
  let cubin = readCached(key);
  const cached = cubin !== undefined;
  if (!cubin) {
    const rdc = await nvrtcCompile({ name: src.name, source: src.source, headers, options });
    device.makeCurrent();
    cubin = linkDeviceCode(
      [
        { kind: 'cubin', name: src.name, data: rdc.cubin },
        { kind: 'library', path: install.deviceLibrary },
      ],
      arch,
    );
    writeCached(key, cubin);
  }
  const module = Module.load(cubin, device);
  nvshmemCumoduleInit(module.handle);
  return { module, cached, ms: cached ? 0 : performance.now() - t0, bytes: cubin.byteLength };
}
