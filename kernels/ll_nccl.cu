// Low-latency dispatch and combine over NCCL (src/ep/gpu/nccl-low-latency.ts; docs/low-latency.md "Over
// NCCL"). NCCL moves fixed-size blocks between the kernels here, in stream order, so no kernel waits on a
// peer: they pack what a rank sends and unpack what it received. The order of the outputs, the FP8
// quantization and the combine's summation order are ll_core.cuh's, shared with the NVLink kernels, so
// both transports give the same bits (those of the CPU reference).
//
//   ll_nccl_dispatch_pack    quantize each token once into this rank's dispatch block
//   (NCCL all-gather of the blocks)
//   ll_nccl_dispatch_unpack  per local expert: scan every source's routing in (source, token) order, copy
//   ll_nccl_combine_pack     every expert-side row into the block for its owner, at slot [token][k]
//   (NCCL all-to-all of the blocks)
//   ll_nccl_combine_reduce   out[t] = sum_k w[t,k] * y[t,k] (f32, ascending k), from the block of y's rank
//
// A dispatch block (one per source, `block` bytes, from src/ep/gpu/ll-nccl-layout.ts):
//   [0, 4)                   i32 T: tokens of the call
//   [4, 8)                   u32 call tag (src/ep/gpu/ll-nccl-layout.ts callTag): the same on every
//                            rank for one call, so a block left from another call is recognised
//   [LLN_ROUTE, ...)         routing [LL_TMAX][LL_KMAX] i32: the token's expert ids, -1 past K (rows < T)
//   [LLN_MSGS, ...)          LL_TMAX messages of `msg` bytes: the row (H fp8 or 2H bf16), then the FP8
//                            scales (S f32 or W UE8M0 words) at +LL_H, as in the NVLink messages
// A combine block (one per owner): u32 call tag, then [LL_TMAX][LL_KMAX] bf16 rows of LL_H channels from
// LLN_CROWS. A receiving kernel that finds a block of another call reports the first such rank in `stale`
// (host-mapped i32: flag, rank, tag found, 0 dispatch / 1 combine), which the host turns into an error. It
// catches a transfer that ended without that rank's data and one paired with another kind of transfer; a
// rank one call behind that makes the next call is paired by NCCL in order and carries the tag expected.
#include "ll_core.cuh"

#ifndef LLN_ROUTE
// Defaults so the file compiles stand-alone; the library passes the layout's offsets.
#define LLN_ROUTE 128
#define LLN_MSGS 4224
#define LLN_CROWS 128
#endif

#define LLN_CBLOCK (LLN_CROWS + (size_t)LL_TMAX * LL_KMAX * 2 * LL_H)

// Block 0, thread 0, after tags[r] of every rank r were read into shared memory: reports the first rank
// whose block carries another call's tag, unless an earlier kernel reported (the host keeps the first).
__device__ __forceinline__ void report_stale(const u32 *tags, u32 tag, int kind, int *stale) {
  if (blockIdx.x != 0 || threadIdx.x != 0 || tsep::ld_volatile(stale) != 0) return;
  for (int r = 0; r < LL_R; r++) {
    if (tags[r] == tag) continue;
    stale[1] = r;
    stale[2] = (int)tags[r];
    stale[3] = kind;
    __threadfence_system();
    tsep::st_release_sys(stale, 1);
    return;
  }
}

using namespace ll;

// ------------------------------------------------------------------------------------------ dispatch

// One warp per (token, LL_CHUNK channels), as the NVLink send phase, but every token is written once:
// the all-gather gives the whole block to every rank, and each receiver picks its experts' rows.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_dispatch_pack(
    const u16 *__restrict__ x, const void *__restrict__ topk, int T, int K, int flags, u8 *__restrict__ block,
    int msg, u32 tag) {
  const bool fp8 = flags & LL_FLAG_FP8, round = flags & LL_FLAG_ROUND, ue8m0 = flags & LL_FLAG_UE8M0;
  const bool idx64 = flags & LL_FLAG_IDX64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = (LL_H + LL_CHUNK - 1) / LL_CHUNK;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *reinterpret_cast<int *>(block) = T;
    reinterpret_cast<u32 *>(block)[1] = tag;
  }
  int *route = reinterpret_cast<int *>(block + LLN_ROUTE);
  for (int item = blockIdx.x * LL_WARPS + warp; item < T * chunks; item += gridDim.x * LL_WARPS) {
    const SendChunk c = load_send_chunk(item, x, topk, K, idx64);
    // Slots past K are -1, so a receiver matches only the call's experts.
    if (c.ch == 0 && lane < LL_KMAX) route[c.t * LL_KMAX + lane] = c.expert;
    // A token with no expert is read by no one: skip its row.
    if (!__any_sync(LL_FULL, c.expert >= 0)) continue;
    const Fp8Lane q = fp8 ? quantize_fp8_lane(c.v0, c.v1, round, c.valid) : Fp8Lane{};
    put_chunk(block + LLN_MSGS + (size_t)c.t * msg, c, q, fp8, ue8m0);
  }
}

