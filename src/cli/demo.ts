// `tsep demo` (and `npm start`): a small MoE layer round trip on simulated ranks. Random top-k routing;
// a toy expert e that scales its rows by factor[e]; the result is checked against the direct
// computation Σ_k w[t,k]·factor[e_k]·x[t]. Normal mode (BF16) and low-latency mode (FP8) both run.
// The backend is whatever EpBuffer selects ('auto' by default).

import type { Command } from 'commander';
import { Rng } from '../cpu/random.ts';
import { bf16ToF32, FP8_BLOCK, f32ToBf16, fp8E4m3ToF32 } from '../device/dtypes.ts';
import { HostTensor } from '../device/tensor.ts';
import { LocalGroup } from '../dist/local-group.ts';
import { EpBuffer } from '../ep/buffer.ts';
import type { BackendKind, DispatchResult, LowLatencyDispatchResult, Tensor } from '../ep/types.ts';
import { TsepError } from '../errors.ts';
import { countArg, integerArg } from './arg-parsers.ts';
import { launchGpuDemo, runGpuDemoRank, visibleGpuCount } from './demo-gpu.ts';

export interface DemoOptions {
  ranks: number;
  tokens: number;
  hidden: number;
  experts: number;
  topk: number;
  seed: number;
  backend: BackendKind;
}

export interface DemoRow {
  path: string;
  ranks: number;
  tokens: number;
  hidden: number;
  experts: number;
  topk: number;
  backend: string;
  ms: number;
  /** Largest |result − expected| as a fraction of its tolerance; ≤ 1 passes. */
  worst: number;
  ok: boolean;
}

export interface RankData {
  x: HostTensor<'bf16'>;
  topkIdx: HostTensor<'i32'>;
  topkWeights: HostTensor<'f32'>;
}

export function makeRankData(rng: Rng, o: DemoOptions): RankData {
  const x = HostTensor.empty('bf16', [o.tokens, o.hidden]);
  for (let i = 0; i < x.data.length; i++) x.data[i] = f32ToBf16(rng.normal());
  const topkIdx = HostTensor.empty('i32', [o.tokens, o.topk]);
  const topkWeights = HostTensor.empty('f32', [o.tokens, o.topk]);
  for (let t = 0; t < o.tokens; t++) {
    topkIdx.data.set(rng.distinct(o.experts, o.topk), t * o.topk);
    // Softmax-like gate weights: positive, summing to 1.
    const raw = Array.from({ length: o.topk }, () => Math.exp(rng.normal()));
    const sum = raw.reduce((a, b) => a + b, 0);
    raw.forEach((w, k) => {
      topkWeights.data[t * o.topk + k] = w / sum;
    });
  }
  return { x, topkIdx, topkWeights };
}

/** A result tensor in host memory: itself from the CPU backend, a copy of the GPU backend's device tensor. */
export function onHost(t: Tensor): HostTensor {
  return t instanceof HostTensor ? t : t.toHost();
}

/**
 * Normal combine does not weight, so the expert side applies factor·weight per local expert and sums
 * a row's local experts before sending it back (float32, one bf16 rounding).
 */
export function normalExperts(
  d: DispatchResult,
  factor: Float64Array,
  firstExpert: number,
  hidden: number,
): HostTensor {
  const rows = d.recvX.shape[0]!;
  const K = d.recvTopkIdx!.shape[1]!;
  const idx = onHost(d.recvTopkIdx!).data as Int32Array;
  const w = onHost(d.recvTopkWeights!).data as Float32Array;
  const x = onHost(d.recvX).data as Uint16Array;
  const y = HostTensor.empty('bf16', [rows, hidden]);
  const acc = new Float32Array(hidden);
  for (let i = 0; i < rows; i++) {
    acc.fill(0);
    for (let k = 0; k < K; k++) {
      const e = idx[i * K + k]!;
      if (e < 0) continue;
      const scale = Math.fround(factor[firstExpert + e]! * w[i * K + k]!);
      for (let c = 0; c < hidden; c++) acc[c]! += scale * bf16ToF32(x[i * hidden + c]!);
    }
    for (let c = 0; c < hidden; c++) y.data[i * hidden + c] = f32ToBf16(acc[c]!);
  }
  return y;
}

