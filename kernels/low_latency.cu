// Low-latency (decode) dispatch and combine over NVLink, one process per GPU, R <= 8 ranks of one host;
// with LL_ENGINE (low_latency.cuh), ranks on other hosts through NVSHMEM.
// docs/low-latency.md describes the protocol; src/cpu/ref-low-latency.ts is the oracle the outputs match
// bit for bit (deterministic order: per local expert, source rank ascending, then token ascending).
//
// Two kernels, each with a send and a receive phase (`phases`). Without receive hooks one launch runs both
// (its grid fits on the GPU at once, so blocks waiting in the receive phase never keep a send block from
// running); with hooks the send phase is launched alone and the hook launches the receive phase, so no SM
// is held while data flies.
//   ll_dispatch  send: quantize each token once, write it once per destination rank, signal
//                recv: wait for every source, order rows deterministically, copy into the outputs
//   ll_combine   send: write each expert row back into its owner's slot [token][k], signal
//                recv: wait for every expert rank, out[t] = sum_k w[t,k] * y[t,k] (f32, ascending k)
// Every call's sequence number lives on the device (state words), so CUDA-graph replays stay correct.
#include "low_latency.cuh"

using namespace ll;

// Shared prologue: both sequence numbers, the abort flag and the peer table in shared memory; threads
// r < LL_R also make a first (acquire) read of `first[r]` (an ack word), overlapped with the rest.
struct Prologue {
  u32 epoch[2];
  u32 abort;
  u8 *peer[LL_R];
};

__device__ __forceinline__ u32 prologue(const Ctx &c, const u64 *peers, int send_word, int recv_word,
                                        const u32 *first, Prologue &p) {
  u32 v = 0;
  if (threadIdx.x == 32) {
    p.epoch[0] = tsep::ld_volatile_u32(c.state() + send_word);
    p.epoch[1] = tsep::ld_volatile_u32(c.state() + recv_word);
    p.abort = tsep::ld_volatile_u32(c.state() + LL_ST_ABORT);
  }
  if (threadIdx.x < LL_R) {
    p.peer[threadIdx.x] = reinterpret_cast<u8 *>(peers[threadIdx.x]);
    v = tsep::ld_acquire_sys_u32(first + threadIdx.x);
  }
  __syncthreads();
  return v;
}

// ------------------------------------------------------------------------------------------ dispatch

#if LL_ENGINE
// The parts of a message that one send item (chunk `ch`) wrote into this rank's own slot, to rank d: the
// row's channels, then their FP8 scales (f32 per 128 channels, or the chunk's UE8M0 word).
__device__ __forceinline__ void send_msg_chunk(const u8 *msg, int ch, bool fp8, bool ue8m0, int d) {
  const int c0 = ch * LL_CHUNK;
  const int n = min(LL_CHUNK, LL_H - c0);
  if (!fp8) {
    put_warp(msg + 2 * c0, 2 * (size_t)n, d);
    return;
  }
  put_warp(msg + c0, n, d);
  if (ue8m0) put_warp(msg + LL_H + 4 * ch, 4, d);
  else put_warp(msg + LL_H + 4 * (c0 / 128), 4 * (size_t)((n + 127) / 128), d);
}
#endif

