// Low-latency (decode) dispatch and combine over NVLink, one process per GPU, R <= 8 ranks of one host.
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
    p.epoch[0] = ld_volatile_u32(c.state() + send_word);
    p.epoch[1] = ld_volatile_u32(c.state() + recv_word);
    p.abort = ld_volatile_u32(c.state() + LL_ST_ABORT);
  }
  if (threadIdx.x < LL_R) {
    p.peer[threadIdx.x] = reinterpret_cast<u8 *>(peers[threadIdx.x]);
    v = ld_acquire_u32(first + threadIdx.x);
  }
  __syncthreads();
  return v;
}

// ------------------------------------------------------------------------------------------ dispatch

// Send phase: one warp per (token, 512-channel chunk); each lane owns 16 channels (two 16-byte loads).
#define LL_CHUNK 512

__device__ __forceinline__ void dispatch_send_items(const Prologue &p, int rank, int half, const u16 *x,
                                                    const void *topk, int T, int K, int flags) {
  const bool fp8 = flags & LL_FLAG_FP8, round = flags & LL_FLAG_ROUND, ue8m0 = flags & LL_FLAG_UE8M0;
  const bool idx64 = flags & LL_FLAG_IDX64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = (LL_H + LL_CHUNK - 1) / LL_CHUNK;
  for (int item = blockIdx.x * LL_WARPS + warp; item < T * chunks; item += gridDim.x * LL_WARPS) {
    const int t = item / chunks, ch = item % chunks;
    const int c0 = ch * LL_CHUNK + lane * 16;
    const bool valid = c0 < LL_H;  // LL_H % 16 == 0 (and % 128 == 0 with fp8): all 16 or none
    uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;
    if (valid) {
      v0 = ld_nc_v4(x + (size_t)t * LL_H + c0);
      v1 = ld_nc_v4(x + (size_t)t * LL_H + c0 + 8);
    }
    const int e = lane < K ? load_expert(topk, t * K + lane, idx64) : -1;
    const u32 dmask = __reduce_or_sync(LL_FULL, e >= 0 ? 1u << (e / LL_EL) : 0u);
    if (ch == 0 && lane < LL_KMAX) {
      // The token's routing row goes to every rank (slots past K are -1), so a receiver never reads a
      // stale row from an earlier call.
#pragma unroll
      for (int d = 0; d < LL_R; d++) dispatch_route(p.peer[d], half, rank)[t * LL_KMAX + lane] = e;
    }
    if (dmask == 0u) continue;
    if (fp8) {
      const u32 w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
      float f[16];
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        amax = fmaxf(amax, fmaxf(fabsf(f[2 * i]), fabsf(f[2 * i + 1])));
      }
      // 8 lanes hold one 128-channel block.
      amax = fmaxf(amax, __shfl_xor_sync(LL_FULL, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(LL_FULL, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(LL_FULL, amax, 4));
      const float scale = tsep::fp8_scale(amax, round);
      const float mult = tsep::fp8_mult(scale);
      u32 q[4];
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const u32 lo = tsep::f32x2_to_e4m3x2(__fmul_rn(f[4 * i], mult), __fmul_rn(f[4 * i + 1], mult));
        const u32 hi = tsep::f32x2_to_e4m3x2(__fmul_rn(f[4 * i + 2], mult), __fmul_rn(f[4 * i + 3], mult));
        q[i] = lo | (hi << 16);
      }
      const uint4 qv = make_uint4(q[0], q[1], q[2], q[3]);
      // UE8M0: the four blocks of this chunk are one packed word (block 4j+i in byte i).
      const u32 byte = valid ? (__float_as_uint(scale) >> 23) & 0xffu : 0u;
      const u32 word = __shfl_sync(LL_FULL, byte, 0) | (__shfl_sync(LL_FULL, byte, 8) << 8) |
                       (__shfl_sync(LL_FULL, byte, 16) << 16) | (__shfl_sync(LL_FULL, byte, 24) << 24);
#pragma unroll
      for (int d = 0; d < LL_R; d++) {
        if (!(dmask >> d & 1u)) continue;
        u8 *msg = dispatch_msg(p.peer[d], half, rank, t);
        if (valid) st_v4(msg + c0, qv);
        if (ue8m0) {
          if (lane == 0) reinterpret_cast<u32 *>(msg + LL_H)[ch] = word;
        } else if (valid && (lane & 7) == 0) {
          reinterpret_cast<float *>(msg + LL_H)[c0 / 128] = scale;
        }
      }
    } else if (valid) {
#pragma unroll
      for (int d = 0; d < LL_R; d++) {
        if (!(dmask >> d & 1u)) continue;
        u8 *msg = dispatch_msg(p.peer[d], half, rank, t);
        st_v4(msg + 2 * c0, v0);
        st_v4(msg + 2 * c0 + 16, v1);
      }
    }
  }
}

