// Normal mode across hosts (transport 'nvshmem'; src/ep/gpu/hier-normal.ts, docs/multi-host.md): each token
// crosses to another host once per destination host, through NVSHMEM, to the rank there with the same
// local index (its "proxy"); the ranks of that host read it from the proxy over NVLink. The combine goes
// back the same way: the proxy sums the rows of its host's ranks (float32) and sends one partial row per
// token and host; the token's rank adds the hosts' partials. Compiled with NVSHMEM's device library.
//
// -D HIER_R ranks, HIER_P ranks per host (hosts NH = R / P; rank = host * P + local index). Every offset
// into the symmetric buffer comes from src/ep/gpu/hier-layout.ts as a -D define (HIER_OFF_*, HIER_*).
// A call's sequence numbers live in the buffer (so graph replays stay correct): each kernel of a call
// uses the stored value + 1, and the call's last kernel (hier_barrier) stores it. They are 32-bit and
// compared wrap-safely (wait_seq), so they may pass 2^32.
#include "engine.cuh"
#include "ep_sync.cuh"

#ifndef HIER_R
// Defaults so the file compiles stand-alone (scripts/check-kernels.sh); the library passes all.
#define HIER_R 4
#define HIER_P 2
#define HIER_TMAX 64
#define HIER_CW 128
#define HIER_SLOT 65536
#define HIER_CIN_ROW 8224
#define HIER_OFF_COUNTS 4096
#define HIER_OFF_MAT 8192
#define HIER_OFF_INBOX 65536
#define HIER_OFF_OUTBOX (HIER_OFF_INBOX + 2 * HIER_SLOT)
#define HIER_OFF_CX (HIER_OFF_OUTBOX + 2 * HIER_SLOT)
#define HIER_OFF_CXW (HIER_OFF_CX + 4 * 64 * 4096)
#define HIER_OFF_CPART (HIER_OFF_CXW + 4 * 64 * 128)
#define HIER_OFF_CIN (HIER_OFF_CPART + 2 * 64 * HIER_CIN_ROW)
#define HIER_REC 4224
#define HIER_REC_SCALES 4096
#define HIER_REC_TOPK 4160
#define HIER_REC_W 4192
#define HIER_REC_SRC 4208
#define HIER_REC_POS 4212
#endif

using namespace tsep;

constexpr int R = HIER_R;
constexpr int P = HIER_P;
constexpr int NH = R / P;
static_assert(R % P == 0 && R <= 32 && P <= 8, "ranks per host must divide the ranks (R <= 32, P <= 8)");

// Control block (src/ep/gpu/hier-layout.ts HIER_CTRL passes these; defaults for stand-alone builds).
#ifndef HC_ABORT
#define HC_ABORT 0
#define HC_DEPOCH 4
#define HC_CEPOCH 8
#define HC_ROUND 12
#define HC_ARRIVE 16
#define HC_RDMA_TOKENS 64
#define HC_RDMA_BYTES 72
#define HC_SIG_D 128
#define HC_SIG_C 384
#define HC_SIG_X 640
#define HC_SIG_CNT 704
#define HC_BAR 1024
#define HC_SIG_R 2048
#endif

// Kernel ids of the error record (src/ep/gpu/device-error.ts).
#define HK_COUNTS 7
#define HK_RECV 8
#define HK_BARRIER 9
#define HK_PARTIAL 10
#define HK_REDUCE 11

__device__ __forceinline__ u32 *ctrl_u32(u8 *base, int off) { return reinterpret_cast<u32 *>(base + off); }
__device__ __forceinline__ u64 *ctrl_u64(u8 *base, int off) { return reinterpret_cast<u64 *>(base + off); }
__device__ __forceinline__ int host_of(int r) { return r / P; }

// The call's sequence number: the stored one + 1 (stored by the call's last kernel).
__device__ __forceinline__ u64 next_epoch(u8 *base, int off) { return (u64)ld_volatile_u32(ctrl_u32(base, off)) + 1; }

