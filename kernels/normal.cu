// Normal (high-throughput) mode over NVLink: dispatch and combine between the GPUs of one host
// (the layout kernel is kernels/layout.cu).
//
// Every rank owns a symmetric buffer (mapped by all peers) laid out as
//   [control block | x rows | scale rows | source index | top-k ids | top-k weights]
// Dispatch PUSHES each token once to every rank that holds any of its experts, straight into the final
// row of the receiver's buffer (offset of the sender's block + the token's position among the sender's
// tokens for that receiver, both known after the count exchange). Senders work in chunks of tokens and
// publish each chunk's row range to every receiver as a tagged word; the receive kernel runs at the same
// time on other SMs and copies each chunk into the freshly allocated outputs as soon as it lands, so the
// copy hides behind the transfer. Combine pushes each received row back into the owner's buffer at
// [expert rank][token]; the owner sums the rows of every token in ascending rank order in float32.
//
// Specialized at compile time (-D):
//   TSEP_R ranks, TSEP_EL experts per rank, TSEP_H hidden, TSEP_ELT bytes per x element (1 fp8, 2 bf16),
//   TSEP_SW scale words per row (0 = no scales), TSEP_K top-k slots (0 = no top-k), TSEP_IDX64 (int64 ids),
//   TSEP_WEIGHTS (weights present), TSEP_TMAX (rows per source block in the combine stage), TSEP_UNROLL
//   (loads per lane in flight in the send kernels' row copies; the reduce's follow it).
#include "ep_sync.cuh"

#ifndef TSEP_R
#define TSEP_R 2
#endif
#ifndef TSEP_EL
#define TSEP_EL 4
#endif
#ifndef TSEP_H
#define TSEP_H 128
#endif
#ifndef TSEP_ELT
#define TSEP_ELT 2
#endif
#ifndef TSEP_SW
#define TSEP_SW 0
#endif
#ifndef TSEP_K
#define TSEP_K 8
#endif
#ifndef TSEP_IDX64
#define TSEP_IDX64 1
#endif
#ifndef TSEP_WEIGHTS
#define TSEP_WEIGHTS 1
#endif
#ifndef TSEP_TMAX
#define TSEP_TMAX 128
#endif
#ifndef TSEP_UNROLL
#define TSEP_UNROLL 8  // 16-byte loads per lane in flight in the send copies (the reduce keeps 2x, at most 16)
#endif
static_assert(TSEP_UNROLL >= 1 && TSEP_UNROLL <= 16, "TSEP_UNROLL must be 1..16");

#if TSEP_IDX64
typedef long long idx_t;
#else
typedef int idx_t;
#endif

constexpr int R = TSEP_R;
constexpr int EL = TSEP_EL;
constexpr int H = TSEP_H;
[[maybe_unused]] constexpr int K = TSEP_K;
constexpr int ROW_BYTES = H * TSEP_ELT;
constexpr int ROW_VECS = ROW_BYTES / 16;
static_assert(ROW_BYTES % 16 == 0, "rows must be whole 16-byte vectors");

// Control block at the start of every rank's buffer (mirrored in src/ep/gpu/normal-layout.ts).
struct Ctrl {
  int barrier[8];              // rank p writes its barrier round into slot p
  int round;                   // this rank's barrier round (private)
  int abort;                   // private: set by the first timed-out wait; every kernel then stops (tsep::Fail)
  u32 dispatch_seq;            // private: dispatches so far (tags the chunk words of the current one)
  u32 combine_seq;             // private: combines so far
  int combine_chunks_from[8][2];  // [expert rank][combine seq & 1]: chunks that rank cuts its rows for me into
  int pad[4];
  int count_matrix[8][8];      // [src][dst] tokens src sends to dst, written by src into every rank
  int expert_counts[8][1024];  // [src][local expert] tokens src sends to each of this rank's experts
};

struct Areas {  // byte offsets of the data areas inside every buffer
  u64 x, scales, src_idx, topk, weights, chunks, combine_chunks;
};

// This rank's dispatch outputs (row-major like the buffer's areas; a null area is not written), when the
// send may write its own rows there itself (x non-null): they skip the buffer and the receive's copy.
struct Own {
  u8 *x, *scales;
  int *src_idx;
  idx_t *topk;
  float *weights;
};

