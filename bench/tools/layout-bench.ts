// The layout kernel alone (issue "Normal mode": layout ≤ 15 µs at EP4), run under the launcher:
//   node src/cli/main.ts launch -n 4 -- node bench/tools/layout-bench.ts [--tokens 4096 --topk 8
//     --experts 256 --iters 50 --seed N]
// Ranks take turns: one rank times `getDispatchLayout` while the others wait at a barrier, so ranks that
// share one GPU (the one-GPU machine) do not disturb each other's timing. Per input set (uniform routing,
// 20 % -1 slots, one hot expert) and index width (i32, i64): CUDA events around each call, a 256 MiB
// memset before each (cold L2, and the host enqueues ahead of the GPU), median of `iters`; then the last
// call's outputs are compared with the CPU reference (src/cpu/ref-layout.ts). Prints one line per case.

import { parseArgs } from 'node:util';
import { Rng } from '../../src/cpu/random.ts';
import { referenceLayout } from '../../src/cpu/ref-layout.ts';
import { DeviceTensor } from '../../src/device/device-tensor.ts';
import { initProcessGroup } from '../../src/dist/init.ts';
import { EpBuffer } from '../../src/ep/buffer.ts';
import type { DispatchLayout } from '../../src/ep/types.ts';
import { host as hostOf, sameTensor } from '../../test/gpu/fixtures/ep-compare.ts';
import { type RoutingShape, randomRouting, routingTensor } from '../../test/unit/helpers/inputs.ts';
import { l2Flusher, summarize, timeEvents } from '../stats.ts';

const { values: opt } = parseArgs({
  options: {
    tokens: { type: 'string', default: '4096' },
    topk: { type: 'string', default: '8' },
    experts: { type: 'string', default: '256' },
    iters: { type: 'string', default: '50' },
    seed: { type: 'string', default: String(Date.now() >>> 0) },
  },
  strict: true,
});
const T = Number(opt.tokens);
const K = Number(opt.topk);
const E = Number(opt.experts);
const iters = Number(opt.iters);

const group = await initProcessGroup({ timeoutMs: 120_000 });
const { rank, size: R } = group;
const buffer = await EpBuffer.create(group, {
  hidden: 2048,
  maxTokensPerRank: T,
  numExperts: E,
  numTopk: K,
  backend: 'gpu',
  mode: 'normal',
});
const stream = buffer.stream!;
const l2 = l2Flusher(stream.device, rank);
const rng = new Rng(Number(opt.seed) + rank);

const sets: [string, RoutingShape][] = [
  ['uniform', {}],
  ['20% -1', { dropRate: 0.2 }],
  ['hot expert', { hotExpert: 3 }],
];

for (let turn = 0; turn < R; turn++) {
  await group.barrier();
  if (turn !== rank) continue;
  for (const [label, shape] of sets) {
    for (const dtype of ['i32', 'i64'] as const) {
      const host = routingTensor(dtype, T, K, randomRouting(rng, T, K, E, shape));
      const topk = DeviceTensor.fromHostStorage(host, stream.device);
      let last: DispatchLayout | undefined;
      // The previous call's outputs are freed outside the timed interval (stream-ordered frees).
      const release = () => {
        for (const t of Object.values(last ?? {})) (t as DeviceTensor).dispose();
        last = undefined;
      };
      const ms = await timeEvents(
        stream,
        iters,
        (_, warmup) => {
          if (warmup) release(); // timed calls release in beforeEach
          last = buffer.getDispatchLayout(topk, E);
        },
        {
          beforeEach: () => {
            release();
            l2.flush(stream);
          },
        },
      );
      await stream.synchronize();
      const want = referenceLayout(host, E, R);
      const where = `layout bench rank ${rank} ${label} ${dtype}`;
      sameTensor(`${where} numTokensPerRank`, hostOf(last!.numTokensPerRank), want.numTokensPerRank);
      sameTensor(`${where} numTokensPerExpert`, hostOf(last!.numTokensPerExpert), want.numTokensPerExpert);
      sameTensor(`${where} isTokenInRank`, hostOf(last!.isTokenInRank), want.isTokenInRank);
      const s = summarize(ms.map((v) => v * 1000));
      process.stdout.write(
        `layout rank ${rank} R=${R} T=${T} K=${K} E=${E} ${label} ${dtype}: median ${s.median.toFixed(1)} us ` +
          `(p10 ${s.p10.toFixed(1)}, p90 ${s.p90.toFixed(1)}), equal to the CPU reference\n`,
      );
      release();
      topk.dispose();
    }
  }
}
await group.barrier();
l2.dispose();
await buffer.destroy();
await group.destroy();