// Record of one token for one destination host, HIER_REC bytes (src/ep/gpu/hier-layout.ts): the row (room
// for 2H bytes), its scales at HIER_REC_SCALES, top-k ids (i32 or i64 as the source has them) at
// HIER_REC_TOPK, weights at HIER_REC_W, the source token index at HIER_REC_SRC and the token's position among
// the source's tokens for each rank of the destination host (-1: not sent there) at HIER_REC_POS. What a
// call carries: `Rec` (row bytes, scale words, top-k width, id bytes).
struct Rec {
  int row_bytes, sw, k, idx_bytes;
};

// The records this rank holds as proxy, by source host h (source rank h * P + local): pre[h] is where
// host h's start among them, pre[NH] their count. One thread.
__device__ __forceinline__ void proxy_prefix(const int *mat, int my_host, int local, int *pre) {
  int kept = 0;
  for (int h = 0; h < NH; h++) {
    pre[h] = kept;
    kept += mat[(h * P + local) * HIER_CW + R + my_host];
  }
  pre[NH] = kept;
}

// ------------------------------------------------------------------------------------------ dispatch

// Positions and counts. Block c < R numbers this rank's tokens for rank c (send_pos [T][R]); block R + h
// those with any rank of host h (host_pos [T][NH]); -1 where not sent. Counts go to the count row in the
// buffer (R per-rank, NH per-host), then block 0 appends the per-expert counts and the call's shape word.
extern "C" __global__ void __launch_bounds__(1024) hier_route(const u8 *__restrict__ in_rank, int T,
                                                              int *__restrict__ send_pos, int *__restrict__ host_pos,
                                                              const int *__restrict__ per_expert, int experts,
                                                              int shape, u8 *base) {
  __shared__ int warp_sums[32];
  int *counts = reinterpret_cast<int *>(base + HIER_OFF_COUNTS);
  const int c = blockIdx.x;
  int offset = 0;
  for (int t0 = 0; t0 < T; t0 += blockDim.x) {
    const int t = t0 + threadIdx.x;
    bool flag = false;
    if (t < T) {
      if (c < R) {
        flag = in_rank[(size_t)t * R + c] != 0;
      } else {
        const int h = c - R;
        for (int l = 0; l < P; l++) flag |= in_rank[(size_t)t * R + h * P + l] != 0;
      }
    }
    int total;
    const int pos = block_exclusive_scan(flag, warp_sums, total);
    if (t < T) {
      if (c < R) send_pos[(size_t)t * R + c] = flag ? offset + pos : -1;
      else host_pos[(size_t)t * NH + (c - R)] = flag ? offset + pos : -1;
    }
    offset += total;
  }
  if (threadIdx.x == 0) counts[c] = offset;
  if (c == 0) {
    for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[R + NH + e] = per_expert[e];
    if (threadIdx.x == 0) counts[R + NH + experts] = shape;
  }
}

// Count exchange: every rank's count row into row `me` of every rank's count matrix (NVSHMEM puts with a
// signal), then a bounded wait for every rank's row. One block of 32 threads.
extern "C" __global__ void hier_counts(u8 *base, int me, ErrorRecord *err, u64 timeout_ns) {
  const Fail f{err, reinterpret_cast<int *>(base + HC_ABORT)};
  if (aborted(f)) return;
  const u64 e = next_epoch(base, HC_DEPOCH);
  int *counts = reinterpret_cast<int *>(base + HIER_OFF_COUNTS);
  int *mat = reinterpret_cast<int *>(base + HIER_OFF_MAT);
  u64 *sig = ctrl_u64(base, HC_SIG_CNT);
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    nvshmem_putmem_signal_nbi(mat + (size_t)me * HIER_CW, counts, HIER_CW * sizeof(int),
                              reinterpret_cast<uint64_t *>(sig + me), e, NVSHMEM_SIGNAL_SET, r);
  nvshmem_quiet();
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (!wait_seq(sig + s, (u32)e, timeout_ns, f, me, HK_COUNTS, 0, s)) return;
    engine_acquire(sig + s);  // row s was put through NVSHMEM
  }
}