// Block-wide exclusive prefix of `flag` over threads in order; returns this thread's offset and sets
// `total`. Uses `scratch` (LL_WARPS words of shared memory).
__device__ __forceinline__ int block_exclusive_scan(bool flag, int *scratch, int &total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const u32 ballot = __ballot_sync(LL_FULL, flag);
  const int before = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    int v = lane < LL_WARPS ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(LL_FULL, v, o);
      if (lane >= o) v += n;
    }
    if (lane < LL_WARPS) scratch[lane] = v;  // inclusive
  }
  __syncthreads();
  const int off = (warp ? scratch[warp - 1] : 0) + before;
  total = scratch[LL_WARPS - 1];
  __syncthreads();  // scratch is reused by the next call
  return off;
}

// Receive phase for local expert e, part `part` of `parts` blocks sharing it: every part derives the same
// deterministic row order, then the parts split the copying. `s_list`/`s_kmask`: 2 * LL_RT words of
// dynamic shared memory.
__device__ __forceinline__ void dispatch_recv_expert(
    const Ctx &c, int half, int e, int part, int parts, const int *s_tokens, u32 *s_list, u32 *s_kmask,
    int *s_count, int *s_scan, u8 *recv_x, void *recv_scales, int *recv_count, int *src_info,
    long long *layout_range, u32 *kmask_out, bool fp8, bool ue8m0) {
  const int expert = c.rank * LL_EL + e;
  if (threadIdx.x < LL_R) s_count[threadIdx.x] = 0;
  __syncthreads();
  int total = 0;
  for (int i0 = 0; i0 < LL_RT; i0 += LL_THREADS) {
    const int i = i0 + threadIdx.x;
    const int s = i / LL_TMAX, t = i % LL_TMAX;
    u32 km = 0;
    if (i < LL_RT && t < s_tokens[s]) {
      const int *row = dispatch_route(c.local, half, s) + t * LL_KMAX;
#pragma unroll
      for (int k = 0; k < LL_KMAX; k++) km |= (row[k] == expert ? 1u : 0u) << k;
    }
    int chunk_total;
    const int pos = total + block_exclusive_scan(km != 0u, s_scan, chunk_total);
    if (km != 0u) {
      s_list[pos] = ((u32)s << 16) | (u32)t;
      s_kmask[pos] = km;
      atomicAdd(&s_count[s], 1);
    }
    total += chunk_total;
  }
  __syncthreads();

  if (part == 0 && threadIdx.x == 0) {
    recv_count[e] = total;
    long long begin_row = 0;
    for (int s = 0; s < LL_R; s++) {
      layout_range[e * LL_R + s] = (begin_row << 32) | (long long)s_count[s];
      begin_row += s_count[s];
    }
  }
  for (int j = part * LL_THREADS + threadIdx.x; j < LL_RT; j += parts * LL_THREADS) {
    const bool row = j < total;
    src_info[e * LL_RT + j] = row ? (int)(s_list[j] & 0xffffu) : -1;
    kmask_out[e * LL_RT + j] = row ? s_kmask[j] : 0u;
  }

  // Rows: a warp per (row, 4 KiB chunk), 8 x 16 bytes in flight per lane.
  const int payload = fp8 ? LL_H : 2 * LL_H;
  const int nvec = payload / 16;
  const int chunks = (nvec + 255) / 256;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int item = part * LL_WARPS + warp; item < total * chunks; item += parts * LL_WARPS) {
    const int j = item / chunks, v0 = (item % chunks) * 256;
    const u32 id = s_list[j];
    const u8 *src = dispatch_msg(c.local, half, (int)(id >> 16), (int)(id & 0xffffu));
    u8 *dst = recv_x + ((size_t)e * LL_RT + j) * payload;
    uint4 r[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int v = v0 + u * 32 + lane;
      if (v < nvec) r[u] = ld_v4(src + 16 * (size_t)v);
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int v = v0 + u * 32 + lane;
      if (v < nvec) st_v4(dst + 16 * (size_t)v, r[u]);
    }
  }

  // Scales, column-major [E_l][cols][R*T_max]: consecutive threads write consecutive rows.
  if (fp8) {
    const int cols = ue8m0 ? LL_W : LL_S;
    u32 *out = reinterpret_cast<u32 *>(recv_scales) + (size_t)e * cols * LL_RT;
    for (int i = part * LL_THREADS + threadIdx.x; i < cols * total; i += parts * LL_THREADS) {
      const int b = i / total, j = i % total;
      const u32 id = s_list[j];
      const u8 *msg = dispatch_msg(c.local, half, (int)(id >> 16), (int)(id & 0xffffu));
      out[(size_t)b * LL_RT + j] = reinterpret_cast<const u32 *>(msg + LL_H)[b];
    }
  }
  __syncthreads();  // shared lists are reused for the next expert
}

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
    if (threadIdx.x < LL_R && !reached(ack, epoch - 1))
      ok = wait_reached(c, dispatch_ack(c.local, threadIdx.x), epoch - 1, LL_P_ACK, threadIdx.x);
    if (!__syncthreads_and(ok)) return;
    if (stamper) c.stamp(LL_T_DS_READY);
    dispatch_send_items(p, rank, half, x, topk, T, K, flags);
    if (last_block(c, 0)) {
      c.stamp(LL_T_DS_SIGNAL);
      const u64 sig = ((u64)(u32)T << 32) | (u64)(epoch + 1);
      for (int d = 0; d < LL_R; d++) st_release_u64(dispatch_signal(p.peer[d], half, rank), sig);
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
      dispatch_recv_expert(cr, half, ep / parts, ep % parts, parts, s_tokens, s_dyn, s_dyn + LL_RT, s_count,
                           s_scan, recv_x, recv_scales, recv_count, src_info, layout_range, kmask_out, fp8,
                           ue8m0);
    }
    if (last_block(cr, 1)) {
      cr.stamp(LL_T_DR_END);
      // Every block is done reading this half: the sources may reuse it (call epoch + 2).
      for (int s = 0; s < LL_R; s++) st_release_u32(dispatch_ack(p.peer[s], rank), epoch + 1);
      atomicExch(c.state() + LL_ST_DRECV, epoch + 1);
    }
  }
}