// A dispatch chunk's word, written by the sender into every receiver's chunks area at [sender][chunk]:
// bits 40..63 the dispatch sequence number, 20..39 the first and 0..19 one past the last row position
// (within the sender's block) the chunk's tokens took at that receiver. Every chunk is announced every
// call, so a stale word is at most one call old. A combine chunk's word (in combine_chunks at [expert
// rank][chunk]) carries the whole 32-bit combine sequence number in bits 32..63: empty chunks are not
// announced, so a word may be many calls old, and a 24-bit tag would come round again.
constexpr int POS_BITS = 20;
constexpr int DISPATCH_TAG_BITS = 24;
constexpr int COMBINE_TAG_BITS = 32;
__device__ __forceinline__ u64 chunk_word(u32 seq, u32 first, u32 end) {
  return ((u64)(seq & 0xffffffu) << 40) | ((u64)first << POS_BITS) | end;
}

// Tokens (dispatch) or rows (combine) per chunk when `n` of them are cut into at most `num_chunks`
// chunks: each side computes it from counts it knows, so no sender needs the receiver's T.
__device__ __forceinline__ int per_chunk(int n, int num_chunks) { return max(1, (n + num_chunks - 1) / num_chunks); }

// In the rank prefix matrix (rank_prefix[src·R + dst]: rows ranks 0..src send to dst), where the block
// from `src` starts among the rows `dst` receives, and how many rows it holds.
__device__ __forceinline__ int block_start(const int *rank_prefix, int src, int dst) {
  return src > 0 ? rank_prefix[(src - 1) * R + dst] : 0;
}
__device__ __forceinline__ int block_rows(const int *rank_prefix, int src, int dst) {
  return rank_prefix[src * R + dst] - block_start(rank_prefix, src, dst);
}

// Warp-uniform: a lane must not leave while the others go on to a full-warp shuffle.
__device__ __forceinline__ bool warp_aborted(const tsep::Fail &f) { return __any_sync(0xffffffffu, tsep::aborted(f)); }

enum { KERNEL_NOTIFY = 1, KERNEL_SEND = 2, KERNEL_RECV = 3, KERNEL_BARRIER = 4, KERNEL_COMBINE_SEND = 5, KERNEL_REDUCE = 6 };

__device__ __forceinline__ Ctrl *ctrl_of(const u64 *peers, int r) { return reinterpret_cast<Ctrl *>(peers[r]); }

__device__ __forceinline__ bool barrier_all(const u64 *peers, int me, u64 timeout_ns, const tsep::Fail &f,
                                            int kernel) {
  int *slots[R];
#pragma unroll
  for (int p = 0; p < R; ++p) slots[p] = ctrl_of(peers, p)->barrier;
  Ctrl *mine = ctrl_of(peers, me);
  return tsep::rank_barrier(slots, mine->barrier, &mine->round, me, R, timeout_ns, f, kernel, 0);
}

// Once any kernel of this rank gave up waiting (tsep::aborted), later kernels do nothing until reset(),
// rather than act on state a failed kernel never wrote.

// ------------------------------------------------------------------------------------------ notify
// Blocks 0..R-1: block r numbers this rank's tokens bound for rank r (send_pos[t][r], -1 if not sent).
// Block R: barrier, publish this rank's counts into every peer, barrier, then read everybody's counts:
// the rank prefix matrix, the received row count, the aligned per-expert counts for the host.
extern "C" __global__ void __launch_bounds__(256) tsep_notify(const u64 *peers, int me, int num_tokens,
                                                              const u8 *in_rank, const int *per_rank,
                                                              const int *per_expert, int *rank_prefix, int *send_pos,
                                                              int *recv_count, int *host, int seq, int alignment,
                                                              u64 timeout_ns, tsep::ErrorRecord *err, int *abort) {
  const tsep::Fail fail{err, abort};
  __shared__ int warp_sums[8];
  __shared__ int ok;
  if (blockIdx.x < R) {
    // Block-wide exclusive scan of in_rank[:, r] over contiguous per-thread chunks.
    const int r = blockIdx.x;
    const int per = (num_tokens + blockDim.x - 1) / blockDim.x;
    const int t0 = min(num_tokens, (int)threadIdx.x * per), t1 = min(num_tokens, t0 + per);
    int mine = 0;
    for (int t = t0; t < t1; ++t) mine += in_rank[(size_t)t * R + r];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    int base = 0;
    for (int w = 0; w < warp; ++w) base += warp_sums[w];
    int pos = base + incl - mine;
    for (int t = t0; t < t1; ++t) send_pos[(size_t)t * R + r] = in_rank[(size_t)t * R + r] ? pos++ : -1;
    return;
  }
  Ctrl *mine = ctrl_of(peers, me);
  if (threadIdx.x == 0) ok = !tsep::aborted(fail) && barrier_all(peers, me, timeout_ns, fail, KERNEL_NOTIFY);
  __syncthreads();
  if (!ok) return;
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int p = i / R, dst = i % R;
    tsep::st_relaxed_sys(&ctrl_of(peers, p)->count_matrix[me][dst], per_rank[dst]);
  }
  for (int i = threadIdx.x; i < R * EL; i += blockDim.x) {
    const int dst = i / EL, e = i % EL;
    tsep::st_relaxed_sys(&ctrl_of(peers, dst)->expert_counts[me][e], per_expert[i]);
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) ok = barrier_all(peers, me, timeout_ns, fail, KERNEL_NOTIFY);
  __syncthreads();
  if (!ok) return;
  if (threadIdx.x == 0) {
    int total = 0;
    for (int dst = 0; dst < R; ++dst) {
      int acc = 0;
      for (int src = 0; src < R; ++src) {
        acc += tsep::ld_volatile(&mine->count_matrix[src][dst]);
        rank_prefix[src * R + dst] = acc;
      }
      if (dst == me) total = acc;
    }
    *recv_count = total;
    host[1] = total;
    // Rows from each source (the copy-engine combine sizes its copies with them), after the experts.
    for (int src = 0; src < R; ++src)
      host[2 + EL + src] = block_rows(rank_prefix, src, me);
    ++mine->dispatch_seq;
  }
  for (int e = threadIdx.x; e < EL; e += blockDim.x) {
    int c = 0;
    for (int src = 0; src < R; ++src) c += tsep::ld_volatile(&mine->expert_counts[src][e]);
    host[2 + e] = (c + alignment - 1) / alignment * alignment;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) tsep::st_release_sys(&host[0], seq);
}