// Send phase: one warp per (token, LL_CHUNK channels); each lane owns 16 channels (two 16-byte loads).
__device__ __forceinline__ void dispatch_send_items(const Prologue &p, int rank, int half, const u16 *x,
                                                    const void *topk, int T, int K, int flags) {
  const bool fp8 = flags & LL_FLAG_FP8, round = flags & LL_FLAG_ROUND, ue8m0 = flags & LL_FLAG_UE8M0;
  const bool idx64 = flags & LL_FLAG_IDX64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = (LL_H + LL_CHUNK - 1) / LL_CHUNK;
  for (int item = blockIdx.x * LL_WARPS + warp; item < T * chunks; item += gridDim.x * LL_WARPS) {
    const SendChunk c = load_send_chunk(item, x, topk, K, idx64);
    const u32 dmask = __reduce_or_sync(LL_FULL, c.expert >= 0 ? 1u << (c.expert / LL_EL) : 0u);
    if (c.ch == 0 && lane < LL_KMAX) {
      // The token's routing row goes to every rank (slots past K are -1), so a receiver never reads a
      // stale row from an earlier call.
#pragma unroll
      for (int d = 0; d < LL_R; d++)
        if (!remote(d, rank)) dispatch_route(p.peer[d], half, rank)[c.t * LL_KMAX + lane] = c.expert;
    }
#if LL_ENGINE
    // Ranks on other hosts: their row is the one just stored in this rank's own slot (their `peers` entry is
    // our buffer, so storing it for each of them would write the same bytes again); it goes on from there.
    if (c.ch == 0)
      for (int d = 0; d < LL_R; d++)
        if (remote(d, rank)) put_warp(dispatch_route(p.peer[rank], half, rank) + c.t * LL_KMAX, 4 * LL_KMAX, d);
#endif
    if (dmask == 0u) continue;
    // Where the message is stored: each destination on this host, and once this rank's own slot for all
    // destinations on other hosts (their `peers` entry is our buffer; send_msg_chunk puts it from there).
    u32 store = dmask;
#if LL_ENGINE
    u32 away = 0u;
    for (int d = 0; d < LL_R; d++) away |= remote(d, rank) ? 1u << d : 0u;
    store = (dmask & ~away) | ((dmask & away) ? 1u << rank : 0u);
#endif
    // The two payloads in separate loops, so each destination's stores are straight-line code.
    if (fp8) {
      const Fp8Lane q = quantize_fp8_lane(c.v0, c.v1, round, c.valid);
#pragma unroll
      for (int d = 0; d < LL_R; d++)
        if (store >> d & 1u) put_chunk(dispatch_msg(p.peer[d], half, rank, c.t), c, q, true, ue8m0);
    } else if (c.valid) {
#pragma unroll
      for (int d = 0; d < LL_R; d++)
        if (store >> d & 1u) put_chunk(dispatch_msg(p.peer[d], half, rank, c.t), c, Fp8Lane{}, false, false);
    }
#if LL_ENGINE
    for (int d = 0; d < LL_R; d++)
      if ((dmask >> d & 1u) && remote(d, rank))
        send_msg_chunk(dispatch_msg(p.peer[rank], half, rank, c.t), c.ch, fp8, ue8m0, d);
#endif
  }
}

// Where a dispatch's data sits in this rank's buffer: the given half's source slots.
struct PeerDispatchSrc {
  u8 *local;
  int half;
  __device__ __forceinline__ const int *route(int s) const { return dispatch_route(local, half, s); }
  __device__ __forceinline__ const u8 *msg(int s, int t) const { return dispatch_msg(local, half, s, t); }
};

// Dynamic shared memory: 2 * LL_RT words. Receive work: local expert-parts ep = blockIdx.x, +gridDim.x, ...
extern "C" __global__ void __launch_bounds__(LL_THREADS, 2) ll_dispatch(
    const u64 *__restrict__ peers, int *record, int rank, u64 timeout_ns, const u16 *__restrict__ x,
    const void *__restrict__ topk, int T, int K, int flags, u8 *__restrict__ recv_x,
    void *__restrict__ recv_scales, int *__restrict__ recv_count, int *__restrict__ src_info,
    long long *__restrict__ layout_range, u32 *__restrict__ kmask_out, int parts, int phases) {
  const Ctx c{reinterpret_cast<u8 *>(peers[rank]), record, timeout_ns, rank, LL_K_DSEND};
  __shared__ Prologue p;
  const u32 ack = prologue(c, peers, LL_ST_DSEND, LL_ST_DRECV, dispatch_ack(c.local, 0), p);
  if (p.abort != 0u) return;
  const bool stamper = blockIdx.x == 0 && threadIdx.x == 0;

  if (phases & LL_PHASE_SEND) {
    const u32 epoch = p.epoch[0];
    const int half = epoch & 1;
    if (stamper) c.stamp(LL_T_DS_START);
    // Back-pressure: rank d must have finished reading this half from call epoch - 2.
    bool ok = true;
    if (threadIdx.x < LL_R && !seq_reached(ack, epoch - 1))
      ok = wait_reached(c, dispatch_ack(c.local, threadIdx.x), epoch - 1, LL_P_ACK, threadIdx.x);
    if (!__syncthreads_and(ok)) return;
    if (stamper) c.stamp(LL_T_DS_READY);
    dispatch_send_items(p, rank, half, x, topk, T, K, flags);
    complete_puts();
    if (last_block(c, 0)) {
      c.stamp(LL_T_DS_SIGNAL);
      const u64 sig = ((u64)(u32)T << 32) | (u64)(epoch + 1);
      for (int d = 0; d < LL_R; d++) announce(dispatch_signal(p.peer[d], half, rank), sig, d, rank);
      atomicExch(c.state() + LL_ST_DSEND, epoch + 1);
    }
  }

  if (phases & LL_PHASE_RECV) {
    const Ctx cr{c.local, record, timeout_ns, rank, LL_K_DRECV};
    const u32 epoch = p.epoch[1];
    const int half = epoch & 1;
    if (stamper) cr.stamp(LL_T_DR_START);
    __shared__ int s_tokens[LL_R];
    __shared__ int s_count[LL_R];
    __shared__ int s_scan[LL_WARPS];
    extern __shared__ u32 s_dyn[];
    bool ok = true;
    if (threadIdx.x < LL_R) {
      const int s = threadIdx.x;
      u64 sig = 0;
      ok = wait_reached(cr, dispatch_signal(c.local, half, s), epoch + 1, LL_P_SIGNAL, s, &sig);
      s_tokens[s] = (int)(sig >> 32);
    }
    if (!__syncthreads_and(ok)) return;
    if (stamper) cr.stamp(LL_T_DR_READY);
    const bool fp8 = flags & LL_FLAG_FP8, ue8m0 = flags & LL_FLAG_UE8M0;
    for (int ep = blockIdx.x; ep < LL_EL * parts; ep += gridDim.x) {
      dispatch_recv_expert(PeerDispatchSrc{c.local, half}, rank, ep / parts, ep % parts, parts, s_tokens, s_dyn,
                           s_dyn + LL_RT, s_count, s_scan, recv_x, recv_scales, recv_count, src_info,
                           layout_range, kmask_out, fp8, ue8m0);
    }
    if (last_block(cr, 1)) {
      cr.stamp(LL_T_DR_END);
      // Every block is done reading this half: the sources may reuse it (call epoch + 2).
      for (int s = 0; s < LL_R; s++) announce(dispatch_ack(p.peer[s], rank), epoch + 1, s, rank);
      atomicExch(c.state() + LL_ST_DRECV, epoch + 1);
    }
  }
}

