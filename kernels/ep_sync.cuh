// Cross-GPU synchronization for the EP kernels: a barrier over the ranks of a host through their
// symmetric buffers, bounded waits, and the host-mapped error record a timed-out wait leaves behind.
#pragma once
#include "common.cuh"

namespace tsep {

// Written by a kernel whose bounded wait expired; read by the host, which raises EpTimeoutError.
struct ErrorRecord {
  int flag;      // 0 = no error; set last, with release semantics
  int rank;      // the rank that waited
  int kernel;    // which kernel (see KERNEL_* in the host code)
  int phase;     // which wait inside it
  int peer;      // the peer waited for, -1 if none / all
  int pad;
  long long expected;
  long long seen;
};

__device__ __forceinline__ void report_timeout(ErrorRecord *err, int rank, int kernel, int phase, int peer,
                                               long long expected, long long seen) {
  if (atomicCAS(&err->flag, 0, -1) != 0) return;  // keep the first report
  err->rank = rank;
  err->kernel = kernel;
  err->phase = phase;
  err->peer = peer;
  err->expected = expected;
  err->seen = seen;
  __threadfence_system();
  st_release_sys(&err->flag, 1);
}

__device__ __forceinline__ u64 ld_acquire_sys_u64(const u64 *p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ u64 ld_acquire(const u64 *p) { return ld_acquire_sys_u64(p); }
__device__ __forceinline__ int ld_acquire(const int *p) { return ld_acquire_sys(p); }

// Waits until *p >= target. Returns false (after reporting) if `timeout_ns` passes first, or if another
// wait of this kernel already gave up.
template <typename T>
__device__ __forceinline__ bool wait_geq(const T *p, T target, u64 timeout_ns, ErrorRecord *err, int rank, int kernel,
                                         int phase, int peer) {
  u64 start = 0;
  for (int spins = 0;; ++spins) {
    const T v = ld_acquire(p);
    if (v >= target) return true;
    if ((spins & 1023) == 0) {
      const u64 now = globaltimer_ns();
      if (start == 0) start = now;
      else if (now - start > timeout_ns || ld_volatile(&err->flag) != 0) {
        report_timeout(err, rank, kernel, phase, peer, (long long)target, (long long)v);
        return false;
      }
    }
  }
}

// Barrier of `num_ranks` ranks. `slots` is this rank's array of num_ranks ints that peers write their
// round into; `peer_slots[r]` is rank r's array. `round` is this rank's private counter. One thread.
__device__ __forceinline__ bool rank_barrier(int *const *peer_slots, int *slots, int *round, int me, int num_ranks,
                                             u64 timeout_ns, ErrorRecord *err, int kernel, int phase) {
  const int r = *round + 1;
  *round = r;
  __threadfence_system();
  for (int p = 0; p < num_ranks; ++p) st_release_sys(peer_slots[p] + me, r);
  for (int p = 0; p < num_ranks; ++p)
    if (!wait_geq(slots + p, r, timeout_ns, err, me, kernel, phase, p)) return false;
  return true;
}

}  // namespace tsep
