// Dispatch layout: from top-k expert ids [T, K] (-1 = none), the tokens per rank (deduplicated), the
// tokens per expert and the token -> rank map; no host sync.
// -D TSEP_R ranks, TSEP_EL experts per rank, TSEP_IDX64 (int64 ids), TSEP_LAYOUT_THREADS threads per block,
// TSEP_LAYOUT_TILE tokens per tile. K is a run-time argument so one
// compiled kernel serves every top-k width.
//
// Blocks take tiles of LAYOUT_TILE tokens (one id per thread at top-8), so a 4096-token call spreads over
// 128 blocks and each thread waits for one global load: a single block reading token rows was bound by
// the latency of its serial loads (≈16 µs for 4096×8 int64 ids). Each block counts in shared memory, adds
// its non-zero counts to `acc` (global atomics), and the last block to arrive copies `acc` to the outputs
// and zeroes it and the arrival counter for the next launch (so graph replays work too).
#include "common.cuh"

#ifndef TSEP_R
#define TSEP_R 2
#endif
#ifndef TSEP_EL
#define TSEP_EL 4
#endif
#ifndef TSEP_IDX64
#define TSEP_IDX64 1
#endif

#if TSEP_IDX64
typedef long long idx_t;
#else
typedef int idx_t;
#endif

constexpr int R = TSEP_R;
constexpr int EL = TSEP_EL;
constexpr int E = R * EL;
#ifndef TSEP_LAYOUT_THREADS
// Defaults so the file compiles stand-alone; src/ep/gpu/normal-kernels.ts passes the values it launches with.
#define TSEP_LAYOUT_THREADS 256
#define TSEP_LAYOUT_TILE 32
#endif
constexpr int LAYOUT_THREADS = TSEP_LAYOUT_THREADS;
constexpr int LAYOUT_TILE = TSEP_LAYOUT_TILE;
static_assert(R <= 32, "the token's rank mask is 32 bits");

// acc: [E + R] i32 then the u32 arrival counter, all zero between launches.
extern "C" __global__ void __launch_bounds__(LAYOUT_THREADS) tsep_layout(const idx_t *topk, int num_tokens, int k,
                                                                         int *per_rank, int *per_expert, u8 *in_rank,
                                                                         int *acc) {
  __shared__ int hist[E + R];  // experts, then ranks
  __shared__ unsigned mask[LAYOUT_TILE];
  __shared__ bool last;
  for (int i = threadIdx.x; i < E + R; i += blockDim.x) hist[i] = 0;
  const int tiles = (num_tokens + LAYOUT_TILE - 1) / LAYOUT_TILE;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int t0 = tile * LAYOUT_TILE;
    const int n = min(LAYOUT_TILE, num_tokens - t0);
    if (threadIdx.x < LAYOUT_TILE) mask[threadIdx.x] = 0;
    __syncthreads();
    const idx_t *ids = topk + (size_t)t0 * k;
    for (int i = threadIdx.x; i < n * k; i += blockDim.x) {
      const long long e = ids[i];
      if (e >= 0 && e < E) {
        atomicAdd(&hist[e], 1);
        atomicOr(&mask[i / k], 1u << (int)(e / EL));
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n * R; j += blockDim.x) {
      const int hit = (mask[j / R] >> (j % R)) & 1;
      in_rank[(size_t)t0 * R + j] = (u8)hit;
      if (hit) atomicAdd(&hist[E + j % R], 1);
    }
    __syncthreads();  // the mask is cleared for the next tile
  }
  __syncthreads();
  for (int i = threadIdx.x; i < E + R; i += blockDim.x)
    if (hist[i] != 0) atomicAdd(acc + i, hist[i]);
  __threadfence();
  __syncthreads();
  unsigned *arrived = reinterpret_cast<unsigned *>(acc + E + R);
  if (threadIdx.x == 0) last = atomicAdd(arrived, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < E + R; i += blockDim.x) {
    const int sum = __ldcg(acc + i);
    if (i < E) per_expert[i] = sum;
    else per_rank[i - E] = sum;
    acc[i] = 0;
  }
  if (threadIdx.x == 0) *arrived = 0u;
}
