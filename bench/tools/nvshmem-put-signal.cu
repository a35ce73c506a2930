// NVSHMEM spike (issue #9, docs/multi-host.md "NVSHMEM spike"): a kernel that tsep compiles at run time
// with NVRTC (-rdc) and links against libnvshmem_device.a (src/jit/link.ts). Driven by
// bench/tools/nvshmem-spike.ts; `npm run check:kernels` also builds it with nvcc -rdc where the NVSHMEM
// headers are found.
//
// Every block puts its slice of `src` into `dst` on PE `peer` with one put-with-signal (NVSHMEM_SIGNAL_ADD
// of 1 to `sig` there), then block 0 waits until its own `sig` reaches `expect` (the blocks every launch so
// far on the sending PE added; the host tracks it, so the word is never reset and launches can run back to
// back). The wait is bounded by %globaltimer: on expiry the kernel writes 2 to status[0] (sticky across
// later launches) and the last value seen to status[1..2] instead of hanging the GPU; a completed wait
// writes 1 unless an earlier launch timed out. The host zeroes status before a batch and reads it after.
#include <nvshmem.h>
#include <nvshmemx.h>

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

extern "C" __global__ void put_signal(unsigned char *dst, const unsigned char *src, unsigned long long bytes,
                                      uint64_t *sig, uint64_t expect, int peer,
                                      unsigned long long timeout_ns, unsigned int *status) {
  // Slices are 16-byte multiples so every put starts aligned; the last block takes the remainder.
  const unsigned long long per = (bytes / gridDim.x) & ~15ull;
  const unsigned long long off = per * blockIdx.x;
  const unsigned long long len = blockIdx.x + 1 == gridDim.x ? bytes - off : per;
  nvshmemx_putmem_signal_block(dst + off, src + off, len, sig, 1, NVSHMEM_SIGNAL_ADD, peer);

  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const unsigned long long start = globaltimer_ns();
  uint64_t seen = nvshmem_signal_fetch(sig);
  while (seen < expect) {
    if (globaltimer_ns() - start > timeout_ns) {
      status[1] = (unsigned int)seen;
      status[2] = (unsigned int)(seen >> 32);
      status[0] = 2;
      return;
    }
    __nanosleep(100);
    seen = nvshmem_signal_fetch(sig);
  }
  // Already satisfied, so this returns at once; it orders the payload reads after the signal, as NVSHMEM's
  // own wait does.
  nvshmem_signal_wait_until(sig, NVSHMEM_CMP_GE, expect);
  if (status[0] == 0) status[0] = 1;
}