// A cached dispatch or a combine starts with this: every rank has finished with its buffer's data areas
// (stream order puts the previous receive or reduce before it), so peers may write into them.
// A combine's (which = 1) also tells every owner how many chunks this rank cuts the rows it returns into
// (`chunks`: the SM send's count, or the copy engines' pieces), in the slot of this combine's sequence
// number: the owner's reduce reads it after the barrier, and the slot is rewritten only two combines later,
// after the owner has passed the next barrier (its reduce is done).
extern "C" __global__ void tsep_prepare(const u64 *peers, int me, int which, int chunks, u64 timeout_ns,
                                        tsep::ErrorRecord *err, int *abort) {
  const tsep::Fail fail{err, abort};
  if (threadIdx.x != 0) return;
  if (tsep::aborted(fail)) return;
  Ctrl *mine = ctrl_of(peers, me);
  if (which == 1) {
    const u32 next = mine->combine_seq + 1;
    for (int p = 0; p < R; ++p) tsep::st_relaxed_sys(&ctrl_of(peers, p)->combine_chunks_from[me][next & 1], chunks);
  }
  if (!barrier_all(peers, me, timeout_ns, fail, KERNEL_BARRIER)) return;
  if (which == 0) ++mine->dispatch_seq;
  else ++mine->combine_seq;
}

