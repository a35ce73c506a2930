// Diagnostic tool (bench/RESULTS.md, 2026-11-28 regression diagnosis): NVLink all-to-all between the GPUs
// of one host in one process with peer access, as a floor for the normal mode. Build and run on the GPU
// machine: nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/peer-bandwidth bench/tools/peer-bandwidth.cu &&
// /tmp/peer-bandwidth [row bytes, default 7168] [fan: only the fan-out/metadata runs | ce: only the copy-engine runs]
// Every GPU moves N rows of RB bytes; row i goes to GPU i % G (own GPU included), as EP dispatch does.
// The copy-engine runs (no SMs) move the same bytes as G contiguous blocks, one cudaMemcpyAsync per
// destination (and pieces of it), on one stream or one stream per destination, with and without a
// 16-SM local copy kernel beside them (a combine's reduce would run there).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); exit(1); } } while (0)
constexpr int MAXG = 8;
struct Peers { char *p[MAXG]; };

template <int U>
__global__ void push(const int4 *__restrict__ src, Peers dst, int G, int me, int N, int RB) {
  const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  const int W = gridDim.x * wpb, w = blockIdx.x * wpb + (threadIdx.x >> 5);
  const int vecs = RB / 16;
  for (int i = w; i < N; i += W) {
    int d = i % G;
    const int4 *s = src + (size_t)i * vecs;
    int4 *o = reinterpret_cast<int4 *>(dst.p[d] + ((size_t)me * N + i) * RB);
    for (int v0 = 0; v0 < vecs; v0 += 32 * U) {
      int4 b[U];
#pragma unroll
      for (int u = 0; u < U; ++u) { int v = v0 + u * 32 + lane; if (v < vecs) b[u] = __ldg(s + v); }
#pragma unroll
      for (int u = 0; u < U; ++u) { int v = v0 + u * 32 + lane; if (v < vecs) o[v] = b[u]; }
    }
  }
}


// Like the tsep send kernel: row i goes to `fan` destinations starting at i % G (loaded once, stored fan
// times); with meta, each destination row also gets src index (4 B), top-k ids (64 B), weights (32 B) and
// scales (224 B) as separate small stores into other areas of the destination buffer.
template <int U>
__global__ void push_fan(const int4 *__restrict__ src, Peers dst, int G, int me, int N, int RB, int fan, int meta, size_t meta_off) {
  const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  const int W = gridDim.x * wpb, w = blockIdx.x * wpb + (threadIdx.x >> 5);
  const int vecs = RB / 16;
  for (int i = w; i < N; i += W) {
    const int4 *s = src + (size_t)i * vecs;
    int4 *o[4];
    for (int f = 0; f < 4; ++f) o[f] = f < fan ? reinterpret_cast<int4 *>(dst.p[(i + f) % G] + ((size_t)me * N + i) * RB) : nullptr;
    for (int v0 = 0; v0 < vecs; v0 += 32 * U) {
      int4 b[U];
#pragma unroll
      for (int u = 0; u < U; ++u) { int v = v0 + u * 32 + lane; if (v < vecs) b[u] = __ldg(s + v); }
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        if (o[f] == nullptr) continue;
#pragma unroll
        for (int u = 0; u < U; ++u) { int v = v0 + u * 32 + lane; if (v < vecs) o[f][v] = b[u]; }
      }
    }
    if (meta) {
      for (int f = 0; f < fan; ++f) {
        char *m = dst.p[(i + f) % G] + meta_off;
        size_t row = (size_t)me * N + i;
        if (lane == 0) reinterpret_cast<int *>(m)[row] = i;
        if (lane < 8) reinterpret_cast<long long *>(m + 4 * (size_t)G * N)[row * 8 + lane] = i + lane;
        if (lane < 8) reinterpret_cast<float *>(m + 68 * (size_t)G * N)[row * 8 + lane] = 1.0f;
        for (int j = lane; j < 56; j += 32) reinterpret_cast<int *>(m + 100 * (size_t)G * N)[row * 56 + j] = j;
      }
    }
  }
}