// Packs each token once per destination host into that host's slot at the token's host position: the
// slot of this rank's own host is its inbox (read there by the host's ranks), the others are outboxes
// that hier_send puts into the proxies' inboxes. One warp per (token, host).
extern "C" __global__ void __launch_bounds__(256) hier_pack(
    const u8 *__restrict__ x, const u8 *__restrict__ scales, long long s0, long long s1, const u8 *__restrict__ topk,
    const float *__restrict__ weights, int T, const int *__restrict__ send_pos, const int *__restrict__ host_pos,
    u8 *base, int my_host, Rec rec) {
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int item = blockIdx.x * warps + threadIdx.x / 32; item < T * NH; item += gridDim.x * warps) {
    const int t = item / NH, h = item % NH;
    const int hp = host_pos[(size_t)t * NH + h];
    if (hp < 0) continue;
    u8 *slot = base + (h == my_host ? HIER_OFF_INBOX + (size_t)my_host * HIER_SLOT : HIER_OFF_OUTBOX + (size_t)h * HIER_SLOT);
    u8 *r = slot + (size_t)hp * HIER_REC;
    const uint4 *src = reinterpret_cast<const uint4 *>(x + (size_t)t * rec.row_bytes);
    for (int i = lane; i < rec.row_bytes / 16; i += 32) reinterpret_cast<uint4 *>(r)[i] = src[i];
    for (int i = lane; i < rec.sw; i += 32)
      reinterpret_cast<u32 *>(r + HIER_REC_SCALES)[i] = *reinterpret_cast<const u32 *>(scales + 4 * (t * s0 + i * s1));
    if (topk != nullptr && lane < rec.k) {
      const u8 *id = topk + ((size_t)t * rec.k + lane) * rec.idx_bytes;
      if (rec.idx_bytes == 8) reinterpret_cast<long long *>(r + HIER_REC_TOPK)[lane] = *reinterpret_cast<const long long *>(id);
      else reinterpret_cast<int *>(r + HIER_REC_TOPK)[lane] = *reinterpret_cast<const int *>(id);
      if (weights != nullptr) reinterpret_cast<float *>(r + HIER_REC_W)[lane] = weights[(size_t)t * rec.k + lane];
    }
    if (lane == 0) *reinterpret_cast<int *>(r + HIER_REC_SRC) = t;
    if (lane < P) reinterpret_cast<int *>(r + HIER_REC_POS)[lane] = send_pos[(size_t)t * R + h * P + lane];
  }
}

// Block h: the records for host h to its proxy (rank h * P + my local index), into the proxy's inbox slot
// of this rank's host, with the arrival signal; this rank's own host's slot is already in place, so only
// the signal. Counts the tokens and bytes that crossed hosts. `my_counts`: this rank's count row.
extern "C" __global__ void hier_send(u8 *base, int me, const int *__restrict__ my_counts) {
  const int h = blockIdx.x, my_host = host_of(me), local = me % P;
  const u64 e = next_epoch(base, HC_DEPOCH);
  u64 *sig = ctrl_u64(base, HC_SIG_D) + my_host;
  if (h == my_host) {
    if (threadIdx.x == 0) {
      __threadfence_system();
      st_release_sys_u64(sig, e);
    }
    return;
  }
  const int n = my_counts[R + h];
  const int proxy = h * P + local;
  u8 *dst = base + HIER_OFF_INBOX + (size_t)my_host * HIER_SLOT;
  const u8 *src = base + HIER_OFF_OUTBOX + (size_t)h * HIER_SLOT;
  if (n > 0) {
    nvshmemx_putmem_signal_nbi_block(dst, src, (size_t)n * HIER_REC, reinterpret_cast<uint64_t *>(sig), e,
                                     NVSHMEM_SIGNAL_SET, proxy);
  } else if (threadIdx.x == 0) {
    nvshmemx_signal_op(reinterpret_cast<uint64_t *>(sig), e, NVSHMEM_SIGNAL_SET, proxy);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    nvshmem_quiet();  // the outbox may be packed again next call
    atomicAdd(reinterpret_cast<unsigned long long *>(base + HC_RDMA_TOKENS), (unsigned long long)n);
    atomicAdd(reinterpret_cast<unsigned long long *>(base + HC_RDMA_BYTES), (unsigned long long)n * HIER_REC);
  }
}