// One warp copies a row of ROW_VECS 16-byte vectors from `src` to every non-null destination, loading each
// vector once (UNROLL loads per lane in flight) and storing it N times.
template <int N>
__device__ __forceinline__ void copy_row(const int4 *src, int4 *const (&dst)[N], int lane) {
  constexpr int UNROLL = TSEP_UNROLL;
  for (int v0 = 0; v0 < ROW_VECS; v0 += 32 * UNROLL) {
    int4 buf[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int v = v0 + u * 32 + lane;
      if (v < ROW_VECS) buf[u] = __ldg(src + v);
    }
#pragma unroll
    for (int d = 0; d < N; ++d) {
      if (dst[d] == nullptr) continue;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int v = v0 + u * 32 + lane;
        if (v < ROW_VECS) dst[d][v] = buf[u];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ dispatch
// Warps take chunks of C = per_chunk(T, num_chunks) tokens (chunk c = tokens [c·C, c·C + C)); each token's row is read once
// and stored to every destination rank's buffer. With `chunks_off` non-zero, a chunk's warp then tells
// every receiver which rows the chunk filled there (chunk_word, tagged with this dispatch's sequence
// number); every chunk in [0, num_chunks) is announced, empty or not. With `own.x` set, rows for this
// rank go straight into its outputs (same row numbers as in the buffer) instead of the buffer. The NCCL
// transport packs with the same kernel (its "peers" are staging regions) and passes chunks_off = 0.
extern "C" __global__ void __launch_bounds__(512) tsep_dispatch_send(
    const u64 *peers, int me, int num_tokens, const u8 *x, const u8 *scales, long long scale_s0,
    long long scale_s1, const idx_t *topk, const float *weights, const int *send_pos, const int *rank_prefix,
    Areas areas, Own own, int num_chunks, tsep::ErrorRecord *err, int *abort) {
  const tsep::Fail fail{err, abort};
  // After a timed-out notify the prefix matrix was never written: send nothing (peers time out too).
  if (warp_aborted(fail)) return;
  const int chunk_tokens = per_chunk(num_tokens, num_chunks);
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  const u32 seq = areas.chunks != 0 ? (u32)tsep::ld_volatile((const int *)&ctrl_of(peers, me)->dispatch_seq) : 0u;
  for (int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); c < num_chunks; c += warps) {
    int first[R], end[R];
#pragma unroll
    for (int r = 0; r < R; ++r) first[r] = end[r] = 0;
    const int t1 = min(num_tokens, (c + 1) * chunk_tokens);
    for (int t = c * chunk_tokens; t < t1; ++t) {
      // The token's side data (scales, ids, weights) is loaded with its positions, before the row, so the
      // reads overlap instead of each costing a round trip after the row's stores (which the compiler
      // cannot move them past: the pointers may alias). At one rank the FP8 send was latency-bound.
#if TSEP_SW > 0
      constexpr int SWL = (TSEP_SW + 31) / 32;  // scale words per lane
      int sw[SWL];
#pragma unroll
      for (int i = 0; i < SWL; ++i) {
        const int j = lane + 32 * i;
        sw[i] = j < TSEP_SW ? *reinterpret_cast<const int *>(scales + 4 * ((long long)t * scale_s0 + (long long)j * scale_s1))
                            : 0;
      }
#endif
#if TSEP_K > 0
      const long long e = lane < K ? (long long)topk[(size_t)t * K + lane] : -1;
#if TSEP_WEIGHTS
      const float w = lane < K && weights != nullptr ? weights[(size_t)t * K + lane] : 0.0f;
#endif
#endif
      u8 *dst_base[R];
      int row[R];
      int n = 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int pos = send_pos[(size_t)t * R + r];
        dst_base[r] = nullptr;
        row[r] = -1;
        if (pos >= 0) {
          row[r] = (rank_prefix != nullptr ? block_start(rank_prefix, me, r) : 0) + pos;
          dst_base[r] = reinterpret_cast<u8 *>(peers[r]);
          if (end[r] == first[r]) first[r] = pos;
          end[r] = pos + 1;
          ++n;
        }
      }
      if (n == 0) continue;
      int4 *dst[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool direct = r == me && own.x != nullptr;
        u8 *rows_at = direct ? own.x : dst_base[r] + areas.x;
        dst[r] = row[r] < 0 ? nullptr : reinterpret_cast<int4 *>(rows_at + (size_t)row[r] * ROW_BYTES);
      }
      copy_row(reinterpret_cast<const int4 *>(x + (size_t)t * ROW_BYTES), dst, lane);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (row[r] < 0) continue;
        const bool direct = r == me && own.x != nullptr;
#if TSEP_SW > 0
        int *sc = direct ? reinterpret_cast<int *>(own.scales) : reinterpret_cast<int *>(dst_base[r] + areas.scales);
#pragma unroll
        for (int i = 0; i < SWL; ++i)
          if (lane + 32 * i < TSEP_SW) sc[(size_t)row[r] * TSEP_SW + lane + 32 * i] = sw[i];
#endif
        int *si = direct ? own.src_idx : reinterpret_cast<int *>(dst_base[r] + areas.src_idx);
        if (lane == 0 && si != nullptr) si[row[r]] = t;
#if TSEP_K > 0
        idx_t *tk = direct ? own.topk : reinterpret_cast<idx_t *>(dst_base[r] + areas.topk);
        if (lane < K && tk != nullptr) {
          const bool local = e >= 0 && e / EL == r;
          tk[(size_t)row[r] * K + lane] = local ? (idx_t)(e - r * EL) : (idx_t)-1;
#if TSEP_WEIGHTS
          float *wt = direct ? own.weights : reinterpret_cast<float *>(dst_base[r] + areas.weights);
          if (wt != nullptr) wt[(size_t)row[r] * K + lane] = local ? w : 0.0f;
#endif
        }
#endif
      }
    }
    if (areas.chunks == 0) continue;
    // __syncwarp orders every lane's stores of the chunk before lane r's release store to rank r.
    __syncwarp();
    if (lane < R) {
      u64 *word = reinterpret_cast<u64 *>(reinterpret_cast<u8 *>(peers[lane]) + areas.chunks) + (size_t)me * num_chunks + c;
      u32 f = 0, e = 0;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r == lane) f = first[r], e = end[r];
      tsep::st_release_sys_u64(word, chunk_word(seq, f, e));
    }
  }
}