// Pull: GPU `me` reads the rows other GPUs hold for it (row i of source s is for GPU i % G).
template <int U>
__global__ void pull(Peers src, int4 *__restrict__ out, int G, int me, int N, int RB) {
  const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  const int W = gridDim.x * wpb, w = blockIdx.x * wpb + (threadIdx.x >> 5);
  const int vecs = RB / 16;
  const int per = N / G;  // rows for me from each source
  for (int j = w; j < per * G; j += W) {
    int s = j % G, k = j / G;
    int i = k * G + me;
    const int4 *p = reinterpret_cast<const int4 *>(src.p[s] + (size_t)i * RB);
    int4 *o = out + ((size_t)s * per + k) * vecs;
    for (int v0 = 0; v0 < vecs; v0 += 32 * U) {
      int4 b[U];
#pragma unroll
      for (int u = 0; u < U; ++u) { int v = v0 + u * 32 + lane; if (v < vecs) b[u] = p[v]; }
#pragma unroll
      for (int u = 0; u < U; ++u) { int v = v0 + u * 32 + lane; if (v < vecs) o[v] = b[u]; }
    }
  }
}

// TMA push: each warp's lane 0 loads a row chunk into shared memory (bulk copy + mbarrier) and bulk-stores it
// to the destination, STAGES chunks in flight per warp.
__device__ __forceinline__ unsigned smem_u32(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }
template <int STAGES>
__global__ void tma_push(const char *__restrict__ src, Peers dst, int G, int me, int N, int RB, int CH) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) unsigned long long bars[32 * STAGES];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  const int W = gridDim.x * wpb, w = blockIdx.x * wpb + wid;
  if (lane != 0) return;
  char *buf = smem + (size_t)wid * STAGES * CH;
  unsigned long long *bar = bars + wid * STAGES;
  for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar + s)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  int phase[STAGES];
  for (int s = 0; s < STAGES; ++s) phase[s] = 0;
  const int chunks = RB / CH;
  int n = 0;
  for (int i = w; i < N; i += W) {
    int d = i % G;
    for (int c = 0; c < chunks; ++c, ++n) {
      int s = n % STAGES;
      // stage s free once the bulk store that used it has read it
      asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(STAGES - 1) : "memory");
      const char *g = src + (size_t)i * RB + (size_t)c * CH;
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar + s)), "r"(CH) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(smem_u32(buf + (size_t)s * CH)), "l"(g), "r"(CH), "r"(smem_u32(bar + s)) : "memory");
      unsigned ok = 0;
      while (!ok) asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                               : "=r"(ok) : "r"(smem_u32(bar + s)), "r"(phase[s]) : "memory");
      phase[s] ^= 1;
      char *o = dst.p[d] + ((size_t)me * N + i) * RB + (size_t)c * CH;
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(o), "r"(smem_u32(buf + (size_t)s * CH)), "r"(CH) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// A local HBM copy on the SMs, beside the copy engines (what a reduce kernel would do meanwhile).
__global__ void local_copy(const int4 *__restrict__ src, int4 *__restrict__ dst, size_t n, int reps) {
  for (int r = 0; r < reps; ++r)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) dst[i] = src[i];
}

int G;
std::vector<cudaStream_t> st;
std::vector<char *> srcb, dstb;
std::vector<cudaEvent_t> e0, e1;

