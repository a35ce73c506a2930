// Peer-memory test patterns for symmetric buffers (test/gpu/process-group.test.ts).
//
// Every local rank's symmetric buffer is cut into `local_size` slots of `slot_words` 32-bit words; slot w of
// reader r's buffer belongs to writer w, and word i of it must end up holding
//     tsep_pattern(seed, w, r, i)
// The host mirrors tsep_pattern in TypeScript (test/gpu/fixtures/pg-pattern.ts), so the host can check
// what the kernels wrote independently of the kernels.
//
// Both kernels address a region by `mode` and blockIdx.y = y, through the table of peer base addresses:
//   MODE_PEER  (0): buffer y (a peer, through NVLink), slot me: writer = me, reader = y
//   MODE_LOCAL (1): buffer me (this GPU),              slot y:  writer = y,  reader = me
// so the writer's fill is MODE_PEER, the reader's check of its own buffer is MODE_LOCAL, and the poison a
// reader puts in its own buffer beforehand is MODE_LOCAL with a non-zero xor mask (every word then differs
// from the pattern, so a word nobody wrote always fails).
#include "common.cuh"

#define MODE_PEER 0
#define MODE_LOCAL 1

// murmur3's 32-bit finalizer: a bijection on u32, so distinct inputs give distinct words.
__device__ __forceinline__ u32 tsep_mix(u32 h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// The per-(seed, writer, reader) base. Two different bases give different words at EVERY index
// (mix(base ^ i) is a bijection of base ^ i), so a word written with another rank pair's pattern never passes.
__device__ __forceinline__ u32 tsep_pattern_base(u32 seed, u32 writer, u32 reader) {
  const u32 h = tsep_mix(seed ^ 0x9e3779b9u);
  return tsep_mix(h ^ (writer * 0x01000193u + reader * 0x27d4eb2fu + 0x165667b1u));
}

__device__ __forceinline__ u32 tsep_pattern_at(u32 base, u32 i) { return tsep_mix(base ^ i); }

struct Region {
  u32 *words;
  u32 writer;
  u32 reader;
};

__device__ __forceinline__ Region region_of(const u64 *peers, int me, int mode, int y, u64 slot_words) {
  Region r;
  if (mode == MODE_PEER) {
    r.words = reinterpret_cast<u32 *>(peers[y]) + (u64)me * slot_words;
    r.writer = (u32)me;
    r.reader = (u32)y;
  } else {
    r.words = reinterpret_cast<u32 *>(peers[me]) + (u64)y * slot_words;
    r.writer = (u32)y;
    r.reader = (u32)me;
  }
  return r;
}

// Fills the region of blockIdx.y with the pattern XOR `xor_mask` (0: the pattern itself).
// Launch: grid (blocks, local_size), any block size. slot_words < 2^32.
extern "C" __global__ void tsep_pattern_fill(const u64 *peers, int me, int mode, u32 seed, u64 slot_words,
                                             u32 xor_mask) {
  const Region r = region_of(peers, me, mode, blockIdx.y, slot_words);
  const u32 base = tsep_pattern_base(seed, r.writer, r.reader);
  const u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < slot_words; i += stride)
    r.words[i] = tsep_pattern_at(base, (u32)i) ^ xor_mask;
  // Make the stores (remote ones included) visible system-wide before the kernel is seen as done.
  __threadfence_system();
}

// Counts the words of the region of blockIdx.y that differ from the pattern XOR `xor_mask`:
// bad_count[y] += mismatches, first_bad[y] = min(first_bad[y], index of a mismatch).
// The caller zeroes bad_count and sets first_bad to all ones (0xff bytes) before the launch.
// Launch: grid (blocks, local_size), block a multiple of 32.
extern "C" __global__ void tsep_pattern_check(const u64 *peers, int me, int mode, u32 seed, u64 slot_words,
                                              u32 xor_mask, u64 *bad_count, u64 *first_bad) {
  const Region r = region_of(peers, me, mode, blockIdx.y, slot_words);
  const u32 base = tsep_pattern_base(seed, r.writer, r.reader);
  const u64 stride = (u64)gridDim.x * blockDim.x;
  u32 bad = 0;
  u64 first = ~0ull;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < slot_words; i += stride) {
    const u32 got = *reinterpret_cast<volatile const u32 *>(r.words + i);
    if (got != (tsep_pattern_at(base, (u32)i) ^ xor_mask)) {
      if (bad == 0) first = i;
      bad++;
    }
  }
  // Warp-reduce, then one atomic per warp.
  for (int o = 16; o > 0; o >>= 1) {
    bad += __shfl_xor_sync(0xffffffffu, bad, o);
    const u64 other = __shfl_xor_sync(0xffffffffu, first, o);
    first = other < first ? other : first;
  }
  if ((threadIdx.x & 31) == 0 && bad != 0) {
    atomicAdd(bad_count + blockIdx.y, (u64)bad);
    atomicMin(first_bad + blockIdx.y, first);
  }
}
