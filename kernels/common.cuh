// Device-side building blocks shared by every tsep kernel. Header-free on purpose (no cuda_bf16.h or
// cuda_fp8.h), so NVRTC needs no include path: number formats are done with PTX conversions that match
// the host reference in src/device/dtypes.ts bit for bit.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

namespace tsep {

// ---------------------------------------------------------------- number formats

// float32 -> bf16, round to nearest even (NaN stays NaN).
__device__ __forceinline__ u16 f32_to_bf16(float x) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}

// bf16 -> float32 (exact), from the low or the high half of a word holding two.
__device__ __forceinline__ float bf16_lo_f32(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi_f32(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Two float32 -> two fp8 e4m3 (lo in the low byte), round to nearest even, saturating to +-448.
__device__ __forceinline__ u16 f32x2_to_e4m3x2(float lo, float hi) {
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ u8 f32_to_e4m3(float x) { return (u8)(f32x2_to_e4m3x2(x, 0.0f) & 0xff); }

// Rounds a positive normal float up to a power of two (itself if it is one).
__device__ __forceinline__ float ceil_pow2(float x) {
  u32 b = __float_as_uint(x);
  if (b & 0x007fffffu) b = (b & 0xff800000u) + 0x00800000u;
  return __uint_as_float(b);
}

// The FP8 block scale from a block's max |x|: amax floor 1e-4, scale = amax / 448 (IEEE divide),
// optionally a power of two. Mirrors quantizeFp8Block on the host.
__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
  float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  return round_scale ? ceil_pow2(s) : s;
}

// The multiplier applied before the e4m3 conversion: 1/scale rounded to float32.
__device__ __forceinline__ float fp8_mult(float scale) { return __frcp_rn(scale); }

__device__ __forceinline__ u8 fp8_quantize(float x, float mult) { return f32_to_e4m3(__fmul_rn(x, mult)); }

// ---------------------------------------------------------------- memory ordering

// Stores and loads that other GPUs or the host observe: system scope, no caching in L1.
__device__ __forceinline__ void st_release_sys(int *p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys_u32(u32 *p, u32 v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys_u64(u64 *p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_sys(const int *p) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_acquire_sys_u32(const u32 *p) {
  u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u64 ld_acquire_sys_u64(const u64 *p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_relaxed_sys_u32(const u32 *p) {
  u32 v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u64 ld_relaxed_sys_u64(const u64 *p) {
  u64 v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_sys_u32(u32 *p, u32 v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_sys_u64(u64 *p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_sys(int *p, int v) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_volatile(const int *p) {
  int v;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_volatile_u32(const u32 *p) {
  u32 v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void fence_sc_sys() { asm volatile("fence.sc.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// "a is at or past b" for wrapping u32 sequence numbers (numbers may pass 2^32).
__device__ __forceinline__ bool seq_reached(u32 a, u32 b) { return (int)(a - b) >= 0; }

// ---------------------------------------------------------------- block scan

// Block-wide exclusive prefix of `flag` over threads in order (blockDim.x a multiple of 32, at most 1024);
// returns this thread's offset and sets `total`. Every thread calls it. Uses `scratch`, one int of shared
// memory per warp.
__device__ __forceinline__ int block_exclusive_scan(bool flag, int *scratch, int &total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const u32 ballot = __ballot_sync(0xffffffffu, flag);
  const int before = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    int v = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += n;
    }
    if (lane < warps) scratch[lane] = v;  // inclusive
  }
  __syncthreads();
  const int off = (warp ? scratch[warp - 1] : 0) + before;
  total = scratch[warps - 1];
  __syncthreads();  // scratch is reused by the next call
  return off;
}

// Nanosecond clock shared by all SMs, for bounded waits.
__device__ __forceinline__ u64 globaltimer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace tsep
