// The transport-independent parts of the low-latency kernels, shared by the NVLink kernels
// (kernels/low_latency.cu) and the NCCL ones (kernels/ll_nccl.cu), so both produce the same bits: the FP8
// quantization of a token row, the deterministic receive order (per local expert: source rank ascending,
// then token ascending) and the combine's summation order. Where the data sits differs per transport, so
// the routines that read or write it take an accessor (a small struct with the address functions).
#pragma once
#include "common.cuh"

#ifndef LL_R
// Defaults so the file compiles stand-alone (scripts/check-kernels.sh); the library always passes all.
#define LL_R 4
#define LL_EL 72
#define LL_H 7168
#define LL_TMAX 128
#define LL_KMAX 8
#endif

#define LL_THREADS 512
#define LL_WARPS (LL_THREADS / 32)
#define LL_E (LL_R * LL_EL)
#define LL_RT (LL_R * LL_TMAX)
#define LL_S ((LL_H + 127) / 128)
#define LL_W ((LL_S + 3) / 4)
#define LL_FULL 0xffffffffu

// Per-call flags (kernel argument `flags`).
#define LL_FLAG_FP8 1
#define LL_FLAG_ROUND 2
#define LL_FLAG_UE8M0 4
#define LL_FLAG_IDX64 8

// Dispatch send: one warp per (token, 512-channel chunk); each lane owns 16 channels (two 16-byte loads).
#define LL_CHUNK 512
// Combine send: rows are split into chunks of 32 lanes x 8 vectors (4 KiB) so many warps share a row.
#define LL_CCHUNK (32 * 8)