// ------------------------------------------------------------------------------------------- combine

// Send phase: each expert-side row goes back to its source rank's slot [token][k] (combine_send_items).
// Receive phase: the k-ordered weighted sum of the token's slots (combine_recv_items).
// Dynamic shared memory: (2 * LL_EL * LL_R + LL_EL + 1) words.

// The owners' combine slots, in the given half of each peer's buffer; an owner on another host gets the
// rows through this rank's outbox (then an NVSHMEM put into its slot).
struct PeerCombineDst {
  u8 *const *peer;
  int half;
  int rank;
  __device__ __forceinline__ u8 *slot(int s, int t, int k) const {
#if LL_ENGINE
    if (remote(s, rank)) return combine_outbox(peer[rank], s, t, k);
#endif
    return combine_slot(peer[s], half, t, k);
  }
  __device__ __forceinline__ void sent(int s, int t, int k, const u8 *staged, size_t offset, size_t bytes) const {
#if LL_ENGINE
    if (remote(s, rank)) put_warp_to(combine_slot(peer[rank], half, t, k) + offset, staged + offset, bytes, s);
#else
    (void)s, (void)t, (void)k, (void)staged, (void)offset, (void)bytes;
#endif
  }
};

// This rank's combine slots of the given half (every expert rank writes the slots of its experts).
struct LocalCombineSrc {
  u8 *local;
  int half;
  __device__ __forceinline__ const u8 *slot(int t, int k, int) const { return combine_slot(local, half, t, k); }
};