// One warp copies `n` 16-byte vectors, 8 loads per lane in flight: the most that fits the 64 registers a
// thread of a 1024-thread block has (more spills), and what peer-bandwidth's fastest local copy uses.
__device__ __forceinline__ void warp_copy_vecs(int4 *dst, const int4 *src, size_t n, int lane) {
  constexpr int UNROLL = 8;
  for (size_t v0 = 0; v0 < n; v0 += 32 * UNROLL) {
    int4 buf[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const size_t v = v0 + u * 32 + lane;
      if (v < n) buf[u] = src[v];
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const size_t v = v0 + u * 32 + lane;
      if (v < n) dst[v] = buf[u];
    }
  }
}

// One warp copies `n` 4-byte words.
__device__ __forceinline__ void warp_copy_words(u32 *dst, const u32 *src, size_t n, int lane) {
  for (size_t i = lane; i < n; i += 32) dst[i] = src[i];
}

// Receiver, concurrent with the send kernels: warps take (chunk, source) items in the order senders
// produce them, wait for the chunk's word, then copy its rows (already in final order) from the buffer
// into the outputs (rows [N, rows) of a worst-case output were filled by the host's memsets before this
// kernel). `out_src_idx` is null for a cached dispatch (the handle keeps its copy). With `own_direct`
// this rank's own rows are in the outputs already (the send wrote them there): only peers' are copied.
extern "C" __global__ void __launch_bounds__(1024) tsep_dispatch_recv(
    const u64 *peers, int me, const int *rank_prefix, const int *recv_count, int rows, u8 *out_x, u8 *out_scales,
    int *out_src_idx, idx_t *out_topk, float *out_weights, Areas areas, int own_direct, int num_chunks,
    u64 timeout_ns, tsep::ErrorRecord *err, int *abort) {
  const tsep::Fail fail{err, abort};
  if (warp_aborted(fail)) return;
  Ctrl *mine = ctrl_of(peers, me);
  const u32 seq = (u32)tsep::ld_volatile((const int *)&mine->dispatch_seq);
  const u8 *base = reinterpret_cast<const u8 *>(peers[me]);
  const int n = min(max(*recv_count, 0), rows);
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  const u64 *words = reinterpret_cast<const u64 *>(base + areas.chunks);
  // Items (chunk, source), chunk-major; with own_direct this rank's own source is left out.
  const int srcs = own_direct ? R - 1 : R;
  for (int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); j < num_chunks * srcs; j += warps) {
    const int c = j / srcs, s = own_direct ? (me + 1 + j % srcs) % R : j % R;
    u64 word = 0;
    int ok = 1;
    if (lane == 0)
      ok = tsep::wait_tag(words + (size_t)s * num_chunks + c, seq, DISPATCH_TAG_BITS, &word, timeout_ns, fail, me,
                          KERNEL_RECV, c, s);
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (!ok) return;
    word = __shfl_sync(0xffffffffu, word, 0);
    __syncwarp();  // orders the other lanes' reads of the chunk after lane 0's acquire
    const int first = (int)((word >> POS_BITS) & ((1u << POS_BITS) - 1)), end = (int)(word & ((1u << POS_BITS) - 1));
    if (end <= first) continue;
    // Rows of source s start at its block offset; a bad count must not send the copy astray.
    const int r0 = block_start(rank_prefix, s, me) + first;
    const int cnt = min(end - first, n - r0);
    if (cnt <= 0 || r0 < 0) continue;
    warp_copy_vecs(reinterpret_cast<int4 *>(out_x + (size_t)r0 * ROW_BYTES),
                   reinterpret_cast<const int4 *>(base + areas.x + (size_t)r0 * ROW_BYTES), (size_t)cnt * ROW_VECS, lane);
#if TSEP_SW > 0
    warp_copy_words(reinterpret_cast<u32 *>(out_scales) + (size_t)r0 * TSEP_SW,
                    reinterpret_cast<const u32 *>(base + areas.scales) + (size_t)r0 * TSEP_SW, (size_t)cnt * TSEP_SW, lane);
#endif
    if (out_src_idx != nullptr)
      warp_copy_words(reinterpret_cast<u32 *>(out_src_idx) + r0, reinterpret_cast<const u32 *>(base + areas.src_idx) + r0,
                      cnt, lane);
#if TSEP_K > 0
    constexpr int IDW = sizeof(idx_t) / 4;  // words per id
    if (out_topk != nullptr)
      warp_copy_words(reinterpret_cast<u32 *>(out_topk) + (size_t)r0 * K * IDW,
                      reinterpret_cast<const u32 *>(base + areas.topk) + (size_t)r0 * K * IDW, (size_t)cnt * K * IDW, lane);
#if TSEP_WEIGHTS
    if (out_weights != nullptr)
      warp_copy_words(reinterpret_cast<u32 *>(out_weights) + (size_t)r0 * K,
                      reinterpret_cast<const u32 *>(base + areas.weights) + (size_t)r0 * K, (size_t)cnt * K, lane);
#endif
#endif
  }
}