/** Low-latency combine weights by itself: each expert only dequantizes and scales its rows. */
export function lowLatencyExperts(
  ll: LowLatencyDispatchResult,
  factor: Float64Array,
  firstExpert: number,
): HostTensor {
  const [localExperts, slots, hidden] = ll.recvX.shape as [number, number, number];
  const y = HostTensor.zeros('bf16', [localExperts, slots, hidden]);
  const codes = onHost(ll.recvX).data as Uint8Array;
  const scales = onHost(ll.recvScales!);
  const counts = onHost(ll.recvCount).data as Int32Array;
  for (let e = 0; e < localExperts; e++) {
    const f = factor[firstExpert + e]!;
    for (let i = 0; i < counts[e]!; i++) {
      const row = (e * slots + i) * hidden;
      for (let c = 0; c < hidden; c++) {
        const s = (scales.data as Float32Array)[scales.offsetOf(e, i, Math.floor(c / FP8_BLOCK))]!;
        y.data[row + c] = f32ToBf16(f * fp8E4m3ToF32(codes[row + c]!) * s);
      }
    }
  }
  return y;
}

/**
 * Largest |got − want| / tolerance over all elements, where want = Σ_k w·factor·x in float64 and the
 * tolerance covers bf16 roundings, plus FP8 e4m3 quantization on the low-latency path.
 */
export function worstError(data: RankData, got: HostTensor, factor: Float64Array, fp8: boolean): number {
  const [T, H] = data.x.shape as [number, number];
  const K = data.topkIdx.shape[1]!;
  const x = data.x.data;
  const amax = new Float64Array(Math.ceil(H / FP8_BLOCK));
  let worst = 0;
  for (let t = 0; t < T; t++) {
    amax.fill(1e-4);
    for (let c = 0; c < H; c++) {
      const b = Math.floor(c / FP8_BLOCK);
      amax[b] = Math.max(amax[b]!, Math.abs(bf16ToF32(x[t * H + c]!)));
    }
    let gain = 0;
    let absGain = 0;
    for (let k = 0; k < K; k++) {
      const g = data.topkWeights.data[t * K + k]! * factor[data.topkIdx.data[t * K + k]!]!;
      gain += g;
      absGain += Math.abs(g);
    }
    for (let c = 0; c < H; c++) {
      const xv = bf16ToF32(x[t * H + c]!);
      const want = gain * xv;
      // bf16 keeps 8 significant bits: each of its two roundings (expert output, result) errs by at
      // most 2^-8 relative; the tolerance doubles that. e4m3 keeps 4 (relative error ≤ 2^-4) and,
      // below its normals, errs by at most scale·2^-10.
      const scale = amax[Math.floor(c / FP8_BLOCK)]! / 448;
      const tol = fp8
        ? absGain * (Math.abs(xv) * 2 ** -3 + scale * 2 ** -9)
        : absGain * Math.abs(xv) * 2 ** -6;
      worst = Math.max(worst, Math.abs(bf16ToF32(got.data[t * H + c] as number) - want) / (tol + 1e-30));
    }
  }
  return worst;
}

