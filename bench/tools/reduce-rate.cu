// Diagnostic tool (bench/RESULTS.md, fifth session of 2026-11-29): how fast the real tsep_combine_reduce
// (kernels/normal.cu) sums the EP4 standard shape on one GPU, per SM count, with every row already in
// place (the NCCL transport's mode: no chunk waits). Rank 0 of 4; its 4096 tokens each went to the ranks
// holding any of their top-8 of 256 experts (64 per rank), so a token sums 1–4 rows (≈3.6): its own rank's
// row from x, the others' from the stage. Says how many SMs the reduce needs to keep pace with a combine
// send at a given rate, which sets TSEP_NORMAL_REDUCE_PCT. One GPU; build once per unroll:
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels -DTSEP_UNROLL=8 -o /tmp/reduce-rate bench/tools/reduce-rate.cu
//   /tmp/reduce-rate
#define TSEP_R 4
#define TSEP_EL 64
#define TSEP_H 7168
#define TSEP_ELT 2
#define TSEP_SW 0
#define TSEP_K 8
#define TSEP_IDX64 0
#define TSEP_WEIGHTS 1
#define TSEP_TMAX 4096
#include "normal.cu"
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e = (x);                                                                        \
    if (e != cudaSuccess) {                                                                     \
      printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);                  \
      exit(1);                                                                                  \
    }                                                                                           \
  } while (0)

int main() {
  const int T = 4096, E = 256, me = 0;
  std::mt19937 rng(7);
  // Routing of rank 0's tokens: in_rank[t][r], and each token's position among those sent to r.
  std::vector<unsigned char> in_rank(T * R);
  std::vector<int> pos(T * R), cnt(R, 0);
  long long rows_summed = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<int> all(E);
    for (int e = 0; e < E; ++e) all[e] = e;
    std::shuffle(all.begin(), all.end(), rng);
    bool in[R] = {};
    for (int k = 0; k < 8; ++k) in[all[k] / EL] = true;
    for (int r = 0; r < R; ++r) {
      in_rank[t * R + r] = in[r];
      pos[t * R + r] = in[r] ? cnt[r]++ : -1;
      rows_summed += in[r];
    }
  }
  // Stage: rank r's rows at row_base[r] = r·T; x holds this rank's own block first (own_start = 0).
  const size_t row = (size_t)H * 2, stage_rows = (size_t)R * T;
  const size_t a_x = 0, a_w = a_x + stage_rows * row, bytes = a_w + stage_rows * K * 4;
  u8 *buf, *x, *flush;
  float *own_w, *out_w;
  u16 *out;
  int *sp, *rb, *prefix, *abort_word;
  unsigned char *ir;
  u64 *peers;
  tsep::ErrorRecord *rec;
  CK(cudaMalloc(&buf, bytes));
  CK(cudaMemset(buf, 0x3c, bytes));  // bf16 0x3c3c ≈ 0.0115: finite sums
  CK(cudaMalloc(&x, (size_t)cnt[me] * row));
  CK(cudaMemset(x, 0x3b, (size_t)cnt[me] * row));
  CK(cudaMalloc(&own_w, (size_t)cnt[me] * K * 4));
  CK(cudaMemset(own_w, 0, (size_t)cnt[me] * K * 4));
  CK(cudaMalloc(&out, (size_t)T * row));
  CK(cudaMalloc(&out_w, (size_t)T * K * 4));
  CK(cudaMalloc(&sp, (size_t)T * R * 4));
  CK(cudaMemcpy(sp, pos.data(), (size_t)T * R * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&ir, (size_t)T * R));
  CK(cudaMemcpy(ir, in_rank.data(), (size_t)T * R, cudaMemcpyHostToDevice));
  std::vector<int> base(R);
  for (int r = 0; r < R; ++r) base[r] = r * T;
  CK(cudaMalloc(&rb, R * 4));
  CK(cudaMemcpy(rb, base.data(), R * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&prefix, R * R * 4));
  CK(cudaMemset(prefix, 0, R * R * 4));
  CK(cudaMalloc(&abort_word, 64));
  CK(cudaMemset(abort_word, 0, 64));
  CK(cudaMalloc(&rec, sizeof(tsep::ErrorRecord)));
  CK(cudaMemset(rec, 0, sizeof(tsep::ErrorRecord)));
  const u64 self = (u64)buf;
  CK(cudaMalloc(&peers, 8 * R));
  for (int r = 0; r < R; ++r) CK(cudaMemcpy(peers + r, &self, 8, cudaMemcpyHostToDevice));
  const size_t flush_bytes = 256u << 20;
  CK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const Areas areas{a_x, 0, 0, 0, a_w, 0, 0};  // combine_chunks 0: no waits (rows in place)
  const double read_bytes = (double)rows_summed * row, write_bytes = (double)T * row;
  const int u_all = std::min(2 * TSEP_UNROLL, 16), u = std::max(2, u_all / R);  // the reduce's step (normal.cu)
  printf("UNROLL %d (U = %d): rank 0 of 4 sums %lld rows for %d tokens (%.2f per token): %.1f MB read, %.1f MB written\n",
         TSEP_UNROLL, u, rows_summed, T, (double)rows_summed / T, read_bytes / 1e6, write_bytes / 1e6);
  for (int sms : {4, 6, 8, 12, 16, 24}) {
    std::vector<float> ts;
    for (int rep = 0; rep < 21; ++rep) {
      CK(cudaMemset(flush, rep, flush_bytes));  // L2 flush: the rows come from HBM, as after a send
      CK(cudaEventRecord(e0));
      tsep_combine_reduce<<<sms, 512>>>(peers, me, T, ir, nullptr, nullptr, out, out_w, sp, rb, prefix, areas, 1, x,
                                        own_w, 0, rec, abort_word);
      CK(cudaGetLastError());
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (rep > 0) ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    const double us = ts[ts.size() / 2] * 1e3;
    printf("reduce SMs %2d: %7.1f us  read %6.1f GB/s (%5.1f per SM)  read+write %6.1f GB/s\n", sms, us,
           read_bytes / us / 1e3, read_bytes / us / 1e3 / sms, (read_bytes + write_bytes) / us / 1e3);
    fflush(stdout);
  }
  return 0;
}