// ------------------------------------------------------------------------------------------ combine
// Expert side: row q of the block of x that came from source rank s (the rank prefix column's block) goes
// back to rank s's stage at [me][q], where s finds its token t at q = send_pos[t][me]. Warps take (chunk,
// source) items, chunk-major so every link carries traffic at once and every owner's tokens arrive in
// order; a chunk is per_chunk(rows from that source, num_chunks) consecutive rows of one source's block,
// announced when written (empty chunks are not: nobody waits for them). The block from this rank itself
// stays where it is (the reduce reads it in x). The copy-engine combine moves the same blocks with the
// host's copies instead (src/ep/gpu/normal.ts).
extern "C" __global__ void __launch_bounds__(512) tsep_combine_send(const u64 *peers, int me, const u8 *x,
                                                                   const int *rank_prefix, const float *weights,
                                                                   Areas areas, int num_chunks,
                                                                   tsep::ErrorRecord *err, int *abort) {
  if (warp_aborted(tsep::Fail{err, abort})) return;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  const u32 seq = (u32)tsep::ld_volatile((const int *)&ctrl_of(peers, me)->combine_seq);
  for (int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); j < R * num_chunks; j += warps) {
    const int s = j % R, k = j / R;
    if (s == me) continue;  // this rank's own rows: its reduce reads them in x itself
    const int start = block_start(rank_prefix, s, me);
    const int count = block_rows(rank_prefix, s, me);
    const int chunk_tokens = per_chunk(count, num_chunks);
    const int k1 = min(count, (k + 1) * chunk_tokens);
    if (k * chunk_tokens >= k1) continue;  // nobody waits for an empty chunk
    u8 *base = reinterpret_cast<u8 *>(peers[s]);
    for (int q = k * chunk_tokens; q < k1; ++q) {
      const int i = start + q;
      const size_t slot = (size_t)me * TSEP_TMAX + q;
#if TSEP_WEIGHTS
      // Loaded before the row, as in the dispatch send: its latency overlaps the row's loads.
      const float w = weights != nullptr && lane < K ? weights[(size_t)i * K + lane] : 0.0f;
#endif
      int4 *const dst[1] = {reinterpret_cast<int4 *>(base + areas.x + slot * ROW_BYTES)};
      copy_row(reinterpret_cast<const int4 *>(x + (size_t)i * ROW_BYTES), dst, lane);
#if TSEP_WEIGHTS
      if (weights != nullptr && lane < K) reinterpret_cast<float *>(base + areas.weights)[slot * K + lane] = w;
#endif
    }
    __syncwarp();
    if (lane == 0)
      tsep::st_release_sys_u64(
          reinterpret_cast<u64 *>(base + areas.combine_chunks) + (size_t)me * num_chunks + k, (u64)seq << 32);
  }
}

// Copy-engine combine: the host copied piece `piece` of the rows this rank returns to rank `dst` (stream
// order puts the copy before this launch); announce it with the word the send kernel would write. The tag
// is read here, on the device, so a captured graph's replays tag each combine right.
extern "C" __global__ void tsep_combine_signal(const u64 *peers, int me, int dst, int piece, Areas areas,
                                               int num_chunks, tsep::ErrorRecord *err, int *abort) {
  if (threadIdx.x != 0 || tsep::aborted(tsep::Fail{err, abort})) return;
  const u32 seq = (u32)tsep::ld_volatile((const int *)&ctrl_of(peers, me)->combine_seq);
  u64 *word = reinterpret_cast<u64 *>(reinterpret_cast<u8 *>(peers[dst]) + areas.combine_chunks) +
              (size_t)me * num_chunks + piece;
  __threadfence_system();
  tsep::st_release_sys_u64(word, (u64)seq << 32);
}

