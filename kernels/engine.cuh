// NVSHMEM as the engine between hosts: its headers, and what the tsep kernels that use it share.
#pragma once
#include <nvshmem.h>
#include <nvshmemx.h>

namespace tsep {

// After a bounded spin saw a word that another host wrote into this rank's buffer through NVSHMEM
// (`seen`: its value): NVSHMEM's test call, which then takes the transport's consistency step at the
// target, so that host's earlier puts are visible to this GPU's loads (a network transport may need it;
// a plain spin does not take it; over NVLink it is a fence). Only for words in this rank's own buffer.
__device__ __forceinline__ void engine_acquire(const unsigned long long *word, unsigned long long seen) {
  (void)nvshmem_uint64_test(reinterpret_cast<uint64_t *>(const_cast<unsigned long long *>(word)), NVSHMEM_CMP_EQ,
                            (uint64_t)seen);
}
__device__ __forceinline__ void engine_acquire(const unsigned int *word, unsigned int seen) {
  (void)nvshmem_uint32_test(reinterpret_cast<uint32_t *>(const_cast<unsigned int *>(word)), NVSHMEM_CMP_EQ,
                            (uint32_t)seen);
}

}  // namespace tsep
