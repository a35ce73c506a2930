// Dispatch layout: from top-k expert ids [T, K] (-1 = none), the tokens per rank (deduplicated), the
// tokens per expert and the token -> rank map. One block, shared-memory histograms; no host sync.
// -D TSEP_R ranks, TSEP_EL experts per rank, TSEP_IDX64 (int64 ids). K is a run-time argument so one
// compiled kernel serves every top-k width.
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

extern "C" __global__ void __launch_bounds__(1024) tsep_layout(const idx_t *topk, int num_tokens, int k,
                                                                int *per_rank, int *per_expert, u8 *in_rank) {
  __shared__ int hist_e[E];
  __shared__ int hist_r[R];
  for (int i = threadIdx.x; i < E; i += blockDim.x) hist_e[i] = 0;
  if (threadIdx.x < R) hist_r[threadIdx.x] = 0;
  __syncthreads();
  for (int t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    unsigned mask = 0;
    for (int j = 0; j < k; ++j) {
      const long long e = topk[(size_t)t * k + j];
      if (e >= 0 && e < E) {
        atomicAdd(&hist_e[e], 1);
        mask |= 1u << (int)(e / EL);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int hit = (mask >> r) & 1;
      in_rank[(size_t)t * R + r] = (u8)hit;
      if (hit) atomicAdd(&hist_r[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < E; i += blockDim.x) per_expert[i] = hist_e[i];
  if (threadIdx.x < R) per_rank[threadIdx.x] = hist_r[threadIdx.x];
}