// Owner side: one warp per token; out = bf16(bias0 + bias1 + Σ_{ranks r, ascending} row[r][t]) in float32.
// The row of token t from rank r is stage row row_base(r) + send_pos[t][r]: rank r returns the rows of
// this rank's block in order. NVLink (areas.combine_chunks set, `row_base` null): row_base(r) = r·T_max,
// and the warp first waits for the chunk holding the row, chunk send_pos[t][r] / per_chunk(rows this rank
// sent to r, chunks rank r cut them into: its combine_chunks_from entry), word [r][chunk] (words
// num_chunks apart whatever the cut) (a warp's tokens ascend, so it waits once per new chunk). NCCL: row_base[r] (rank r's block arrived whole, before this kernel).
// With `own_x` (NVLink), the rows this rank returns to itself are read where they are: row
// own_start + send_pos[t][me] of own_x (the combine's input; weights in own_weights), no wait.
extern "C" __global__ void __launch_bounds__(512) tsep_combine_reduce(const u64 *peers, int me, int num_tokens,
                                                                     const u8 *in_rank, const u16 *bias0,
                                                                     const u16 *bias1, u16 *out, float *out_weights,
                                                                     const int *send_pos, const int *row_base,
                                                                     const int *rank_prefix, Areas areas,
                                                                     int num_chunks, const u8 *own_x,
                                                                     const float *own_weights, u64 timeout_ns,
                                                                     tsep::ErrorRecord *err, int *abort) {
  const tsep::Fail fail{err, abort};
  if (warp_aborted(fail)) return;
  const u8 *base = reinterpret_cast<const u8 *>(peers[me]);
  const bool wait = areas.combine_chunks != 0;
  const Ctrl *mine = ctrl_of(peers, me);
  const u32 seq = wait ? (u32)tsep::ld_volatile((const int *)&mine->combine_seq) : 0u;
  int chunk_rows[R];  // rows per chunk of what this rank sent to rank r, as rank r cut them (into the
                      // chunk count it published; its words are still num_chunks apart)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int cut = wait ? max(1, tsep::ld_volatile(&mine->combine_chunks_from[r][seq & 1])) : 1;
    chunk_rows[r] = wait ? per_chunk(block_rows(rank_prefix, me, r), cut) : 1;
  }
  const u64 *words = reinterpret_cast<const u64 *>(base + areas.combine_chunks);
  const int own_start = own_x != nullptr ? block_start(rank_prefix, me, me) : 0;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  constexpr int HV = H / 8;  // 8 bf16 per 16-byte vector
  static_assert(H % 8 == 0, "hidden must be a multiple of 8");
  int seen[R];  // the chunk of rank r this warp last saw arrive
#pragma unroll
  for (int r = 0; r < R; ++r) seen[r] = -1;
  for (int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); t < num_tokens; t += warps) {
    unsigned mask = 0;
    const uint4 *row_at[R];  // token t's row from rank r
    [[maybe_unused]] const float *weights_at[R];  // read only with TSEP_WEIGHTS
#pragma unroll
    for (int r = 0; r < R; ++r) {
      mask |= (unsigned)in_rank[(size_t)t * R + r] << r;
      const int pos = send_pos[(size_t)t * R + r];
      if (r == me && own_x != nullptr) {
        const size_t i = (size_t)own_start + pos;
        row_at[r] = reinterpret_cast<const uint4 *>(own_x + i * ROW_BYTES);
        weights_at[r] = own_weights + i * K;
        continue;
      }
      const size_t stage_row = (row_base != nullptr ? (size_t)row_base[r] : (size_t)r * TSEP_TMAX) + pos;
      row_at[r] = reinterpret_cast<const uint4 *>(base + areas.x + stage_row * ROW_BYTES);
      weights_at[r] = reinterpret_cast<const float *>(base + areas.weights) + stage_row * K;
      if (wait && ((mask >> r) & 1) && pos >= 0 && pos / chunk_rows[r] != seen[r]) {
        seen[r] = pos / chunk_rows[r];
        int ok = 1;
        u64 word;
        if (lane == 0)
          ok = tsep::wait_tag(words + (size_t)r * num_chunks + seen[r], seq, COMBINE_TAG_BITS, &word, timeout_ns, fail,
                              me, KERNEL_REDUCE, seen[r], r);
        if (!__shfl_sync(0xffffffffu, ok, 0)) return;
        __syncwarp();  // orders the other lanes' reads of the rows after lane 0's acquire
      }
    }
    // U vectors per lane per step, every source row's loads issued before the sums: the reduce runs on a
    // few SMs beside the sends, so it needs many bytes in flight per SM: with all R sources present about
    // 2·UNROLL loads per lane (at most 16, and at least 2 per source: registers), so fewer ranks take
    // longer steps (one rank: 214 -> 123 µs at 24 SMs with UNROLL 8, RESULTS).
    constexpr int U_ALL = 2 * TSEP_UNROLL < 16 ? 2 * TSEP_UNROLL : 16;
    constexpr int U = U_ALL / R > 2 ? U_ALL / R : 2;
    for (int v0 = lane; v0 < HV; v0 += 32 * U) {
      uint4 in[R][U];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (!((mask >> r) & 1)) continue;
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (v0 + 32 * u < HV)
            in[r][u] = row_at[r][v0 + 32 * u];
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + 32 * u;
        if (v >= HV) break;
        float acc[8];
        uint4 b0 = make_uint4(0, 0, 0, 0), b1 = make_uint4(0, 0, 0, 0);
        if (bias0 != nullptr) b0 = reinterpret_cast<const uint4 *>(bias0 + (size_t)t * H)[v];
        if (bias1 != nullptr) b1 = reinterpret_cast<const uint4 *>(bias1 + (size_t)t * H)[v];
        const u32 *p0 = &b0.x, *p1 = &b1.x;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[2 * j] = __fadd_rn(tsep::bf16_lo_f32(p0[j]), tsep::bf16_lo_f32(p1[j]));
          acc[2 * j + 1] = __fadd_rn(tsep::bf16_hi_f32(p0[j]), tsep::bf16_hi_f32(p1[j]));
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (!((mask >> r) & 1)) continue;
          const u32 *q = &in[r][u].x;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[2 * j] = __fadd_rn(acc[2 * j], tsep::bf16_lo_f32(q[j]));
            acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], tsep::bf16_hi_f32(q[j]));
          }
        }
        uint4 o;
        u32 *po = &o.x;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          po[j] = (u32)tsep::f32_to_bf16(acc[2 * j]) | ((u32)tsep::f32_to_bf16(acc[2 * j + 1]) << 16);
        reinterpret_cast<uint4 *>(out + (size_t)t * H)[v] = o;
      }
    }
