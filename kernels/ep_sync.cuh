// Cross-GPU synchronization for the EP kernels: a barrier over the ranks of a host through their
// symmetric buffers, bounded waits, and the host-mapped error record a timed-out wait leaves behind.
// Kernels poll a device-memory abort word, never the host page: a read of host-mapped memory crosses
// PCIe and such reads are served about one at a time (one per warp cost a 24-SM send kernel 300 µs).
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

// Where a kernel reports a failure: the host's record, and this rank's abort word in device memory that
// every later wait and kernel of the rank checks (cleared by the host's reset).
struct Fail {
  ErrorRecord *record;
  int *abort;
};

__device__ __forceinline__ bool aborted(const Fail &f) { return ld_volatile(f.abort) != 0; }

__device__ __forceinline__ void report_timeout(const Fail &f, int rank, int kernel, int phase, int peer,
                                               long long expected, long long seen) {
  if (atomicCAS(f.abort, 0, 1) != 0) return;  // keep the first report
  ErrorRecord *err = f.record;
  err->rank = rank;
  err->kernel = kernel;
  err->phase = phase;
  err->peer = peer;
  err->expected = expected;
  err->seen = seen;
  __threadfence_system();
  st_release_sys(&err->flag, 1);
}

__device__ __forceinline__ u64 ld_acquire(const u64 *p) { return ld_acquire_sys_u64(p); }
__device__ __forceinline__ int ld_acquire(const int *p) { return ld_acquire_sys(p); }

// The bounded spin every wait below shares: acquire-loads *p until `reached(v)` (then stores v in `*seen`
// if given); every mask + 1 spins it checks the clock and this rank's abort word, and on expiry reports
// `expected` and `shown(v)` and returns false.
template <typename T, typename Reached, typename Shown>
__device__ __forceinline__ bool spin_until(const T *p, Reached reached, Shown shown, long long expected, int mask,
                                           u64 timeout_ns, const Fail &f, int rank, int kernel, int phase, int peer,
                                           T *seen = nullptr) {
  u64 start = 0;
  for (int spins = 0;; ++spins) {
    const T v = ld_acquire(p);
    if (reached(v)) {
      if (seen) *seen = v;
      return true;
    }
    if ((spins & mask) == 0) {
      const u64 now = globaltimer_ns();
      if (start == 0) start = now;
      else if (now - start > timeout_ns || aborted(f)) {
        report_timeout(f, rank, kernel, phase, peer, expected, shown(v));
        return false;
      }
    }
  }
}

// Waits until *p >= target. Returns false (after reporting) if `timeout_ns` passes first, or if another
// wait of this kernel already gave up.
template <typename T>
__device__ __forceinline__ bool wait_geq(const T *p, T target, u64 timeout_ns, const Fail &f, int rank, int kernel,
                                         int phase, int peer) {
  return spin_until(
      p, [=](T v) { return v >= target; }, [](T v) { return (long long)v; }, (long long)target, 1023, timeout_ns, f,
      rank, kernel, phase, peer);
}

// Waits until the 32-bit sequence number in *p has reached `target`, wrap-safely (seq_reached); a u64 word
// compares its low 32 bits. Returns false (after reporting) as
// wait_geq does.
template <typename T>
__device__ __forceinline__ bool wait_seq(const T *p, u32 target, u64 timeout_ns, const Fail &f, int rank, int kernel,
                                         int phase, int peer) {
  return spin_until(
      p, [=](T v) { return seq_reached((u32)v, target); }, [](T v) { return (long long)(u32)v; },
      (long long)target, 1023, timeout_ns, f, rank, kernel, phase, peer);
}

// Waits until the top `bits` bits (≤ 32) of the tagged word *p equal the low `bits` bits of `tag` (a
// call's sequence number) and returns the word; false after reporting, as wait_geq.
__device__ __forceinline__ bool wait_tag(const u64 *p, u32 tag, int bits, u64 *word, u64 timeout_ns, const Fail &f,
                                         int rank, int kernel, int phase, int peer) {
  const u32 mask = bits >= 32 ? 0xffffffffu : (1u << bits) - 1;
  return spin_until(
      p, [=](u64 v) { return (u32)(v >> (64 - bits)) == (tag & mask); },
      [=](u64 v) { return (long long)(v >> (64 - bits)); }, (long long)(tag & mask), 255, timeout_ns, f, rank, kernel,
      phase, peer, word);
}

// Barrier of `num_ranks` ranks. `slots` is this rank's array of num_ranks ints that peers write their
// round into; `peer_slots[r]` is rank r's array. `round` is this rank's private counter. One thread.
__device__ __forceinline__ bool rank_barrier(int *const *peer_slots, int *slots, int *round, int me, int num_ranks,
                                             u64 timeout_ns, const Fail &f, int kernel, int phase) {
  const int r = *round + 1;
  *round = r;
  __threadfence_system();
  for (int p = 0; p < num_ranks; ++p) st_release_sys(peer_slots[p] + me, r);
  for (int p = 0; p < num_ranks; ++p)
    if (!wait_geq(slots + p, r, timeout_ns, f, me, kernel, phase, p)) return false;
  return true;
}

}  // namespace tsep