// Receive: the rows for this rank, source by source in rank order, each source's in token order. Source s's
// records sit in the inbox slot of s's host at its proxy on this host (rank my_host * P + s % P; s itself
// when on this host), read over NVLink through `peers` (the host's buffers by local index). A record goes
// to row row_off[s] + pos[my local index]. Then this rank's own inbox records' (source token, positions)
// are kept for the combine. `mat`: the count matrix (the buffer's, or a cached handle's copy). Optional:
// the received row count and the rank prefix matrix (when the host did not compute them).
extern "C" __global__ void __launch_bounds__(256) hier_recv(
    u8 *base, const u64 *__restrict__ peers, int me, const int *__restrict__ mat, Rec rec, int local_experts,
    u8 *__restrict__ out_x, u8 *__restrict__ out_scales, u8 *__restrict__ out_topk, float *__restrict__ out_w,
    int *__restrict__ out_src, int *__restrict__ recv_count, int *__restrict__ keep, int *__restrict__ rank_prefix,
    ErrorRecord *err, u64 timeout_ns) {
  const Fail f{err, reinterpret_cast<int *>(base + HC_ABORT)};
  __shared__ int row_off[R], rec_pre[R + 1], keep_pre[NH + 1];
  __shared__ const u8 *slot[R];
  const int my_host = host_of(me), local = me % P;
  if (threadIdx.x == 0) {
    int rows = 0, recs = 0;
    for (int s = 0; s < R; s++) {
      row_off[s] = rows;
      rec_pre[s] = recs;
      rows += mat[s * HIER_CW + me];
      recs += mat[s * HIER_CW + R + my_host];
      slot[s] = reinterpret_cast<const u8 *>(peers[s % P]) + HIER_OFF_INBOX + (size_t)host_of(s) * HIER_SLOT;
    }
    rec_pre[R] = recs;
    proxy_prefix(mat, my_host, local, keep_pre);
    if (blockIdx.x == 0 && recv_count != nullptr) *recv_count = rows;
  }
  // Without a host read of the counts (worst-case-tokens mode): [i][j] = sum over s <= i of what s sends j.
  if (blockIdx.x == 0 && rank_prefix != nullptr)
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      int acc = 0;
      for (int i = 0; i < R; i++) rank_prefix[i * R + j] = acc += mat[i * HIER_CW + j];
    }
  bool ok = !aborted(f);
  const u64 e = next_epoch(base, HC_DEPOCH);
  // As proxy (block 0): the signals of the other hosts' records in this rank's inbox are seen through
  // NVSHMEM's consistency step (engine_acquire), then republished for the host's ranks, whose NVLink
  // reads of the inbox are then ordered after the records (a network transport orders a put and its
  // signal for the target PE only).
  if (blockIdx.x == 0) {
    if (ok && threadIdx.x < NH && threadIdx.x != my_host) {
      const int h = threadIdx.x;
      const u64 *sig = ctrl_u64(base, HC_SIG_D) + h;
      ok = wait_seq(sig, (u32)e, timeout_ns, f, me, HK_RECV, 1, h * P + local);
      if (ok) {
        engine_acquire(sig);
        __threadfence_system();
        st_release_sys_u64(ctrl_u64(base, HC_SIG_R) + h, e);
      }
    }
    if (!__syncthreads_and(ok)) return;
  }
  if (ok && threadIdx.x < R) {
    const int s = threadIdx.x;
    // A source on this host signalled its own inbox slot over NVLink; another host's records are read
    // once the proxy republished their signal.
    const int word = host_of(s) == my_host ? HC_SIG_D : HC_SIG_R;
    const u64 *sig = reinterpret_cast<const u64 *>(peers[s % P] + word) + host_of(s);
    ok = wait_seq(sig, (u32)e, timeout_ns, f, me, HK_RECV, 0, s);
  }
  if (!__syncthreads_and(ok)) return;
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int q = blockIdx.x * warps + threadIdx.x / 32; q < rec_pre[R]; q += gridDim.x * warps) {
    int s = 0;
    while (q >= rec_pre[s + 1]) s++;
    const u8 *r = slot[s] + (size_t)(q - rec_pre[s]) * HIER_REC;
    const int pos = reinterpret_cast<const int *>(r + HIER_REC_POS)[local];
    if (pos < 0) continue;
    const size_t row = (size_t)row_off[s] + pos;
    uint4 *dx = reinterpret_cast<uint4 *>(out_x + row * rec.row_bytes);
    for (int i = lane; i < rec.row_bytes / 16; i += 32) dx[i] = reinterpret_cast<const uint4 *>(r)[i];
    for (int i = lane; i < rec.sw; i += 32)
      reinterpret_cast<u32 *>(out_scales + row * 4 * rec.sw)[i] = reinterpret_cast<const u32 *>(r + HIER_REC_SCALES)[i];
    if (out_topk != nullptr && lane < rec.k) {
      long long id = rec.idx_bytes == 8 ? reinterpret_cast<const long long *>(r + HIER_REC_TOPK)[lane]
                                        : reinterpret_cast<const int *>(r + HIER_REC_TOPK)[lane];
      const long long lo = (long long)me * local_experts;
      const bool mine = id >= lo && id < lo + local_experts;
      id = mine ? id - lo : -1;
      if (rec.idx_bytes == 8) reinterpret_cast<long long *>(out_topk)[row * rec.k + lane] = id;
      else reinterpret_cast<int *>(out_topk)[row * rec.k + lane] = (int)id;
      if (out_w != nullptr) out_w[row * rec.k + lane] = mine ? reinterpret_cast<const float *>(r + HIER_REC_W)[lane] : 0.0f;
    }
    if (lane == 0 && out_src != nullptr) out_src[row] = *reinterpret_cast<const int *>(r + HIER_REC_SRC);
  }
  // This rank's inbox records (it is their proxy): source token and positions, for the combine.
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < keep_pre[NH]; q += gridDim.x * blockDim.x) {
    int h = 0;
    while (q >= keep_pre[h + 1]) h++;
    const u8 *r = base + HIER_OFF_INBOX + (size_t)h * HIER_SLOT + (size_t)(q - keep_pre[h]) * HIER_REC;
    int *k = keep + (size_t)q * (1 + P);
    k[0] = *reinterpret_cast<const int *>(r + HIER_REC_SRC);
    for (int l = 0; l < P; l++) k[1 + l] = reinterpret_cast<const int *>(r + HIER_REC_POS)[l];
  }
}