export async function runDemo(o: DemoOptions): Promise<DemoRow[]> {
  const rng = new Rng(o.seed);
  const factor = Float64Array.from({ length: o.experts }, () => 0.5 + rng.float());
  const data = Array.from({ length: o.ranks }, () => makeRankData(rng, o));
  const groups = LocalGroup.create(o.ranks);
  const buffers = await Promise.all(
    groups.map((g) =>
      EpBuffer.create(g, {
        hidden: o.hidden,
        maxTokensPerRank: o.tokens,
        numExperts: o.experts,
        numTopk: o.topk,
        mode: 'both',
        fp8: true,
        backend: o.backend,
      }),
    ),
  );
  const localExperts = o.experts / o.ranks;
  const shape = {
    ranks: o.ranks,
    tokens: o.tokens,
    hidden: o.hidden,
    experts: o.experts,
    topk: o.topk,
    backend: buffers[0]!.backend,
  };
  try {
    let start = performance.now();
    const normal = await Promise.all(
      buffers.map(async (b, r) => {
        const d = await b.dispatch({ ...data[r]!, layout: b.getDispatchLayout(data[r]!.topkIdx, o.experts) });
        const y = normalExperts(d, factor, r * localExperts, o.hidden);
        return onHost((await b.combine({ x: y, handle: d.handle })).combinedX);
      }),
    );
    const normalMs = performance.now() - start;
    start = performance.now();
    const lowLatency = await Promise.all(
      buffers.map(async (b, r) => {
        const ll = b.lowLatencyDispatch({ x: data[r]!.x, topkIdx: data[r]!.topkIdx, fp8: true });
        await ll.event.wait();
        const y = lowLatencyExperts(ll, factor, r * localExperts);
        const out = b.lowLatencyCombine({ ...data[r]!, x: y, handle: ll.handle });
        await out.event.wait();
        return onHost(out.combinedX);
      }),
    );
    const lowLatencyMs = performance.now() - start;
    const row = (path: string, ms: number, results: HostTensor[], fp8: boolean): DemoRow => {
      const worst = Math.max(0, ...results.map((got, r) => worstError(data[r]!, got, factor, fp8)));
      return { path, ...shape, ms, worst, ok: worst <= 1 };
    };
    return [
      row('normal, BF16', normalMs, normal, false),
      row('low-latency, FP8', lowLatencyMs, lowLatency, true),
    ];
  } finally {
    await Promise.all(buffers.map((b) => b.destroy()));
  }
}

export function formatDemo(rows: readonly DemoRow[]): string {
  const header = [
    'path',
    'ranks',
    'tokens/rank',
    'hidden',
    'experts',
    'top-k',
    'backend',
    'time',
    'max err/tol',
    'result',
  ];
  const cells = rows.map((r) => [
    r.path,
    String(r.ranks),
    String(r.tokens),
    String(r.hidden),
    String(r.experts),
    String(r.topk),
    r.backend,
    `${r.ms.toFixed(1)} ms`,
    r.worst.toFixed(3),
    r.ok ? 'ok' : 'MISMATCH',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]) =>
    c
      .map((v, i) => v.padEnd(widths[i]!))
      .join('  ')
      .trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...cells.map(line)].join('\n');
}

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('MoE dispatch/combine round trip on simulated ranks, checked against a direct computation')
    .option('--ranks <n>', 'simulated ranks', countArg, 4)
    .option('--tokens <n>', 'tokens per rank', countArg, 64)
    .option('--hidden <n>', 'hidden size (a multiple of 128)', countArg, 2048)
    .option('--experts <n>', 'experts (a multiple of --ranks)', countArg, 32)
    .option('--topk <n>', 'experts per token', countArg, 8)
    .option('--seed <n>', 'random seed (default: time-based)', integerArg(1, 2 ** 31))
    .option('--backend <kind>', "'auto', 'cpu' or 'gpu'", 'auto')
    .action(async (opts: Omit<DemoOptions, 'seed'> & { seed?: number }) => {
      const seed = opts.seed ?? (Date.now() % 2 ** 31) + 1;
      // On a GPU machine the demo runs one process per GPU (it launches itself); each rank then runs
      // runGpuDemoRank. Without GPUs it simulates the ranks in this process on the CPU backend.
      if (opts.backend !== 'cpu') {
        const gpus = visibleGpuCount();
        if (process.env.RANK !== undefined && gpus > 0) {
          process.exitCode = await runGpuDemoRank({ ...opts, seed });
          return;
        }
        if (gpus > 0) {
          process.exitCode = await launchGpuDemo(gpus, { ...opts, seed });
          return;
        }
        if (opts.backend === 'gpu')
          throw new TsepError(
            'TSEP_NO_GPU',
            'The GPU backend cannot be used: no GPU is visible (tsep doctor shows what was found).',
          );
      }
      const rows = await runDemo({ ...opts, seed });
      process.stdout.write(`${formatDemo(rows)}\nseed ${seed}\n`);
      if (!rows.every((r) => r.ok)) {
        process.stderr.write('tsep demo: the combined result differs from the direct computation\n');
        process.exitCode = 1;
      }
    });
}
