// Low-latency dispatch and combine on the GPU (src/ep/gpu/low-latency.ts over NVLink, 'auto' here, and
// src/ep/gpu/nccl-low-latency.ts over NCCL), R = 2, 4 (and all visible GPUs), against the CPU reference bit
// for bit: FP8 (f32, power-of-two and UE8M0 scales) and BF16 payloads, i32 and i64 routing with -1 slots, a
// hot expert, an unpicked expert, ranks with 0, 1, 7 and 128 tokens, hidden 2048/4096/7168, top-1 and top-8
// of 8/64/288 experts, the receive hooks (also two calls in flight before their hooks), 100 CUDA-graph
// replays with fresh inputs, the public EpBuffer API (mode low-latency, backend gpu), and a device timeout
// (one rank skips a call) followed by clean() (NVLink) or reset() (NCCL). The cases and checks are in
// fixtures/ll-check.ts. TSEP_TEST_SEED replays a seed.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { rankCounts, runCheckFixture, skipFor } from './ranks.ts';

const JOB_TIMEOUT_S = 240;

for (const ranks of rankCounts.length > 0 ? rankCounts : [2]) {
  for (const transport of ['auto', 'nccl']) {
    const name = `low-latency mode${transport === 'nccl' ? ' over NCCL' : ''}, ${ranks} ranks, against the CPU reference`;
    test(name, {
      skip: skipFor(ranks, { nccl: transport === 'nccl' }),
      timeout: (JOB_TIMEOUT_S + 30) * 1000,
    }, async () => {
      const { stdout, detail } = await runCheckFixture('ll-check', name, ranks, transport, JOB_TIMEOUT_S);
      const want = transport === 'nccl' ? 'nccl' : 'nvlink';
      for (let r = 0; r < ranks; r++) {
        assert.match(stdout, new RegExp(`^\\[rank ${r}\\] ll-check transport ${want}$`, 'm'), detail);
        assert.match(stdout, new RegExp(`^\\[rank ${r}\\] ll all ok rank ${r}$`, 'm'), detail);
      }
    });
  }
}