// Where the all-gathered blocks sit: source s's block at s * block.
struct GatheredSrc {
  const u8 *base;
  size_t block;
  int msg_bytes;
  __device__ __forceinline__ const int *route(int s) const {
    return reinterpret_cast<const int *>(base + s * block + LLN_ROUTE);
  }
  __device__ __forceinline__ const u8 *msg(int s, int t) const {
    return base + s * block + LLN_MSGS + (size_t)t * msg_bytes;
  }
};

// Blocks (e, part) of E_l x parts, looping when the grid is smaller; outputs as the NVLink receive phase.
// A source block of another call counts as empty (and is reported). Dynamic shared memory: 2 * LL_RT words.
extern "C" __global__ void __launch_bounds__(LL_THREADS, 2) ll_nccl_dispatch_unpack(
    const u8 *__restrict__ gathered, u64 block, int msg, int rank, int flags, u8 *__restrict__ recv_x,
    void *__restrict__ recv_scales, int *__restrict__ recv_count, int *__restrict__ src_info,
    long long *__restrict__ layout_range, u32 *__restrict__ kmask_out, int parts, u32 tag, int *stale) {
  __shared__ int s_tokens[LL_R];
  __shared__ u32 s_tag[LL_R];
  __shared__ int s_count[LL_R];
  __shared__ int s_scan[LL_WARPS];
  extern __shared__ u32 s_dyn[];
  // Clamped: a block that never arrived (an aborted transfer) must not send the scan out of its rows.
  for (int s = threadIdx.x; s < LL_R; s += LL_THREADS) {
    const u8 *b = gathered + s * block;
    s_tag[s] = reinterpret_cast<const u32 *>(b)[1];
    s_tokens[s] = s_tag[s] == tag ? min(max(*reinterpret_cast<const int *>(b), 0), LL_TMAX) : 0;
  }
  __syncthreads();
  report_stale(s_tag, tag, 0, stale);
  const GatheredSrc src{gathered, (size_t)block, msg};
  const bool fp8 = flags & LL_FLAG_FP8, ue8m0 = flags & LL_FLAG_UE8M0;
  for (int ep = blockIdx.x; ep < LL_EL * parts; ep += gridDim.x) {
    dispatch_recv_expert(src, rank, ep / parts, ep % parts, parts, s_tokens, s_dyn, s_dyn + LL_RT, s_count,
                         s_scan, recv_x, recv_scales, recv_count, src_info, layout_range, kmask_out, fp8, ue8m0);
  }
}

// ------------------------------------------------------------------------------------------- combine

// The all-to-all send blocks: owner s's block, slot [t][k].
struct OwnerBlocksDst {
  u8 *base;
  __device__ __forceinline__ u8 *slot(int s, int t, int k) const {
    return base + (size_t)s * LLN_CBLOCK + LLN_CROWS + ((size_t)t * LL_KMAX + k) * (2 * LL_H);
  }
  // NCCL moves the blocks afterwards.
  __device__ __forceinline__ void sent(int, int, int, const u8 *, size_t, size_t) const {}
};

// Dynamic shared memory: (2 * LL_EL * LL_R + LL_EL + 1) words.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_combine_pack(
    const u16 *__restrict__ x, const int *__restrict__ src_info, const long long *__restrict__ layout_range,
    const u32 *__restrict__ kmask, u8 *__restrict__ blocks, u32 tag) {
  if (blockIdx.x == 0)
    for (int s = threadIdx.x; s < LL_R; s += LL_THREADS) *reinterpret_cast<u32 *>(blocks + (size_t)s * LLN_CBLOCK) = tag;
  combine_send_items(OwnerBlocksDst{blocks}, x, src_info, layout_range, kmask);
}

// The received blocks: slot [t][k] of the block from the rank that owns the slot's expert.
struct ExpertRankSrc {
  const u8 *base;
  __device__ __forceinline__ const u8 *slot(int t, int k, int expert) const {
    return base + (size_t)(expert / LL_EL) * LLN_CBLOCK + LLN_CROWS + ((size_t)t * LL_KMAX + k) * (2 * LL_H);
  }
};

extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_combine_reduce(
    const u8 *__restrict__ blocks, const void *__restrict__ topk, const float *__restrict__ weights,
    u16 *__restrict__ out, int T, int K, int flags, u32 tag, int *stale) {
  if (blockIdx.x == 0) {
    __shared__ u32 s_tag[LL_R];
    for (int r = threadIdx.x; r < LL_R; r += LL_THREADS) s_tag[r] = *reinterpret_cast<const u32 *>(blocks + (size_t)r * LLN_CBLOCK);
    __syncthreads();
    report_stale(s_tag, tag, 1, stale);  // the sums are then wrong, and the call fails
  }
  combine_recv_items(ExpertRankSrc{blocks}, topk, weights, out, T, K, flags & LL_FLAG_IDX64);
}

// ---------------------------------------------------------------------------------------------- gate

// Benchmarks: keeps the GPU busy for `spin_ns` so the host enqueues what follows meanwhile (the NCCL
// path's gate adds a one-word all-reduce after it, which lines the ranks up).
extern "C" __global__ void ll_nccl_spin(u64 spin_ns) {
  const u64 t0 = tsep::globaltimer_ns();
  while (tsep::globaltimer_ns() - t0 < spin_ns) {
  }
}
