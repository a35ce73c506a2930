// Shared helpers of the bench/ scripts: order statistics, CUDA-event timing, a plain-text table, and where
// the JSON result goes. The pure functions (median, percentile, summarize, gbPerS, formatTable, resultPath)
// are unit-tested in test/unit/bench-stats.test.ts.
//
// A bench script's usual shape, run under `tsep bench <name>` (or `tsep launch -n R -- node bench/x.ts`):
//   const ms = await timeEvents(stream, 50, () => enqueueTheWork(stream), { afterWarmup: () => group.barrier() });
//   const s = summarize(ms);
//   if (group.rank === 0) printTable([{ header: 'size' }, { header: 'median ms', digits: 3 }], [[label, s.median]]);
//   writeResult('x', { ... });   // TSEP_BENCH_OUT, else $OUT/x.json, else bench/out/x.json

import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Device } from '../src/device/context.ts';
import { DeviceBuffer } from '../src/device/memory.ts';
import { Event, type Stream } from '../src/device/stream.ts';
import type { Group } from '../src/dist/group.ts';

// ---------------------------------------------------------------- order statistics

function sorted(values: readonly number[], what: string): number[] {
  if (values.length === 0) throw new RangeError(`${what} of an empty list`);
  for (const v of values) if (Number.isNaN(v)) throw new RangeError(`${what} of a list that contains NaN`);
  return [...values].sort((a, b) => a - b);
}

/** The median: the middle value, or the mean of the two middle values for an even count. Throws
 * RangeError on an empty list or a NaN. Does not modify `values`. */