// ------------------------------------------------------------------------------------------- combine

// Send phase: each expert-side row (local expert e, row j < its count) goes to its source rank s into slot
// [token][k] for every top-k slot k of that token that chose e. Rows are split into chunks of
// 32 lanes x 8 vectors (4 KiB) so many warps share a row.
// Receive phase: one thread per (token, 8 channels): acc = +0; for k ascending with a valid expert,
// acc = f32(acc + f32(w * y)); one bf16 rounding at the end (the reference's exact order).
// Dynamic shared memory: (2 * LL_EL * LL_R + LL_EL + 1) words.
#define LL_CCHUNK (32 * 8)

__device__ __forceinline__ void combine_send_items(const Prologue &p, int half, const u16 *x,
                                                   const int *src_info, const long long *layout_range,
                                                   const u32 *kmask) {
  extern __shared__ int s_dyn_i[];
  int *s_begin = s_dyn_i;                   // [LL_EL * LL_R]
  int *s_cnt = s_dyn_i + LL_EL * LL_R;      // [LL_EL * LL_R]
  int *s_pre = s_dyn_i + 2 * LL_EL * LL_R;  // [LL_EL + 1]: first flat row of each expert
  for (int i = threadIdx.x; i < LL_EL * LL_R; i += LL_THREADS) {
    const long long r = layout_range[i];
    s_begin[i] = (int)(r >> 32);
    s_cnt[i] = (int)(r & 0xffffffffll);
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    if (lane == 0) s_pre[0] = 0;
    for (int e0 = 0; e0 < LL_EL; e0 += 32) {
      const int e = e0 + lane;
      int v = 0;
      if (e < LL_EL)
        for (int s = 0; s < LL_R; s++) v += s_cnt[e * LL_R + s];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(LL_FULL, v, o);
        if (lane >= o) v += n;
      }
      if (e < LL_EL) s_pre[e + 1] = carry + v;
      carry += __shfl_sync(LL_FULL, v, 31);
    }
  }
  __syncthreads();

  const int rows = s_pre[LL_EL];
  const int nvec = LL_H / 8;  // 16-byte vectors per bf16 row
  const int chunks = (nvec + LL_CCHUNK - 1) / LL_CCHUNK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int item = blockIdx.x * LL_WARPS + warp; item < rows * chunks; item += gridDim.x * LL_WARPS) {
    const int r = item / chunks, ch = item % chunks;
    int lo = 0, hi = LL_EL;  // expert e with s_pre[e] <= r < s_pre[e + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (s_pre[mid] <= r) lo = mid;
      else hi = mid;
    }
    const int e = lo, j = r - s_pre[e];
    const int t = src_info[e * LL_RT + j];
    const u32 km = kmask[e * LL_RT + j];
    const u16 *src = x + ((size_t)e * LL_RT + j) * LL_H;
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int i = ch * LL_CCHUNK + u * 32 + lane;
      if (i < nvec) v[u] = ld_nc_v4(src + 8 * (size_t)i);
    }
    int s = 0;
    for (int q = 0; q < LL_R; q++)
      if (j >= s_begin[e * LL_R + q] && j < s_begin[e * LL_R + q] + s_cnt[e * LL_R + q]) s = q;
    for (u32 m = km; m != 0u; m &= m - 1u) {
      const int k = __ffs(m) - 1;
      u8 *dst = combine_slot(p.peer[s], half, t, k);
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int i = ch * LL_CCHUNK + u * 32 + lane;
        if (i < nvec) st_v4(dst + 16 * (size_t)i, v[u]);
      }
    }
  }
}