// Barrier of all ranks (one block of 32 threads): round = stored + 1 into every rank's word for this rank
// (NVLink stores inside the host, NVSHMEM writes to other hosts), then a bounded wait for every rank's.
// Then it stores the call's sequence number (`epoch_off`: HC_DEPOCH or HC_CEPOCH) and the round: the
// call is over everywhere, so its buffers may be reused.
extern "C" __global__ void hier_barrier(u8 *base, const u64 *__restrict__ peers, int me, int epoch_off,
                                        ErrorRecord *err, u64 timeout_ns) {
  const Fail f{err, reinterpret_cast<int *>(base + HC_ABORT)};
  if (aborted(f)) return;
  const u32 round = ld_volatile_u32(ctrl_u32(base, HC_ROUND)) + 1;
  __threadfence_system();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (host_of(r) == host_of(me)) {
      st_release_sys(reinterpret_cast<int *>(peers[r % P] + HC_BAR) + me, (int)round);
    } else {
      nvshmem_int_p(reinterpret_cast<int *>(base + HC_BAR) + me, (int)round, r);
    }
  }
  bool ok = true;
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    ok = ok && wait_seq(reinterpret_cast<const int *>(base + HC_BAR) + r, round, timeout_ns, f, me, HK_BARRIER, 0, r);
  if (!__syncthreads_and(ok)) return;
  if (threadIdx.x == 0) {
    *ctrl_u32(base, HC_ROUND) = round;
    *ctrl_u32(base, epoch_off) = ld_volatile_u32(ctrl_u32(base, epoch_off)) + 1;
  }
}