template <class F>
float timeit(F launch, int reps = 5) {
  std::vector<float> ts;
  for (int r = 0; r < reps + 1; ++r) {
    for (int g = 0; g < G; ++g) { CK(cudaSetDevice(g)); CK(cudaDeviceSynchronize()); }
    for (int g = 0; g < G; ++g) { CK(cudaSetDevice(g)); CK(cudaEventRecord(e0[g], st[g])); launch(g); CK(cudaGetLastError()); CK(cudaEventRecord(e1[g], st[g])); }
    float worst = 0;
    for (int g = 0; g < G; ++g) { CK(cudaSetDevice(g)); CK(cudaEventSynchronize(e1[g])); float ms; CK(cudaEventElapsedTime(&ms, e0[g], e1[g])); worst = std::max(worst, ms); }
    if (r > 0) ts.push_back(worst);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main(int argc, char **argv) {
  CK(cudaGetDeviceCount(&G));
  const int RB = argc > 1 ? atoi(argv[1]) : 7168;
  const int N = 16384;
  const size_t bytes = (size_t)N * RB;
  st.resize(G); srcb.resize(G); dstb.resize(G); e0.resize(G); e1.resize(G);
  for (int g = 0; g < G; ++g) {
    CK(cudaSetDevice(g));
    for (int h = 0; h < G; ++h) if (h != g) CK(cudaDeviceEnablePeerAccess(h, 0));
    CK(cudaStreamCreateWithFlags(&st[g], cudaStreamNonBlocking));
    CK(cudaMalloc(&srcb[g], bytes)); CK(cudaMemset(srcb[g], g + 1, bytes));
    CK(cudaMalloc(&dstb[g], bytes * G + (size_t)400 * G * N));
    CK(cudaEventCreate(&e0[g])); CK(cudaEventCreate(&e1[g]));
    CK(cudaFuncSetAttribute(tma_push<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(tma_push<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  }
  Peers dp{}, sp{};
  for (int g = 0; g < G; ++g) { dp.p[g] = dstb[g]; sp.p[g] = srcb[g]; }
  const double remote = (double)bytes * (G - 1) / G;  // bytes leaving each GPU
  auto report = [&](const char *name, int sms, int thr, int knob, float ms) {
    printf("%-10s SMs %3d thr %4d knob %5d  %8.1f us  egress %6.1f GB/s  logical %6.1f GB/s  per-SM %5.1f GB/s\n", name, sms, thr, knob,
           ms * 1e3, remote / ms / 1e6, bytes / ms / 1e6, remote / ms / 1e6 / sms);
    fflush(stdout);
  };
  printf("G=%d RB=%d N=%d bytes/GPU=%.1f MB\n", G, RB, N, bytes / 1e6);
  if (argc > 2 && argv[2][0] == 'c') {
    // Streams per destination and fork/join events, per GPU; a scratch area for the SM copy beside.
    std::vector<std::vector<cudaStream_t>> cs(G, std::vector<cudaStream_t>(G));
    std::vector<std::vector<cudaEvent_t>> done(G, std::vector<cudaEvent_t>(G));
    std::vector<char *> scratch(G);
    std::vector<cudaStream_t> ks(G);  // the SM copy's own stream, so the copies do not queue behind it
    std::vector<cudaEvent_t> kfork(G), kjoin(G);
    const size_t sbytes = 256u << 20;
    for (int g = 0; g < G; ++g) {
      CK(cudaSetDevice(g));
      for (int d = 0; d < G; ++d) {
        CK(cudaStreamCreateWithFlags(&cs[g][d], cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&done[g][d], cudaEventDisableTiming));
      }
      CK(cudaMalloc(&scratch[g], 2 * sbytes));
      CK(cudaStreamCreateWithFlags(&ks[g], cudaStreamNonBlocking));
      CK(cudaEventCreateWithFlags(&kfork[g], cudaEventDisableTiming));
      CK(cudaEventCreateWithFlags(&kjoin[g], cudaEventDisableTiming));
    }
    const size_t block = bytes / G;  // bytes from each GPU to each GPU
    for (int beside : {0, 1}) {
      for (int multi : {0, 1}) {
        for (int pieces : {1, 4, 16}) {
          float ms = timeit([&](int g) {
            if (beside) {
              CK(cudaEventRecord(kfork[g], st[g]));
              CK(cudaStreamWaitEvent(ks[g], kfork[g], 0));
              local_copy<<<16, 1024, 0, ks[g]>>>((const int4 *)scratch[g], (int4 *)(scratch[g] + sbytes), sbytes / 16, 1);
              CK(cudaEventRecord(kjoin[g], ks[g]));
            }
            for (int k = 0; k < G; ++k) {
              const int d = (g + 1 + k) % G;  // peers first, in a different order on each GPU; own block last
              cudaStream_t s = st[g];
              if (multi) {
                s = cs[g][d];
                CK(cudaEventRecord(done[g][d], st[g]));
                CK(cudaStreamWaitEvent(s, done[g][d], 0));
              }
              const size_t piece = block / pieces;
              for (int p = 0; p < pieces; ++p)
                CK(cudaMemcpyAsync(dstb[d] + (size_t)g * bytes + d * block + p * piece, srcb[g] + d * block + p * piece,
                                   p + 1 == pieces ? block - p * piece : piece, cudaMemcpyDeviceToDevice, s));
              if (multi) {
                CK(cudaEventRecord(done[g][d], s));
                CK(cudaStreamWaitEvent(st[g], done[g][d], 0));
              }
            }
            if (beside) CK(cudaStreamWaitEvent(st[g], kjoin[g], 0));
          });
          printf("ce %s pieces %2d%s  %8.1f us  egress %6.1f GB/s  logical %6.1f GB/s\n", multi ? "stream/dest" : "one stream ",
                 pieces, beside ? " + 16-SM local copy" : "", ms * 1e3, remote / ms / 1e6, bytes / ms / 1e6);
          fflush(stdout);
        }
      }
    }
    // The SM copy alone, for the "beside" rows.
    float ms = timeit([&](int g) { local_copy<<<16, 1024, 0, st[g]>>>((const int4 *)scratch[g], (int4 *)(scratch[g] + sbytes), sbytes / 16, 1); });
    printf("16-SM local copy of %zu MB alone: %.1f us\n", sbytes >> 20, ms * 1e3);
    return 0;
  }
  const size_t moff = bytes * G;
  for (int sms : {16, 24, 48}) {
    for (int fan : {1, 3}) for (int meta : {0, 1}) {
      float ms = timeit([&](int g) { push_fan<4><<<sms, 512, 0, st[g]>>>((const int4 *)srcb[g], dp, G, g, N, RB, fan, meta, moff); });
      double rem = (double)bytes * fan * (G - 1) / G;
      printf("fan %d meta %d SMs %3d  %8.1f us  egress %6.1f GB/s (rows x fan)\n", fan, meta, sms, ms * 1e3, rem / ms / 1e6);
      fflush(stdout);
    }
  }
  if (argc > 2) return 0;
  for (int sms : {8, 16, 24, 32, 48, 132}) {
    for (int thr : {256, 512, 1024}) {
      report("push U4", sms, thr, 4, timeit([&](int g) { push<4><<<sms, thr, 0, st[g]>>>((const int4 *)srcb[g], dp, G, g, N, RB); }));
      report("push U8", sms, thr, 8, timeit([&](int g) { push<8><<<sms, thr, 0, st[g]>>>((const int4 *)srcb[g], dp, G, g, N, RB); }));
      report("pull U4", sms, thr, 4, timeit([&](int g) { pull<4><<<sms, thr, 0, st[g]>>>(sp, (int4 *)dstb[g], G, g, N, RB); }));
      report("pull U8", sms, thr, 8, timeit([&](int g) { pull<8><<<sms, thr, 0, st[g]>>>(sp, (int4 *)dstb[g], G, g, N, RB); }));
    }
    for (int warps : {4, 8}) {
      for (int ch : {RB / 2, RB}) {
        size_t sm2 = (size_t)warps * 2 * ch, sm4 = (size_t)warps * 4 * ch;
        if (sm2 <= 200 * 1024) report("tma S2", sms, warps * 32, ch, timeit([&](int g) { tma_push<2><<<sms, warps * 32, sm2, st[g]>>>(srcb[g], dp, G, g, N, RB, ch); }));
        if (sm4 <= 200 * 1024) report("tma S4", sms, warps * 32, ch, timeit([&](int g) { tma_push<4><<<sms, warps * 32, sm4, st[g]>>>(srcb[g], dp, G, g, N, RB, ch); }));
      }
    }
  }
  // check one destination row: GPU 1 row from GPU 0 (i=1) must be byte 1
  char h[16]; CK(cudaSetDevice(1)); CK(cudaMemcpy(h, dstb[1] + ((size_t)0 * N + 1) * RB, 16, cudaMemcpyDeviceToHost));
  printf("check %d (expect 1)\n", h[0]);
  return 0;
}