__device__ __forceinline__ void combine_recv_items(const Ctx &c, int half, const void *topk,
                                                   const float *weights, u16 *out, int T, int K, bool idx64) {
  const int nvec = LL_H / 8;
  for (int i = blockIdx.x * LL_THREADS + threadIdx.x; i < T * nvec; i += gridDim.x * LL_THREADS) {
    const int t = i / nvec, v = i % nvec;
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; q++) acc[q] = 0.0f;
#pragma unroll
    for (int k0 = 0; k0 < LL_KMAX; k0 += 8) {
      if (k0 < K) {
        uint4 y[8];
        float w[8];
        bool use[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
          const int k = k0 + u;
          use[u] = k < K && load_expert(topk, t * K + k, idx64) >= 0;
          if (use[u]) {
            w[u] = weights[t * K + k];
            y[u] = ld_v4(combine_slot(c.local, half, t, k) + 16 * (size_t)v);
          }
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
          if (!use[u]) continue;
          const u32 yw[4] = {y[u].x, y[u].y, y[u].z, y[u].w};
#pragma unroll
          for (int q = 0; q < 4; q++) {
            acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(w[u], __uint_as_float(yw[q] << 16)));
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(w[u], __uint_as_float(yw[q] & 0xffff0000u)));
          }
        }
      }
    }
    uint4 o;
    o.x = (u32)tsep::f32_to_bf16(acc[0]) | ((u32)tsep::f32_to_bf16(acc[1]) << 16);
    o.y = (u32)tsep::f32_to_bf16(acc[2]) | ((u32)tsep::f32_to_bf16(acc[3]) << 16);
    o.z = (u32)tsep::f32_to_bf16(acc[4]) | ((u32)tsep::f32_to_bf16(acc[5]) << 16);
    o.w = (u32)tsep::f32_to_bf16(acc[6]) | ((u32)tsep::f32_to_bf16(acc[7]) << 16);
    st_v4(out + (size_t)t * LL_H + 8 * v, o);
  }
}

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
    if (threadIdx.x < LL_R && !reached(ack, epoch - 1))
      ok = wait_reached(c, combine_ack(c.local, threadIdx.x), epoch - 1, LL_P_ACK, threadIdx.x);
    if (!__syncthreads_and(ok)) return;
    if (stamper) c.stamp(LL_T_CS_READY);
    combine_send_items(p, half, x, src_info, layout_range, kmask);
    if (last_block(c, 2)) {
      c.stamp(LL_T_CS_SIGNAL);
      for (int s = 0; s < LL_R; s++) st_release_u32(combine_signal(p.peer[s], half, rank), epoch + 1);
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
    combine_recv_items(cr, half, topk, weights, out, T, K, flags & LL_FLAG_IDX64);
    if (last_block(cr, 3)) {
      cr.stamp(LL_T_CR_END);
      for (int s = 0; s < LL_R; s++) st_release_u32(combine_ack(p.peer[s], rank), epoch + 1);
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
  if (threadIdx.x == 0) s_bar = ld_volatile_u32(st + LL_ST_BAR);
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
    s_bar = ld_volatile_u32(st + LL_ST_BAR);
    s_abort = ld_volatile_u32(st + LL_ST_ABORT);
  }
  __syncthreads();
  if (s_abort != 0u) return;
  if (!rank_barrier(c, peers, s_bar + 1)) return;
  if (threadIdx.x == 0) atomicExch(st + LL_ST_BAR, s_bar + 1);
}