namespace ll {

// Read-only 16-byte load of an input that no one writes while the kernel runs.
__device__ __forceinline__ uint4 ld_nc_v4(const void *p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Plain 16-byte load of data peers wrote (ordered by an earlier acquire + barrier, or by the stream).
__device__ __forceinline__ uint4 ld_v4(const void *p) { return *reinterpret_cast<const uint4 *>(p); }
__device__ __forceinline__ void st_v4(void *p, uint4 v) { *reinterpret_cast<uint4 *>(p) = v; }

__device__ __forceinline__ int load_expert(const void *topk, int i, bool idx64) {
  long long e = idx64 ? reinterpret_cast<const long long *>(topk)[i] : reinterpret_cast<const int *>(topk)[i];
  return (e >= 0 && e < LL_E) ? (int)e : -1;
}

// ------------------------------------------------------------------------------------------ dispatch

// A dispatch send item: a warp's token t and chunk ch of LL_CHUNK channels. Each lane holds 16 channels
// (`valid`: it has any; LL_H % 16 == 0, and % 128 == 0 with fp8, so all 16 or none) and the token's expert
// of top-k slot `lane` (-1 past K, for -1 and for ids out of range).
struct SendChunk {
  int t, ch, c0;
  bool valid;
  uint4 v0, v1;
  int expert;
};

__device__ __forceinline__ SendChunk load_send_chunk(int item, const u16 *x, const void *topk, int K,
                                                     bool idx64) {
  const int lane = threadIdx.x % 32;
  const int chunks = (LL_H + LL_CHUNK - 1) / LL_CHUNK;
  SendChunk c;
  c.t = item / chunks;
  c.ch = item % chunks;
  c.c0 = c.ch * LL_CHUNK + lane * 16;
  c.valid = c.c0 < LL_H;
  c.v0 = make_uint4(0, 0, 0, 0);
  c.v1 = c.v0;
  if (c.valid) {
    c.v0 = ld_nc_v4(x + (size_t)c.t * LL_H + c.c0);
    c.v1 = ld_nc_v4(x + (size_t)c.t * LL_H + c.c0 + 8);
  }
  c.expert = lane < K ? load_expert(topk, c.t * K + lane, idx64) : -1;
  return c;
}

// One lane's 16 channels quantized to e4m3 (`q`), the scale of its 128-channel block, and the UE8M0 word
// of the warp's four blocks (block 4j+i in byte i, the reference's packing; every lane gets it).
struct Fp8Lane {
  uint4 q;
  float scale;
  u32 word;
};

// Every lane of the warp must call it (shuffles): the 8 lanes of a 128-channel block reduce `amax`, then
// each lane quantizes with the host's fp8_scale / fp8_mult / e4m3 conversion. `valid`: the lane holds
// channels (an invalid lane's zeros count toward nothing but its own block, and its UE8M0 byte is 0).
__device__ __forceinline__ Fp8Lane quantize_fp8_lane(uint4 v0, uint4 v1, bool round, bool valid) {
  const u32 w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
  float f[16];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; i++) {
    f[2 * i] = tsep::bf16_lo_f32(w[i]);
    f[2 * i + 1] = tsep::bf16_hi_f32(w[i]);
    amax = fmaxf(amax, fmaxf(fabsf(f[2 * i]), fabsf(f[2 * i + 1])));
  }
  // 8 lanes hold one 128-channel block.
  amax = fmaxf(amax, __shfl_xor_sync(LL_FULL, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(LL_FULL, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(LL_FULL, amax, 4));
  Fp8Lane out;
  out.scale = tsep::fp8_scale(amax, round);
  const float mult = tsep::fp8_mult(out.scale);
  u32 q[4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const u32 lo = tsep::f32x2_to_e4m3x2(__fmul_rn(f[4 * i], mult), __fmul_rn(f[4 * i + 1], mult));
    const u32 hi = tsep::f32x2_to_e4m3x2(__fmul_rn(f[4 * i + 2], mult), __fmul_rn(f[4 * i + 3], mult));
    q[i] = lo | (hi << 16);
  }
  out.q = make_uint4(q[0], q[1], q[2], q[3]);
  // UE8M0: the four blocks of this chunk are one packed word (block 4j+i in byte i).
  const u32 byte = valid ? (__float_as_uint(out.scale) >> 23) & 0xffu : 0u;
  out.word = __shfl_sync(LL_FULL, byte, 0) | (__shfl_sync(LL_FULL, byte, 8) << 8) |
             (__shfl_sync(LL_FULL, byte, 16) << 16) | (__shfl_sync(LL_FULL, byte, 24) << 24);
  return out;
}

// Writes a lane's part of a send item into a message (the row, then the FP8 scales at +LL_H): the e4m3
// channels and the f32 scale of their 128-channel block (one lane of 8) or the chunk's UE8M0 word (lane 0);
// bf16 channels as they are.
__device__ __forceinline__ void put_chunk(u8 *msg, const SendChunk &c, const Fp8Lane &q, bool fp8, bool ue8m0) {
  const int lane = threadIdx.x % 32;
  if (fp8) {
    if (c.valid) st_v4(msg + c.c0, q.q);
    if (ue8m0) {
      if (lane == 0) reinterpret_cast<u32 *>(msg + LL_H)[c.ch] = q.word;
    } else if (c.valid && (lane & 7) == 0) {
      reinterpret_cast<float *>(msg + LL_H)[c.c0 / 128] = q.scale;
    }
  } else if (c.valid) {
    st_v4(msg + 2 * c.c0, c.v0);
    st_v4(msg + 2 * c.c0 + 16, c.v1);
  }
}

// Dispatch receive for local expert e of rank `rank`, part `part` of `parts` blocks sharing it: every part
// derives the same deterministic row order, then the parts split the copying. `src` says where the
// received data sits: `src.route(s)` is source s's routing table [LL_TMAX][LL_KMAX], `src.msg(s, t)` its
// message for token t (the row, then the scales at +LL_H). `s_tokens[s]`: tokens source s sent.
// `s_list`/`s_kmask`: 2 * LL_RT words of dynamic shared memory.
template <typename Src>
__device__ __forceinline__ void dispatch_recv_expert(const Src &src, int rank, int e, int part, int parts,
                                                     const int *s_tokens, u32 *s_list, u32 *s_kmask,
                                                     int *s_count, int *s_scan, u8 *recv_x, void *recv_scales,
                                                     int *recv_count, int *src_info, long long *layout_range,
                                                     u32 *kmask_out, bool fp8, bool ue8m0) {
  const int expert = rank * LL_EL + e;
  if (threadIdx.x < LL_R) s_count[threadIdx.x] = 0;
  __syncthreads();
  int total = 0;
  for (int i0 = 0; i0 < LL_RT; i0 += LL_THREADS) {
    const int i = i0 + threadIdx.x;
    const int s = i / LL_TMAX, t = i % LL_TMAX;
    u32 km = 0;
    if (i < LL_RT && t < s_tokens[s]) {
      const int *row = src.route(s) + t * LL_KMAX;
#pragma unroll
      for (int k = 0; k < LL_KMAX; k++) km |= (row[k] == expert ? 1u : 0u) << k;
    }
    int chunk_total;
    const int pos = total + tsep::block_exclusive_scan(km != 0u, s_scan, chunk_total);
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
    const u8 *msg = src.msg((int)(id >> 16), (int)(id & 0xffffu));
    u8 *dst = recv_x + ((size_t)e * LL_RT + j) * payload;
    uint4 r[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int v = v0 + u * 32 + lane;
      if (v < nvec) r[u] = ld_v4(msg + 16 * (size_t)v);
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
      const u8 *msg = src.msg((int)(id >> 16), (int)(id & 0xffffu));
      out[(size_t)b * LL_RT + j] = reinterpret_cast<const u32 *>(msg + LL_H)[b];
    }
  }
  __syncthreads();  // shared lists are reused for the next expert
}

// ------------------------------------------------------------------------------------------- combine

// Combine send: each expert-side row (local expert e, row j < its count) goes to its source rank s into
// `dst.slot(s, t, k)` for every top-k slot k of that token that chose e (the dispatch's k mask; a
// duplicated expert fills both slots, like the reference); then `dst.sent(s, t, k, slot, offset, bytes)`
// (every lane) for the chunk just written. Dynamic shared memory:
// (2 * LL_EL * LL_R + LL_EL + 1) words.
template <typename Dst>
__device__ __forceinline__ void combine_send_items(const Dst &dst, const u16 *x, const int *src_info,
                                                   const long long *layout_range, const u32 *kmask) {
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
      u8 *out = dst.slot(s, t, k);
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int i = ch * LL_CCHUNK + u * 32 + lane;
        if (i < nvec) st_v4(out + 16 * (size_t)i, v[u]);
      }
      // The chunk's bytes of the row are written: a transport that staged them sends them on.
      const int first = ch * LL_CCHUNK;
      dst.sent(s, t, k, out, 16 * (size_t)first, 16 * (size_t)(min(nvec, first + LL_CCHUNK) - first));
    }
  }
}

// Combine reduce, one thread per (token, 8 channels): acc = +0; for k ascending with a valid expert,
// acc = f32(acc + f32(w * y)); one bf16 rounding at the end (the reference's exact order and roundings).
// `src.slot(t, k, expert)` is where the row of slot (t, k), from the rank of `expert`, arrived.
template <typename Src>
__device__ __forceinline__ void combine_recv_items(const Src &src, const void *topk, const float *weights,
                                                   u16 *out, int T, int K, bool idx64) {
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
          int expert = -1;
          use[u] = k < K && (expert = load_expert(topk, t * K + k, idx64)) >= 0;
          if (use[u]) {
            w[u] = weights[t * K + k];
            y[u] = ld_v4(src.slot(t, k, expert) + 16 * (size_t)v);
          }
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
          if (!use[u]) continue;
          const u32 yw[4] = {y[u].x, y[u].y, y[u].z, y[u].w};
#pragma unroll
          for (int q = 0; q < 4; q++) {
            acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(w[u], tsep::bf16_lo_f32(yw[q])));
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(w[u], tsep::bf16_hi_f32(yw[q])));
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

}  // namespace ll
