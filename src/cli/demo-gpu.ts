// The demo on GPUs: `tsep demo` launches itself once per visible GPU (tsep launch), and every rank runs
// the same MoE round trip as the CPU demo with device tensors on the GPU backend. Rank 0 prints the table.

import { Rng } from '../cpu/random.ts';
import { Device } from '../device/context.ts';
import { DeviceTensor } from '../device/device-tensor.ts';
import type { HostTensor } from '../device/tensor.ts';
import { initProcessGroup } from '../dist/init.ts';
import { launch } from '../dist/launcher.ts';
import { EpBuffer } from '../ep/buffer.ts';
import type { Tensor } from '../ep/types.ts';
import {
  type DemoOptions,
  type DemoRow,
  formatDemo,
  lowLatencyExperts,
  makeRankData,
  normalExperts,
  onHost,
  worstError,
} from './demo.ts';

/** GPUs this process can see (0 without a driver); at most 8, the NVLink modes' limit. */
export function visibleGpuCount(): number {
  try {
    return Math.min(8, Device.count());
  } catch {
    return 0;
  }
}

/** Runs the demo as `gpus` ranks under the launcher; resolves to the exit code. */
export async function launchGpuDemo(
  gpus: number,
  o: Omit<DemoOptions, 'ranks'> & { ranks?: number },
): Promise<number> {
  const args = [process.argv[1]!, 'demo', '--tokens', String(o.tokens), '--hidden', String(o.hidden)];
  const experts = Math.ceil(o.experts / gpus) * gpus;
  args.push(
    '--experts',
    String(experts),
    '--topk',
    String(o.topk),
    '--seed',
    String(o.seed),
    '--backend',
    'gpu',
  );
  const result = await launch({ nprocPerNode: gpus, command: process.execPath, args, timeoutS: 600 });
  return result.exitCode;
}

const dev = (t: HostTensor): Tensor => DeviceTensor.fromHost(t);

/** One rank of the GPU demo (run under tsep launch). Resolves to this rank's exit code. */
export async function runGpuDemoRank(o: DemoOptions): Promise<number> {
  const group = await initProcessGroup();
  const R = group.size;
  const opts = { ...o, ranks: R };
  // Same draws as the CPU demo: the factors, then every rank's data in rank order.
  const rng = new Rng(o.seed);
  const factor = Float64Array.from({ length: o.experts }, () => 0.5 + rng.float());
  const data = Array.from({ length: R }, () => makeRankData(rng, opts))[group.rank]!;
  // Both modes over whichever transport 'auto' picks (NVLink, or NCCL without peer access).
  const buffer = await EpBuffer.create(group, {
    hidden: o.hidden,
    maxTokensPerRank: o.tokens,
    numExperts: o.experts,
    numTopk: o.topk,
    fp8: true,
    backend: 'gpu',
    mode: 'both',
  });
  const first = group.rank * (o.experts / R);
  const x = dev(data.x);
  const topkIdx = dev(data.topkIdx);
  const topkWeights = dev(data.topkWeights);

  // Normal mode: dispatch, the toy experts on the host, combine.
  let start = performance.now();
  const d = await buffer.dispatch({
    x,
    topkIdx,
    topkWeights,
    layout: buffer.getDispatchLayout(topkIdx, o.experts),
  });
  await d.event.wait();
  // The toy experts copy what they read to the host (onHost).
  const y = normalExperts(d, factor, first, o.hidden);
  const c = await buffer.combine({ x: dev(y), handle: d.handle });
  await c.event.wait();
  const normal = onHost(c.combinedX);
  const normalMs = performance.now() - start;

  // Low-latency mode: FP8 dispatch quantized on the GPU, dequantize-and-scale experts, weighted combine.
  start = performance.now();
  const ll = buffer.lowLatencyDispatch({ x, topkIdx, fp8: true });
  await ll.event.wait();
  const yl = lowLatencyExperts(ll, factor, first);
  const out = buffer.lowLatencyCombine({ x: dev(yl), topkIdx, topkWeights, handle: ll.handle });
  await out.event.wait();
  const lowLatencyErr = worstError(data, onHost(out.combinedX), factor, true);
  const lowLatencyMs = performance.now() - start;

  const mine = [worstError(data, normal, factor, false), lowLatencyErr, normalMs, lowLatencyMs];
  const all = (await group.allGather(new Uint8Array(Float64Array.from(mine).buffer))).map(
    (b) => new Float64Array(new Uint8Array(b).buffer),
  );
  await buffer.destroy();
  await group.destroy();
  const shape = {
    ranks: R,
    tokens: o.tokens,
    hidden: o.hidden,
    experts: o.experts,
    topk: o.topk,
    backend: 'gpu',
  };
  const row = (path: string, i: number): DemoRow => {
    const worst = Math.max(...all.map((v) => v[i]!));
    return { path, ...shape, ms: Math.max(...all.map((v) => v[i + 2]!)), worst, ok: worst <= 1 };
  };
  const rows = [row('normal, BF16', 0), row('low-latency, FP8', 1)];
  if (group.rank === 0) process.stdout.write(`${formatDemo(rows)}\nseed ${o.seed}\n`);
  return rows.every((r) => r.ok) ? 0 : 1;
}
