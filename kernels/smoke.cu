// Small kernels that exercise the toolchain and the host<->device plumbing (GPU smoke tests, doctor).
#include "common.cuh"

// y = a * x + b, elementwise: every element is checked by the test.
extern "C" __global__ void tsep_axpb(const float *x, float *y, float a, float b, int n) {
  // Explicit roundings (no FMA contraction) so the host can compute the exact expected value.
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    y[i] = __fadd_rn(__fmul_rn(a, x[i]), b);
}

// Does nothing: measures launch overhead.
extern "C" __global__ void tsep_empty() {}

// Publishes `value` into host-mapped memory, then waits (bounded by timeout_ns) until the host
// acknowledges through a second host-mapped word. Proves the host sees a kernel's writes while it runs.
extern "C" __global__ void tsep_signal_and_wait(int *counter, const int *ack, int value, u64 timeout_ns) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  tsep::st_release_sys(counter, value);
  const u64 start = tsep::globaltimer_ns();
  while (tsep::ld_acquire_sys(ack) != value) {
    if (tsep::globaltimer_ns() - start > timeout_ns) {
      tsep::st_release_sys(counter, -1);  // tell the host we gave up
      return;
    }
  }
  tsep::st_release_sys(counter, value + 1);
}

// Number-format conversions, element by element, for bit-exact comparison with the host reference.
extern "C" __global__ void tsep_convert(const float *x, u16 *bf16, u8 *e4m3, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    bf16[i] = tsep::f32_to_bf16(x[i]);
    e4m3[i] = tsep::f32_to_e4m3(x[i]);
  }
}

// Per-row, per-128-channel FP8 quantization (one warp per (row, block)); row-major float scales.
extern "C" __global__ void tsep_quantize_fp8(const float *x, u8 *q, float *scales, int rows, int hidden,
                                             int round_scale) {
  const int blocks = (hidden + 127) / 128;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * blocks) return;
  const int r = warp / blocks, b = warp % blocks;
  const int c0 = b * 128, n = min(128, hidden - c0);
  const float *src = x + (size_t)r * hidden + c0;
  float amax = 0.0f;
  for (int i = lane; i < n; i += 32) amax = fmaxf(amax, fabsf(src[i]));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = tsep::fp8_scale(amax, round_scale != 0);
  const float mult = tsep::fp8_mult(scale);
  for (int i = lane; i < n; i += 32) q[(size_t)r * hidden + c0 + i] = tsep::fp8_quantize(src[i], mult);
  if (lane == 0) scales[(size_t)r * blocks + b] = scale;
}