extern "C" __global__ void __launch_bounds__(LL_THREADS, 2) ll_combine(
    const u64 *__restrict__ peers, int *record, int rank, u64 timeout_ns, const u16 *__restrict__ x,
    const int *__restrict__ src_info, const long long *__restrict__ layout_range,
    const u32 *__restrict__ kmask, const void *__restrict__ topk, const float *__restrict__ weights,
    u16 *__restrict__ out, int T, int K, int flags, int phases) {
  const Ctx c{reinterpret_cast<u8 *>(peers[rank]), record, timeout_ns, rank, LL_K_CSEND};
  __shared__ Prologue p;
  const u32 ack = prologue(c, peers, LL_ST_CSEND, LL_ST_CRECV, combine_ack(c.local, 0), p);
  if (p.abort != 0u) return;
  const bool stamper = blockIdx.x == 0 && threadIdx.x == 0;

  if (phases & LL_PHASE_SEND) {
    const u32 epoch = p.epoch[0];
    const int half = epoch & 1;
    if (stamper) c.stamp(LL_T_CS_START);
    bool ok = true;
    if (threadIdx.x < LL_R && !seq_reached(ack, epoch - 1))
      ok = wait_reached(c, combine_ack(c.local, threadIdx.x), epoch - 1, LL_P_ACK, threadIdx.x);
    if (!__syncthreads_and(ok)) return;
    if (stamper) c.stamp(LL_T_CS_READY);
    combine_send_items(PeerCombineDst{p.peer, half, rank}, x, src_info, layout_range, kmask);
    complete_puts();
    if (last_block(c, 2)) {
      c.stamp(LL_T_CS_SIGNAL);
      for (int s = 0; s < LL_R; s++) announce(combine_signal(p.peer[s], half, rank), epoch + 1, s, rank);
      atomicExch(c.state() + LL_ST_CSEND, epoch + 1);
    }
  }

  if (phases & LL_PHASE_RECV) {
    const Ctx cr{c.local, record, timeout_ns, rank, LL_K_CRECV};
    const u32 epoch = p.epoch[1];
    const int half = epoch & 1;
    if (stamper) cr.stamp(LL_T_CR_START);
    bool ok = true;
    if (threadIdx.x < LL_R)
      ok = wait_reached(cr, combine_signal(c.local, half, threadIdx.x), epoch + 1, LL_P_SIGNAL, threadIdx.x);
    if (!__syncthreads_and(ok)) return;
    if (stamper) cr.stamp(LL_T_CR_READY);
    combine_recv_items(LocalCombineSrc{c.local, half}, topk, weights, out, T, K, flags & LL_FLAG_IDX64);
    if (last_block(cr, 3)) {
      cr.stamp(LL_T_CR_END);
      for (int s = 0; s < LL_R; s++) announce(combine_ack(p.peer[s], rank), epoch + 1, s, rank);
      atomicExch(c.state() + LL_ST_CRECV, epoch + 1);
    }
  }
}

// --------------------------------------------------------------------------------------------- clean

// One block of 32 threads. A device-side barrier across the ranks (monotonic counters that are never
// reset), then every signal, ack, sequence number and the abort flag are zeroed, then a second barrier
// so no peer writes into us before we are clean. Used after a timeout; ignores the abort flag.
extern "C" __global__ void ll_clean(const u64 *__restrict__ peers, int *record, int rank, u64 timeout_ns) {
  const Ctx c{reinterpret_cast<u8 *>(peers[rank]), record, timeout_ns, rank, LL_K_CLEAN};
  u32 *st = c.state();
  __shared__ u32 s_bar;
  if (threadIdx.x == 0) s_bar = tsep::ld_volatile_u32(st + LL_ST_BAR);
  __syncthreads();
  const u32 bar = s_bar;
  if (!rank_barrier(c, peers, bar + 1)) return;
  for (int i = threadIdx.x; i < 2 * LL_R; i += 32) reinterpret_cast<u64 *>(c.local + LL_OFF_DSIG)[i] = 0;
  for (int i = threadIdx.x; i < LL_R; i += 32) {
    reinterpret_cast<u32 *>(c.local + LL_OFF_DACK)[i] = 0;
    reinterpret_cast<u32 *>(c.local + LL_OFF_CACK)[i] = 0;
  }
  for (int i = threadIdx.x; i < 2 * LL_R; i += 32) reinterpret_cast<u32 *>(c.local + LL_OFF_CSIG)[i] = 0;
  if (threadIdx.x < LL_ST_BAR) st[threadIdx.x] = 0;  // sequence numbers, arrivals, abort, claim
  if (threadIdx.x < 8) reinterpret_cast<volatile int *>(record)[threadIdx.x] = 0;
  __syncthreads();
  if (!rank_barrier(c, peers, bar + 2)) return;
  if (threadIdx.x == 0) atomicExch(st + LL_ST_BAR, bar + 2);
}

// Benchmark gate (one block of 32 threads): spin `spin_ns` (so the host can enqueue what follows while the
// GPU is busy), then a barrier of the ranks, so timed work starts together on every rank.
extern "C" __global__ void ll_gate(const u64 *__restrict__ peers, int *record, int rank, u64 timeout_ns,
                                   u64 spin_ns) {
  const Ctx c{reinterpret_cast<u8 *>(peers[rank]), record, timeout_ns, rank, LL_K_GATE};
  u32 *st = c.state();
  __shared__ u32 s_bar, s_abort;
  if (threadIdx.x == 0) {
    const u64 t0 = tsep::globaltimer_ns();
    while (tsep::globaltimer_ns() - t0 < spin_ns) {
    }
    s_bar = tsep::ld_volatile_u32(st + LL_ST_BAR);
    s_abort = tsep::ld_volatile_u32(st + LL_ST_ABORT);
  }
  __syncthreads();
  if (s_abort != 0u) return;
  if (!rank_barrier(c, peers, s_bar + 1)) return;
  if (threadIdx.x == 0) atomicExch(st + LL_ST_BAR, s_bar + 1);
}