// ------------------------------------------------------------------------------------------- combine

// The expert-side rows of this call are in place (copied into the buffer's combine rows): say so to the
// host's ranks, which read them over NVLink.
extern "C" __global__ void hier_mark(u8 *base) {
  __threadfence_system();
  st_release_sys_u64(ctrl_u64(base, HC_SIG_X), next_epoch(base, HC_CEPOCH));
}

// As proxy: for each record this rank received in dispatch (`keep`: source token and positions for the
// host's ranks), the float32 sum over the host's ranks (ascending) of their rows for that token, and of
// their weights; sent to the source rank's partial row [this host][token] (NVSHMEM put from a staging row
// here; written in place for this rank's own tokens). The last block signals every source.
extern "C" __global__ void __launch_bounds__(256) hier_partial(u8 *base, const u64 *__restrict__ peers, int me,
                                                                const int *__restrict__ mat,
                                                                const int *__restrict__ keep, int hidden, int k,
                                                                ErrorRecord *err, u64 timeout_ns) {
  const Fail f{err, reinterpret_cast<int *>(base + HC_ABORT)};
  __shared__ int offs[P][R];  // where source s's rows start among local rank l's received rows
  __shared__ int keep_pre[NH + 1];
  __shared__ bool last;
  const int my_host = host_of(me), local = me % P;
  if (threadIdx.x < P) {
    const int l = threadIdx.x, dest = my_host * P + l;
    int rows = 0;
    for (int s = 0; s < R; s++) {
      offs[l][s] = rows;
      rows += mat[s * HIER_CW + dest];
    }
  }
  if (threadIdx.x == 0) proxy_prefix(mat, my_host, local, keep_pre);
  bool ok = !aborted(f);
  const u64 e = next_epoch(base, HC_CEPOCH);
  if (ok && threadIdx.x < P)
    ok = wait_seq(reinterpret_cast<const u64 *>(peers[threadIdx.x] + HC_SIG_X), (u32)e, timeout_ns, f, me, HK_PARTIAL, 0,
                  my_host * P + threadIdx.x);
  if (!__syncthreads_and(ok)) return;
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int row_bytes = 2 * hidden;
  for (int q = blockIdx.x * warps + threadIdx.x / 32; q < keep_pre[NH]; q += gridDim.x * warps) {
    int h = 0;
    while (q >= keep_pre[h + 1]) h++;
    const int s = h * P + local, j = q - keep_pre[h];
    const int *kp = keep + (size_t)q * (1 + P);
    const int t = kp[0];
    u8 *dst = s == me ? base + HIER_OFF_CIN + ((size_t)my_host * HIER_TMAX + t) * HIER_CIN_ROW
                      : base + HIER_OFF_CPART + ((size_t)h * HIER_TMAX + j) * HIER_CIN_ROW;
    for (int v = lane; v < hidden / 8; v += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int l = 0; l < P; l++) {
        const int pos = kp[1 + l];
        if (pos < 0) continue;
        const u8 *row = reinterpret_cast<const u8 *>(peers[l]) + HIER_OFF_CX + (size_t)(offs[l][s] + pos) * row_bytes;
        const uint4 u = reinterpret_cast<const uint4 *>(row)[v];
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
          acc[2 * i] += bf16_lo_f32(w[i]);
          acc[2 * i + 1] += bf16_hi_f32(w[i]);
        }
      }
      float4 *d = reinterpret_cast<float4 *>(dst) + 2 * v;
      d[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      d[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    if (lane < k) {
      float acc = 0.0f;
      for (int l = 0; l < P; l++) {
        const int pos = kp[1 + l];
        if (pos < 0) continue;
        const float *wrow = reinterpret_cast<const float *>(reinterpret_cast<const u8 *>(peers[l]) + HIER_OFF_CXW) +
                            (size_t)(offs[l][s] + pos) * k;
        acc += wrow[lane];
      }
      reinterpret_cast<float *>(dst + 4 * hidden)[lane] = acc;
    }
    if (s != me) {
      __syncwarp();
      nvshmemx_putmem_nbi_warp(base + HIER_OFF_CIN + ((size_t)my_host * HIER_TMAX + t) * HIER_CIN_ROW, dst,
                               HIER_CIN_ROW, s);
    }
  }
  __syncwarp();
  if (lane == 0) nvshmem_quiet();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    u32 *arrive = ctrl_u32(base, HC_ARRIVE);
    last = atomicAdd(arrive, 1u) == gridDim.x - 1;
    if (last) atomicExch(arrive, 0u);
  }
  __syncthreads();
  if (!last || threadIdx.x >= NH) return;
  // Source h * P + local gets this host's partials of its tokens.
  const int h = threadIdx.x, s = h * P + local;
  u64 *sig = ctrl_u64(base, HC_SIG_C) + my_host;
  if (s == me) {
    __threadfence_system();
    st_release_sys_u64(sig, e);
  } else {
    nvshmemx_signal_op(reinterpret_cast<uint64_t *>(sig), e, NVSHMEM_SIGNAL_SET, s);
  }
}