export function median(values: readonly number[]): number {
  const s = sorted(values, 'median');
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The p-th percentile, p in [0, 100], interpolating linearly between the two nearest ranks (numpy's
 * default): rank (n-1)·p/100 of the sorted values. percentile(v, 50) = median(v); 0 and 100 give the
 * minimum and maximum. Throws RangeError on an empty list, a NaN, or p outside [0, 100]. */
export function percentile(values: readonly number[], p: number): number {
  if (!(p >= 0 && p <= 100)) throw new RangeError(`percentile p must be in [0, 100], got ${p}`);
  const s = sorted(values, 'percentile');
  const pos = ((s.length - 1) * p) / 100;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

/** Order statistics and mean of a sample (e.g. per-iteration times in ms). */
export interface Summary {
  n: number;
  min: number;
  p10: number;
  median: number;
  p90: number;
  max: number;
  mean: number;
}

/** {@link Summary} of a non-empty sample (throws RangeError on an empty one). */
export function summarize(values: readonly number[]): Summary {
  const s = sorted(values, 'summary');
  return {
    n: s.length,
    min: s[0]!,
    p10: percentile(s, 10),
    median: median(s),
    p90: percentile(s, 90),
    max: s[s.length - 1]!,
    mean: s.reduce((a, b) => a + b, 0) / s.length,
  };
}

/** Bandwidth in GB/s (10^9 bytes per second) of moving `bytes` in `ms` milliseconds. */
export function gbPerS(bytes: number, ms: number): number {
  return bytes / ms / 1e6;
}

// ---------------------------------------------------------------- CUDA-event timing

/** Collective: per iteration, the slowest rank's time (every rank passes its own times, same length). */
export async function slowestPerIteration(group: Group, ms: readonly number[]): Promise<number[]> {
  // A copy of each rank's bytes: the received arrays need not be 8-byte aligned.
  const all = (await group.allGather(new Uint8Array(Float64Array.from(ms).buffer))).map(
    (b) => new Float64Array(b.slice().buffer),
  );
  return ms.map((_, i) => Math.max(...all.map((r) => r[i]!)));
}

/**
 * 256 MiB that a memset before each timed iteration writes, flushing L2 (50 MiB on H200), as DeepEP's bench
 * does; enqueued outside the timed interval, it also keeps the GPU busy while the host enqueues the
 * iteration. `byte`: what the memset writes (e.g. the rank, so ranks' flushes differ).
 */
export function l2Flusher(device: Device, byte: number): { flush(stream: Stream): void; dispose(): void } {
  const buf = DeviceBuffer.alloc(2 ** 28, device);
  return { flush: (stream) => buf.fill(byte & 0xff, stream), dispose: () => buf.dispose() };
}

export interface TimeEventsOptions {
  /** Untimed iterations first (JIT, NCCL connection setup, caches); default max(2, ⌈iters/10⌉). */
  warmup?: number;
  /** Called once between the warm-up and the timed loop, after the warm-up has finished on the GPU: e.g.
   * `() => group.barrier()` so every rank starts the timed loop together. */
  afterWarmup?: () => Promise<void> | void;
  /** Enqueued on the stream before each timed iteration's start event, outside the timed interval: e.g.
   * `() => l2.flush(stream)` (l2Flusher) to start each iteration with a cold L2 (as DeepEP's bench does); it
   * also keeps the GPU busy while the host enqueues the iteration, so host launch time is not timed. */
  beforeEach?: () => void;
  /** Bound on the wait for the GPU (ms); default 120,000. */
  timeoutMs?: number;
}

/**
 * Times `fn` on `stream` with CUDA events: `warmup` untimed calls, then `iters` timed calls, each between
 * its own start and end event (so gaps between iterations are not counted). `fn(i, warmup)` must enqueue
 * its work on `stream` (or make `stream` wait for it) and must not synchronize. Resolves to the
 * per-iteration GPU times in milliseconds, in order; never blocks the event loop.
 */
export async function timeEvents(
  stream: Stream,
  iters: number,
  fn: (iteration: number, warmup: boolean) => void,
  options: TimeEventsOptions = {},
): Promise<number[]> {
  if (!Number.isSafeInteger(iters) || iters < 1)
    throw new RangeError(`iters must be an integer ≥ 1: ${iters}`);
  const warmup = options.warmup ?? Math.max(2, Math.ceil(iters / 10));
  const timeoutMs = options.timeoutMs ?? 120_000;
  for (let i = 0; i < warmup; i++) fn(i, true);
  await stream.synchronize({ timeoutMs, what: 'the benchmark warm-up' });
  await options.afterWarmup?.();
  const starts = Array.from({ length: iters }, () => Event.create(stream.device, { timing: true }));
  const ends = Array.from({ length: iters }, () => Event.create(stream.device, { timing: true }));
  try {
    for (let i = 0; i < iters; i++) {
      options.beforeEach?.();
      starts[i]!.record(stream);
      fn(i, false);
      ends[i]!.record(stream);
    }
    await ends[iters - 1]!.synchronize({ timeoutMs, what: 'the timed benchmark iterations' });
    return starts.map((s, i) => Event.elapsedMs(s, ends[i]!));
  } finally {
    for (const e of [...starts, ...ends]) e.dispose();
  }
}

// ---------------------------------------------------------------- tables

/** A table column: its header, alignment (default: right for numbers, left for text) and, for numbers,
 * the digits after the point (default: as String(value) prints it). */
export interface Column {
  header: string;
  align?: 'left' | 'right';
  digits?: number;
}

export type Cell = string | number | bigint | null | undefined;

/**
 * Formats rows as a plain-text table: header line, a dashed rule, one line per row, columns separated by
 * two spaces and padded to their widest cell; no trailing spaces, newline-terminated. Numbers are printed
 * with the column's `digits`; null/undefined cells are empty. A column's default alignment is right when
 * every non-empty cell in it is a number, else left.
 */
export function formatTable(
  columns: readonly (string | Column)[],
  rows: readonly (readonly Cell[])[],
): string {
  const cols = columns.map((c) => (typeof c === 'string' ? { header: c } : c));
  const text = (cell: Cell, col: Column): string => {
    if (cell === null || cell === undefined) return '';
    if (typeof cell === 'number' && col.digits !== undefined && Number.isFinite(cell)) {
      return cell.toFixed(col.digits);
    }
    return String(cell);
  };
  const body = rows.map((row, r) => {
    if (row.length > cols.length) {
      throw new RangeError(`table row ${r} has ${row.length} cells for ${cols.length} columns`);
    }
    return cols.map((col, c) => text(row[c], col));
  });
  const right = cols.map(
    (col, c) =>
      col.align === 'right' ||
      (col.align === undefined &&
        rows.some((row) => row[c] !== null && row[c] !== undefined) &&
        rows.every((row) => row[c] === null || row[c] === undefined || typeof row[c] !== 'string')),
  );
  const widths = cols.map((col, c) => Math.max(col.header.length, ...body.map((line) => line[c]!.length)));
  const line = (cells: readonly string[]): string =>
    cells
      .map((cell, c) => (right[c] ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!)))
      .join('  ')
      .trimEnd();
  return [
    line(cols.map((c) => c.header)),
    widths.map((w) => '-'.repeat(w)).join('  '),
    ...body.map(line),
    '',
  ].join('\n');
}

/** Writes {@link formatTable}'s output to stdout (call it on one rank only). */
export function printTable(columns: readonly (string | Column)[], rows: readonly (readonly Cell[])[]): void {
  process.stdout.write(formatTable(columns, rows));
}

// ---------------------------------------------------------------- results

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));

/**
 * Where a bench script writes its JSON result: TSEP_BENCH_OUT (set by `tsep bench --out FILE`), else
 * $OUT/<name>.json (the GPU machine's output folder), else bench/out/<name>.json in this checkout.
 */
export function resultPath(
  name: string,
  env: Readonly<Record<string, string | undefined>> = process.env,
): string {
  if (env.TSEP_BENCH_OUT) return resolve(env.TSEP_BENCH_OUT);
  if (env.OUT) return join(resolve(env.OUT), `${name}.json`);
  return join(BENCH_DIR, 'out', `${name}.json`);
}

/** Writes `data` as pretty JSON to {@link resultPath}(name), creating the folder; returns the path. */
export function writeResult(name: string, data: unknown): string {
  const path = resultPath(name);
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, `${JSON.stringify(data, null, 2)}\n`);
  return path;
}
