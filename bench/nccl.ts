// NCCL all-to-all bandwidth: the baseline every tsep dispatch/combine figure is compared with.
//
//   tsep bench nccl [-n R] [--out FILE] [-- --sizes 64,256 --iters 30 --warmup 5]
//   node src/cli/main.ts launch -n 4 -- node bench/nccl.ts [--sizes 64,256] [--iters 30] [--warmup 5]
//
// One rank per GPU. For each size S (MiB of send buffer per rank, own block included, as nccl-tests and
// torch.distributed.all_to_all_single count it): an equal-split all-to-all of S bytes of random bf16 data,
// `warmup` untimed calls, then `iters` calls each timed with its own pair of CUDA events. An iteration's time
// is the slowest rank's; the table shows the median (and p10/p90) of those.
//   algbw = S / time          busbw = algbw × (R−1)/R
// Rank 0 prints the table and writes JSON (TSEP_BENCH_OUT, else $OUT/nccl.json, else bench/out/nccl.json).
// For orientation: PyTorch's NCCL on 4×H200 gave about 276 and 349 GB/s algbw at 64 and 256 MiB.

import { randomFillSync } from 'node:crypto';
import { parseArgs } from 'node:util';
import { Device } from '../src/device/context.ts';
import { DeviceBuffer } from '../src/device/memory.ts';
import { Stream } from '../src/device/stream.ts';
import { initProcessGroup } from '../src/dist/init.ts';
import { NcclCommunicator } from '../src/dist/nccl-comm.ts';
import { ncclVersion } from '../src/native/nccl.ts';
import { gbPerS, printTable, summarize, timeEvents, writeResult } from './stats.ts';

const MiB = 2 ** 20;
const ELEMENT_BYTES = 2; // bf16; NCCL moves bytes, the type only sets the element count
const WAIT_MS = 120_000;
const HEADER = 0x7e5e0000; // first word of every block: HEADER | sender, second word: receiver

function fail(rank: number, reason: string, detail?: string): never {
  if (detail) process.stderr.write(`${detail}\n`);
  process.stderr.write(`bench/nccl rank ${rank} FAILED: ${reason}\n`);
  process.exit(1);
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms / 1000} s: ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

function options(): { sizesMiB: number[]; iters: number; warmup: number } {
  const { values } = parseArgs({
    options: {
      sizes: { type: 'string', default: '64,256' },
      iters: { type: 'string', default: '30' },
      warmup: { type: 'string', default: '5' },
    },
    strict: true,
  });
  const sizesMiB = values.sizes.split(',').map(Number);
  const iters = Number(values.iters);
  const warmup = Number(values.warmup);
  if (sizesMiB.length === 0 || !sizesMiB.every((s) => s > 0 && Number.isFinite(s))) {
    throw new Error(`--sizes: need comma-separated positive MiB values, got ${values.sizes}`);
  }
  if (!Number.isSafeInteger(iters) || iters < 1)
    throw new Error(`--iters: need an integer ≥ 1, got ${iters}`);
  if (!Number.isSafeInteger(warmup) || warmup < 0)
    throw new Error(`--warmup: need an integer ≥ 0, got ${warmup}`);
  return { sizesMiB, iters, warmup };
}

interface SizeResult {
  mib: number;
  bytesPerRank: number;
  iters: number;
  medianMs: number;
  p10Ms: number;
  p90Ms: number;
  minMs: number;
  maxMs: number;
  algbwGBs: number;
  busbwGBs: number;
  /** Each rank's own median (before taking the slowest rank per iteration). */
  perRankMedianMs: number[];
}