// The token's rank: out[t] = bias0 + bias1 + the hosts' partials in ascending host order (float32, one
// bf16 rounding), over the hosts the token went to; weights the same way. One thread per (token, 8
// channels), then per (token, slot).
extern "C" __global__ void __launch_bounds__(256) hier_reduce(u8 *base, int me, int T, int hidden, int k,
                                                               const int *__restrict__ host_pos,
                                                               const u16 *__restrict__ bias0,
                                                               const u16 *__restrict__ bias1, u16 *__restrict__ out,
                                                               float *__restrict__ out_w, ErrorRecord *err,
                                                               u64 timeout_ns) {
  const Fail f{err, reinterpret_cast<int *>(base + HC_ABORT)};
  bool ok = !aborted(f);
  const u64 e = next_epoch(base, HC_CEPOCH);
  if (ok && threadIdx.x < NH) {
    const u64 *sig = ctrl_u64(base, HC_SIG_C) + threadIdx.x;
    ok = wait_seq(sig, (u32)e, timeout_ns, f, me, HK_REDUCE, 0, threadIdx.x * P + me % P);
    if (ok && threadIdx.x != host_of(me)) engine_acquire(sig);  // that host's partials came through NVSHMEM
  }
  if (!__syncthreads_and(ok)) return;
  const int vecs = hidden / 8;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * vecs; i += gridDim.x * blockDim.x) {
    const int t = i / vecs, v = i % vecs;
    float acc[8];
#pragma unroll
    for (int c = 0; c < 8; c++) {
      const size_t at = (size_t)t * hidden + 8 * v + c;
      const float b0 = bias0 ? bf16_lo_f32(bias0[at]) : 0.0f;
      const float b1 = bias1 ? bf16_lo_f32(bias1[at]) : 0.0f;
      acc[c] = b0 + b1;
    }
    for (int h = 0; h < NH; h++) {
      if (host_pos[(size_t)t * NH + h] < 0) continue;
      const float4 *p = reinterpret_cast<const float4 *>(base + HIER_OFF_CIN + ((size_t)h * HIER_TMAX + t) * HIER_CIN_ROW) + 2 * v;
      const float4 a = p[0], b = p[1];
      acc[0] += a.x, acc[1] += a.y, acc[2] += a.z, acc[3] += a.w;
      acc[4] += b.x, acc[5] += b.y, acc[6] += b.z, acc[7] += b.w;
    }
#pragma unroll
    for (int c = 0; c < 8; c++) out[(size_t)t * hidden + 8 * v + c] = f32_to_bf16(acc[c]);
  }
  if (out_w == nullptr) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * k; i += gridDim.x * blockDim.x) {
    const int t = i / k, slot = i % k;
    float acc = 0.0f;
    for (int h = 0; h < NH; h++) {
      if (host_pos[(size_t)t * NH + h] < 0) continue;
      acc += reinterpret_cast<const float *>(base + HIER_OFF_CIN + ((size_t)h * HIER_TMAX + t) * HIER_CIN_ROW + 4 * hidden)[slot];
    }
    out_w[i] = acc;
  }
}
