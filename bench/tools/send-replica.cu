// Diagnostic tool (bench/RESULTS.md, 2026-11-28 regression diagnosis): the real tsep_dispatch_send
// (kernels/normal.cu, EP4 FP8 standard shape, no chunk announcements) in a one-process peer-access
// harness, with the rank's abort word in device memory or in host-mapped memory: is the kernel slow, or
// its surroundings? Build and run on a 4-GPU machine: nvcc -O3 -arch=sm_90a -std=c++17 -I kernels
// -o /tmp/send-replica bench/tools/send-replica.cu && /tmp/send-replica
#define TSEP_R 4
#define TSEP_EL 64
#define TSEP_H 7168
#define TSEP_ELT 1
#define TSEP_SW 56
#define TSEP_K 8
#define TSEP_IDX64 1
#define TSEP_WEIGHTS 1
#define TSEP_TMAX 4096
#include "normal.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); exit(1); } } while (0)

int main() {
  int G; CK(cudaGetDeviceCount(&G)); if (G != 4) { printf("needs 4 GPUs\n"); return 1; }
  const int T = 4096, E = 256, EL = 64;
  const size_t rows = (size_t)R * T;
  const size_t ax = 65536, asc = ax + rows * H * 2, asi = asc + rows * 56 * 4, atk = asi + rows * 4, aw = atk + rows * 8 * 8, bytes = aw + rows * 8 * 4;
  Areas areas{ax, asc, asi, atk, aw, 0, 0};  // no chunk words: the push alone
  std::vector<char *> buf(G), x(G), sc(G), wt(G); std::vector<long long *> tk(G); std::vector<int *> sp(G), pre(G); std::vector<u64 *> peers(G);
  std::vector<tsep::ErrorRecord *> rec(G);
  std::vector<int *> abortd(G), aborth(G); std::vector<cudaStream_t> st(G); std::vector<cudaEvent_t> e0(G), e1(G);
  std::mt19937 rng(1);
  // per-GPU routing; counts -> prefix matrix
  std::vector<std::vector<int>> pos(G, std::vector<int>(T * R)); std::vector<std::vector<long long>> ids(G, std::vector<long long>(T * 8));
  int cnt[4][4] = {};
  for (int g = 0; g < G; ++g) for (int t = 0; t < T; ++t) {
    std::vector<int> all(E); for (int e = 0; e < E; ++e) all[e] = e; std::shuffle(all.begin(), all.end(), rng);
    bool in[4] = {}; for (int k = 0; k < 8; ++k) { ids[g][t * 8 + k] = all[k]; in[all[k] / EL] = true; }
    for (int r = 0; r < R; ++r) pos[g][t * R + r] = in[r] ? cnt[g][r]++ : -1;
  }
  int prefix[4][4]; for (int d = 0; d < R; ++d) { int acc = 0; for (int s = 0; s < R; ++s) { acc += cnt[s][d]; prefix[s][d] = acc; } }
  double total = 0, remote = 0; for (int s = 0; s < R; ++s) for (int d = 0; d < R; ++d) { total += cnt[s][d]; if (s != d) remote += cnt[s][d]; }
  for (int g = 0; g < G; ++g) {
    CK(cudaSetDevice(g)); for (int h = 0; h < G; ++h) if (h != g) CK(cudaDeviceEnablePeerAccess(h, 0));
    CK(cudaStreamCreateWithFlags(&st[g], cudaStreamNonBlocking)); CK(cudaEventCreate(&e0[g])); CK(cudaEventCreate(&e1[g]));
    CK(cudaMalloc(&buf[g], bytes)); CK(cudaMemset(buf[g], 0, bytes));
    CK(cudaMalloc(&x[g], (size_t)T * H)); CK(cudaMemset(x[g], g + 1, (size_t)T * H));
    CK(cudaMalloc(&sc[g], (size_t)T * 56 * 4)); CK(cudaMemset(sc[g], 0, (size_t)T * 56 * 4));
    CK(cudaMalloc(&wt[g], (size_t)T * 8 * 4)); CK(cudaMemset(wt[g], 0, (size_t)T * 8 * 4));
    CK(cudaMalloc(&tk[g], (size_t)T * 8 * 8)); CK(cudaMemcpy(tk[g], ids[g].data(), (size_t)T * 64, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&sp[g], (size_t)T * R * 4)); CK(cudaMemcpy(sp[g], pos[g].data(), (size_t)T * R * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&pre[g], 64)); CK(cudaMemcpy(pre[g], prefix, 64, cudaMemcpyHostToDevice));
    CK(cudaHostAlloc(&rec[g], 64, cudaHostAllocMapped)); memset(rec[g], 0, 64);
    CK(cudaMalloc(&abortd[g], 64)); CK(cudaMemset(abortd[g], 0, 64));
    CK(cudaHostAlloc(&aborth[g], 64, cudaHostAllocMapped)); memset(aborth[g], 0, 64);
    CK(cudaMalloc(&peers[g], 64));
  }
  std::vector<u64> ptab(G); for (int g = 0; g < G; ++g) ptab[g] = (u64)buf[g];
  for (int g = 0; g < G; ++g) { CK(cudaSetDevice(g)); CK(cudaMemcpy(peers[g], ptab.data(), 8 * G, cudaMemcpyHostToDevice)); }
  printf("rows received per GPU %.0f, remote rows per GPU %.0f, bytes/row %d\n", total / G, remote / G, H + 224);
  auto run = [&](int sms, int threads, bool hosterr) {
    std::vector<float> ts;
    for (int rep = 0; rep < 8; ++rep) {
      for (int g = 0; g < G; ++g) { CK(cudaSetDevice(g)); CK(cudaDeviceSynchronize()); }
      for (int g = 0; g < G; ++g) {
        CK(cudaSetDevice(g)); CK(cudaEventRecord(e0[g], st[g]));
        tsep_dispatch_send<<<sms, threads, 0, st[g]>>>(peers[g], g, T, (const u8 *)x[g], (const u8 *)sc[g], 56, 1, tk[g],
                                                  (const float *)wt[g], sp[g], pre[g], areas, Own{}, T, rec[g],
                                                  hosterr ? aborth[g] : abortd[g]);
        CK(cudaGetLastError()); CK(cudaEventRecord(e1[g], st[g]));
      }
      float worst = 0;
      for (int g = 0; g < G; ++g) { CK(cudaSetDevice(g)); CK(cudaEventSynchronize(e1[g])); float ms; CK(cudaEventElapsedTime(&ms, e0[g], e1[g])); worst = std::max(worst, ms); }
      if (rep > 0) ts.push_back(worst);
    }
    std::sort(ts.begin(), ts.end()); float ms = ts[ts.size() / 2];
    printf("send SMs %3d thr %4d abort word %-6s %8.1f us  egress %6.1f GB/s  logical %6.1f GB/s\n", sms, threads, hosterr ? "host" : "device", ms * 1e3,
           remote / G * (H + 224) / ms / 1e6, total / G * (H + 224) / ms / 1e6);
    fflush(stdout);
  };
  for (int sms : {16, 24, 48}) for (int thr : {512}) for (bool h : {false, true}) run(sms, thr, h);
  return 0;
}