async function main(): Promise<void> {
  const opts = options();
  const group = await initProcessGroup({ timeoutMs: WAIT_MS });
  const { rank, size } = group;
  const dev = Device.get(group.localRank);
  const stream = Stream.create(dev, { priority: 'high' });
  const comm = await within(NcclCommunicator.create(group, dev), WAIT_MS, 'NcclCommunicator.create');
  const version = ncclVersion().join('.');
  if (rank === 0) {
    process.stdout.write(
      `NCCL ${version} all-to-all, ${size} ranks on ${dev.info.name}; ${opts.warmup} warm-up + ${opts.iters} ` +
        'timed iterations per size (CUDA events, slowest rank per iteration, median)\n',
    );
  }

  const results: SizeResult[] = [];
  for (const mib of opts.sizesMiB) {
    // Elements per peer, a multiple of 64 (128-byte aligned blocks).
    const count = Math.floor((mib * MiB) / ELEMENT_BYTES / size / 64) * 64;
    const blockBytes = count * ELEMENT_BYTES;
    const bytes = blockBytes * size;
    if (count < 64) throw new Error(`--sizes ${mib} MiB is too small for ${size} ranks`);
    const host = new Uint8Array(bytes);
    for (let off = 0; off < bytes; off += 1 << 30) randomFillSync(host, off, Math.min(1 << 30, bytes - off));
    const words = new Uint32Array(host.buffer, 0, bytes >>> 2);
    for (let p = 0; p < size; p++) {
      words[(p * blockBytes) / 4] = (HEADER | rank) >>> 0;
      words[(p * blockBytes) / 4 + 1] = p;
    }
    const send = DeviceBuffer.alloc(bytes, dev);
    const recv = DeviceBuffer.alloc(bytes, dev);
    send.copyFromHost(host);
    recv.fill(0);
    dev.synchronize();

    const ms = await timeEvents(
      stream,
      opts.iters,
      () => comm.allToAll(send.ptr, recv.ptr, count, 'bf16', stream),
      {
        warmup: opts.warmup,
        afterWarmup: () => group.barrier(),
        timeoutMs: WAIT_MS,
      },
    );
    comm.checkAsyncError();

    // Every block arrived from the right sender: a run that moves nothing must not report a bandwidth.
    const head = new Uint32Array(2);
    for (let p = 0; p < size; p++) {
      recv.copyToHost(head, p * blockBytes);
      if (head[0] !== (HEADER | p) >>> 0 || head[1] !== rank) {
        throw new Error(
          `block from rank ${p} has header 0x${head[0]!.toString(16)},${head[1]}: data did not arrive`,
        );
      }
    }

    const all = (await group.allGather(new Uint8Array(Float64Array.from(ms).buffer))).map(
      (b) => new Float64Array(b.slice().buffer), // a copy: the received bytes need not be 8-byte aligned
    );
    const slowest = ms.map((_, i) => Math.max(...all.map((r) => r[i]!)));
    const s = summarize(slowest);
    const algbw = gbPerS(bytes, s.median);
    results.push({
      mib,
      bytesPerRank: bytes,
      iters: opts.iters,
      medianMs: s.median,
      p10Ms: s.p10,
      p90Ms: s.p90,
      minMs: s.min,
      maxMs: s.max,
      algbwGBs: algbw,
      busbwGBs: (algbw * (size - 1)) / size,
      perRankMedianMs: all.map((r) => summarize([...r]).median),
    });
    send.dispose();
    recv.dispose();
  }

  if (rank === 0) {
    printTable(
      [
        { header: 'MiB/rank', digits: 0 },
        { header: 'ranks' },
        { header: 'median ms', digits: 3 },
        { header: 'p10 ms', digits: 3 },
        { header: 'p90 ms', digits: 3 },
        { header: 'algbw GB/s', digits: 1 },
        { header: 'busbw GB/s', digits: 1 },
      ],
      results.map((r) => [r.mib, size, r.medianMs, r.p10Ms, r.p90Ms, r.algbwGBs, r.busbwGBs]),
    );
    const path = writeResult('nccl', {
      bench: 'nccl',
      op: 'allToAll',
      date: new Date().toISOString(),
      ranks: size,
      device: dev.info.name,
      nccl: version,
      dtype: 'bf16',
      warmup: opts.warmup,
      timing:
        'per-iteration CUDA events; per iteration the slowest rank; median over iterations. ' +
        'bytesPerRank = the whole send buffer of one rank (own block included); ' +
        'algbw = bytesPerRank / median; busbw = algbw * (ranks - 1) / ranks',
      results,
    });
    process.stdout.write(`wrote ${path}\n`);
  }

  await stream.synchronize({ timeoutMs: WAIT_MS });
  comm.destroy();
  stream.dispose();
  await group.destroy();
}

main().catch((e: unknown) => {
  const rank = Number(process.env.RANK ?? -1);
  if (e instanceof Error) fail(rank, `${e.name}: ${e.message.split('\n')[0]}`, e.stack);
  fail(rank, String(e));
});