#if TSEP_WEIGHTS
    if (out_weights != nullptr && lane < K) {
      float w = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if ((mask >> r) & 1)
          w = __fadd_rn(w, weights_at[r][lane]);
      out_weights[(size_t)t * K + lane] = w;
    }
#endif
  }
}

// ------------------------------------------------------------------------------------------ NCCL helpers
// The NCCL transport's worst-case mode keeps every count on the device: the all-gathered counts (row s =
// rank s's [per-rank | per-expert | shape] words, `stride` words apart) give the received rows per source.

// One block: the rank prefix matrix, the received row count and the rows received from each source.
extern "C" __global__ void tsep_nccl_counts(const int *all, int stride, int me, int *rank_prefix, int *recv_count,
                                            int *recv_from) {
  if (threadIdx.x != 0) return;
  for (int dst = 0; dst < R; ++dst) {
    int acc = 0;
    for (int src = 0; src < R; ++src) {
      acc += all[src * stride + dst];
      rank_prefix[src * R + dst] = acc;
    }
  }
  int total = 0;
  for (int src = 0; src < R; ++src) {
    recv_from[src] = all[src * stride + me];
    total += recv_from[src];
  }
  *recv_count = total;
}

// Moves R blocks of rows between a padded layout (block s starts `block_stride` bytes after block s−1,
// `count[s]` rows used) and a packed one (block s right after block s−1). gather: padded `src` -> packed
// `dst` of `dst_rows` rows, the rows past the last block filled with `fill`; else scatter: packed `src` ->
// padded `dst`.
extern "C" __global__ void tsep_move_blocks(const int *count, int gather, const u8 *src, u8 *dst,
                                            long long block_stride, int dst_rows, int row_bytes, int fill) {
  __shared__ int start[R + 1];
  if (threadIdx.x == 0) {
    start[0] = 0;  // counts come from the device; clamped so a bad one cannot send the copies astray
    for (int s = 0; s < R; ++s) start[s + 1] = start[s] + min(max(count[s], 0), TSEP_TMAX);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  const int rows = gather ? dst_rows : start[R];
  for (int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < rows; i += warps) {
    if (i >= start[R]) {  // gather only: past the received rows
      for (int b = lane; b < row_bytes; b += 32) dst[(size_t)i * row_bytes + b] = (u8)fill;
      continue;
    }
    int s = 0;
    while (i >= start[s + 1]) ++s;
    const size_t padded = (size_t)s * block_stride + (size_t)(i - start[s]) * row_bytes;
    const size_t packed = (size_t)i * row_bytes;
    const u8 *from = src + (gather ? padded : packed);
    u8 *to = dst + (gather ? packed : padded);
    if (((row_bytes | (size_t)from | (size_t)to) & 15) == 0) {
      for (int v = lane; v < row_bytes / 16; v += 32)
        reinterpret_cast<int4 *>(to)[v] = reinterpret_cast<const int4 *>(from)[v];
    } else {
      for (int b = lane; b < row_bytes; b += 32) to[b] = from[b];
    }
  }
}
