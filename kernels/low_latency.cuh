// Building blocks of the low-latency kernels (kernels/low_latency.cu): the buffer layout (every offset
// comes from src/ep/gpu/ll-layout.ts as a -D define), system-scope signalling, bounded waits that leave
// a record in host-mapped memory instead of hanging, and the last-block completion pattern. What does not
// depend on the transport (shape macros, quantization, receive order, combine order) is in ll_core.cuh.
#pragma once

#include "ll_core.cuh"

// LL_ENGINE 1: the ranks span hosts of LL_RPH ranks each (docs/multi-host.md). Peers on this rank's host
// are reached by stores through peer pointers as without it; a peer on another host through NVSHMEM (puts
// and signal writes; NVSHMEM picks the network, or its own intra-node transport for virtual hosts). For such
// a peer the host passes this rank's own buffer in `peers`, so every slot address computed from it is the
// symmetric address NVSHMEM wants; the kernels write there first (a staging copy) and put it from there.
#ifndef LL_ENGINE
#define LL_ENGINE 0
#endif
#if LL_ENGINE
#include "engine.cuh"
#ifndef LL_RPH
#define LL_RPH 1
#endif
#ifndef LL_OFF_COUT
// The combine outbox ([R][T_max][K_max] rows), after the combine area (src/ep/gpu/ll-layout.ts).
#define LL_OFF_COUT (LL_OFF_CAREA + 2 * LL_CHALF)
#endif
#endif

#ifndef LL_MSG
// Defaults so the file compiles stand-alone (scripts/check-kernels.sh); the library always passes all.
#define LL_MSG 14336
#define LL_ROUTE 4096
#define LL_SRC (LL_ROUTE + LL_TMAX * LL_MSG)
#define LL_DHALF (LL_R * LL_SRC)
#define LL_CHALF (LL_TMAX * LL_KMAX * 2 * LL_H)
#define LL_OFF_STATE 0
#define LL_OFF_DSIG 256
#define LL_OFF_DACK 512
#define LL_OFF_CSIG 640
#define LL_OFF_CACK 768
#define LL_OFF_BAR 896
#define LL_OFF_DAREA 4096
#define LL_OFF_CAREA (LL_OFF_DAREA + 2 * LL_DHALF)
#endif

// Device-side state words (src/ep/gpu/ll-layout.ts LL_STATE).
#define LL_ST_DSEND 0
#define LL_ST_DRECV 1
#define LL_ST_CSEND 2
#define LL_ST_CRECV 3
#define LL_ST_ARRIVE 4
#define LL_ST_ABORT 8
#define LL_ST_CLAIM 9
#define LL_ST_BAR 10

// Globaltimer stamps (u64, after the 16 state words) that the host reads for a per-phase breakdown.
#define LL_STAMPS_OFF 64
#define LL_T_DS_START 0
#define LL_T_DS_READY 1
#define LL_T_DS_SIGNAL 2
#define LL_T_DR_START 3
#define LL_T_DR_READY 4
#define LL_T_DR_END 5
#define LL_T_CS_START 6
#define LL_T_CS_READY 7
#define LL_T_CS_SIGNAL 8
#define LL_T_CR_START 9
#define LL_T_CR_READY 10
#define LL_T_CR_END 11

// Which phases a launch runs (kernel argument `phases`): both in one launch, or one each (receive hooks).
#define LL_PHASE_SEND 1
#define LL_PHASE_RECV 2

// Timeout record (LL_RECORD): kernels and phases.
#define LL_K_DSEND 1
#define LL_K_DRECV 2
#define LL_K_CSEND 3
#define LL_K_CRECV 4
#define LL_K_CLEAN 5
#define LL_K_GATE 6
#define LL_P_ACK 1
#define LL_P_SIGNAL 2
#define LL_P_BARRIER 3

