// NVSHMEM as the engine between hosts: its headers, and what the tsep kernels that use it share.
#pragma once
#include <nvshmem.h>
#include <nvshmemx.h>

namespace tsep {

// After a bounded spin saw a word that another host wrote into this rank's buffer through NVSHMEM: an
// NVSHMEM test call, which takes the transport's consistency step at the target, so that host's earlier
// puts are visible to this GPU's loads (a network transport may need it; a plain spin does not take it;
// over NVLink it is a fence). The comparison (>= 0) always holds, so the step is always taken: NVSHMEM takes
// it only when a test succeeds. Only for words in this rank's own (symmetric) buffer.
__device__ __forceinline__ void engine_acquire(const unsigned long long *word) {
  (void)nvshmem_uint64_test(reinterpret_cast<uint64_t *>(const_cast<unsigned long long *>(word)), NVSHMEM_CMP_GE,
                            (uint64_t)0);
}
__device__ __forceinline__ void engine_acquire(const unsigned int *word) {
  (void)nvshmem_uint32_test(reinterpret_cast<uint32_t *>(const_cast<unsigned int *>(word)), NVSHMEM_CMP_GE,
                            (uint32_t)0);
}

}  // namespace tsep