namespace ll {

using tsep::seq_reached;

struct Ctx {
  u8 *local;       // this rank's symmetric buffer
  int *record;     // host-mapped timeout record
  u64 timeout_ns;  // bound of every wait
  int rank;        // local rank
  int kernel;      // LL_K_*
  __device__ __forceinline__ u32 *state() const { return reinterpret_cast<u32 *>(local + LL_OFF_STATE); }
  // One thread writes the time of event `i` (LL_T_*).
  __device__ __forceinline__ void stamp(int i) const {
    reinterpret_cast<u64 *>(local + LL_OFF_STATE + LL_STAMPS_OFF)[i] = tsep::globaltimer_ns();
  }
};

// Marks this rank's low-latency state as aborted and, first writer only, leaves the record the host
// turns into an EpTimeoutError.
__device__ __noinline__ void report_timeout(const Ctx &c, int phase, int peer, u32 expected, u32 seen) {
  u32 *st = c.state();
  atomicExch(st + LL_ST_ABORT, 1u);
  if (atomicCAS(st + LL_ST_CLAIM, 0u, 1u) == 0u) {
    volatile int *r = c.record;
    r[1] = c.rank;
    r[2] = c.kernel;
    r[3] = phase;
    r[4] = peer;
    r[5] = (int)expected;
    r[6] = (int)seen;
    r[7] = (int)blockIdx.x;
    __threadfence_system();
    tsep::st_release_sys(c.record, 1);
  }
}

// Whether rank d is on another host than `rank` (always false without LL_ENGINE).
__device__ __forceinline__ bool remote(int d, int rank) {
#if LL_ENGINE
  return d / LL_RPH != rank / LL_RPH;
#else
  (void)d;
  (void)rank;
  return false;
#endif
}

// Spins until *p has reached `target`: relaxed loads while waiting, then one acquire load of the value that
// reached it (what the caller reads afterwards is ordered after the writer's release; for a word a peer on
// another host wrote, after NVSHMEM's consistency step too). Gives up, returning false, when this rank has
// aborted or after the timeout (then it reports). A u64 word compares its low 32 bits. `p` is in this
// rank's own buffer; `peer` is the rank that writes it.
template <typename T>
__device__ __forceinline__ bool wait_reached(const Ctx &c, const T *p, u32 target, int phase, int peer,
                                             T *seen_out = nullptr) {
  T v;
  const u64 start = tsep::globaltimer_ns();
  for (u32 i = 0;; i++) {
    if constexpr (sizeof(T) == 8) v = tsep::ld_relaxed_sys_u64(reinterpret_cast<const u64 *>(p));
    else v = tsep::ld_relaxed_sys_u32(reinterpret_cast<const u32 *>(p));
    if (seq_reached((u32)v, target)) {
      if constexpr (sizeof(T) == 8) v = tsep::ld_acquire_sys_u64(reinterpret_cast<const u64 *>(p));
      else v = tsep::ld_acquire_sys_u32(reinterpret_cast<const u32 *>(p));
      break;
    }
    if ((i & 255u) == 255u) {
      if (tsep::ld_volatile_u32(c.state() + LL_ST_ABORT) != 0u) return false;
      if (tsep::globaltimer_ns() - start > c.timeout_ns) {
        report_timeout(c, phase, peer, target, (u32)v);
        return false;
      }
    }
  }
#if LL_ENGINE
  // Data follows a signal, not an ack (an ack only frees a slot for the next writes).
  if (phase == LL_P_SIGNAL && remote(peer, c.rank)) tsep::engine_acquire(p);
#endif
  if (seen_out) *seen_out = v;
  return true;
}

// Publishes a word into rank d's buffer at `p` (computed from peers[d]) with release semantics: a store
// through NVLink, or an NVSHMEM write to a peer on another host (after the caller's nvshmem_quiet when it
// must follow the data). Announcements after last_block's fence use announce() below.
__device__ __forceinline__ void publish_u32(u32 *p, u32 v, int d, int rank) {
#if LL_ENGINE
  if (remote(d, rank)) {
    nvshmem_uint32_p(reinterpret_cast<uint32_t *>(p), v, d);
    return;
  }
#endif
  (void)d;
  (void)rank;
  tsep::st_release_sys_u32(p, v);
}

#if LL_ENGINE
// `bytes` from `src` (this rank's staging) to `dst` (a symmetric address) in rank d's buffer (every lane
// calls it, after the stores it copies; non-blocking: complete_puts() before anything that announces them).
__device__ __forceinline__ void put_warp_to(void *dst, const void *src, size_t bytes, int d) {
  __syncwarp();
  nvshmemx_putmem_nbi_warp(dst, src, bytes, d);
}
// The warp's `bytes` at `p` in this rank's buffer, to the same place in rank d's.
__device__ __forceinline__ void put_warp(const void *p, size_t bytes, int d) {
  put_warp_to(const_cast<void *>(p), p, bytes, d);
}
#endif

// Every NVSHMEM put this warp issued has completed (a no-op without LL_ENGINE). Lane 0 of each warp calls
// it before the block arrives at last_block, so the signals the last block writes follow all the data.
__device__ __forceinline__ void complete_puts() {
#if LL_ENGINE
  __syncwarp();
  if (threadIdx.x % 32 == 0) nvshmem_quiet();
  __syncwarp();
#endif
}

// Barrier of the ranks through the monotonic counters at LL_OFF_BAR: threads r < LL_R each publish
// `target` into rank r and wait for rank r's. Call from threads 0..31 of one block; true when passed.
__device__ __forceinline__ bool rank_barrier(const Ctx &c, const u64 *peers, u32 target) {
  bool ok = true;
  if (threadIdx.x < LL_R) {
    const int r = threadIdx.x;
    tsep::fence_sc_sys();
    publish_u32(reinterpret_cast<u32 *>(reinterpret_cast<u8 *>(peers[r]) + LL_OFF_BAR) + c.rank, target, r, c.rank);
    const u32 *mine = reinterpret_cast<const u32 *>(c.local + LL_OFF_BAR) + r;
    const u64 start = tsep::globaltimer_ns();
    while (!seq_reached(tsep::ld_acquire_sys_u32(mine), target)) {
      if (tsep::globaltimer_ns() - start > c.timeout_ns) {
        report_timeout(c, LL_P_BARRIER, r, target, tsep::ld_acquire_sys_u32(mine));
        ok = false;
        break;
      }
    }
  }
  return __syncthreads_and(ok);
}

// Last-block completion: every block calls it once after its stores; returns true in thread 0 of the
// block that arrived last, after a system-scope fence, so that thread may publish everything the grid
// wrote with `announce` (relaxed stores: that fence and a strong store form the release). Each block's
// own fence is GPU-scope: the counter is on this GPU, and the last block's system-scope fence carries
// what it acquired from the others (causality is transitive) to the peers that acquire its announcement.
// That chain needs the counter in this GPU's memory and the atom's result used (a `red` forms no acquire).
__device__ __forceinline__ bool last_block(const Ctx &c, int counter) {
  __syncthreads();
  if (threadIdx.x != 0) return false;
  tsep::fence_acq_rel_gpu();
  u32 *arrive = c.state() + LL_ST_ARRIVE + counter;
  const u32 prev = atomicAdd(arrive, 1u);
  if (prev != gridDim.x - 1) return false;
  atomicExch(arrive, 0u);
  tsep::fence_acq_rel_sys();
  return true;
}

// Announces a word (u32 or u64) to rank d after last_block's fence: a relaxed store through NVLink, or an
// NVSHMEM write (a u64 as a signal) for a peer on another host.
template <typename T>
__device__ __forceinline__ void announce(T *p, T v, int d, int rank) {
#if LL_ENGINE
  if (remote(d, rank)) {
    if constexpr (sizeof(T) == 8) nvshmemx_signal_op(reinterpret_cast<uint64_t *>(p), v, NVSHMEM_SIGNAL_SET, d);
    else publish_u32(p, v, d, rank);
    return;
  }
#endif
  (void)d;
  (void)rank;
  if constexpr (sizeof(T) == 8) tsep::st_relaxed_sys_u64(p, v);
  else tsep::st_relaxed_sys_u32(p, v);
}

// Addresses inside a rank's buffer.
__device__ __forceinline__ u64 *dispatch_signal(u8 *base, int half, int src) {
  return reinterpret_cast<u64 *>(base + LL_OFF_DSIG) + half * LL_R + src;
}
__device__ __forceinline__ u32 *dispatch_ack(u8 *base, int receiver) {
  return reinterpret_cast<u32 *>(base + LL_OFF_DACK) + receiver;
}
__device__ __forceinline__ u32 *combine_signal(u8 *base, int half, int expert_rank) {
  return reinterpret_cast<u32 *>(base + LL_OFF_CSIG) + half * LL_R + expert_rank;
}
__device__ __forceinline__ u32 *combine_ack(u8 *base, int owner) {
  return reinterpret_cast<u32 *>(base + LL_OFF_CACK) + owner;
}
__device__ __forceinline__ u8 *dispatch_src(u8 *base, int half, int src) {
  return base + LL_OFF_DAREA + (size_t)half * LL_DHALF + (size_t)src * LL_SRC;
}
__device__ __forceinline__ int *dispatch_route(u8 *base, int half, int src) {
  return reinterpret_cast<int *>(dispatch_src(base, half, src));
}
__device__ __forceinline__ u8 *dispatch_msg(u8 *base, int half, int src, int t) {
  return dispatch_src(base, half, src) + LL_ROUTE + (size_t)t * LL_MSG;
}
__device__ __forceinline__ u8 *combine_slot(u8 *base, int half, int t, int k) {
  return base + LL_OFF_CAREA + (size_t)half * LL_CHALF + ((size_t)t * LL_KMAX + k) * (2 * LL_H);
}
#if LL_ENGINE
// Staging of the combine rows for owner s on another host, in this rank's buffer (slot [t][k] of s).
__device__ __forceinline__ u8 *combine_outbox(u8 *base, int s, int t, int k) {
  return base + LL_OFF_COUT + (((size_t)s * LL_TMAX + t) * LL_KMAX + k) * (2 * LL_H);
}
#endif

}  // namespace ll
