// GPU smoke tests (issue "Foundation"): run-time compile and launch, events, host-mapped counters seen
// while a kernel runs, graph replay with new inputs, the disk cache across processes, bit-exact number
// formats, typed errors. Every output is poisoned before the run and checked element by element.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { Device } from '../../src/device/context.ts';
import { DeviceTensor } from '../../src/device/device-tensor.ts';
import { f32ToBf16, f32ToFp8E4m3, quantizeFp8 } from '../../src/device/dtypes.ts';
import { Graph } from '../../src/device/graph.ts';
import { DeviceBuffer, HostBuffer } from '../../src/device/memory.ts';
import type { Module } from '../../src/device/module.ts';
import { Event, Stream } from '../../src/device/stream.ts';
import { HostTensor } from '../../src/device/tensor.ts';
import { CudaError, ValidationError } from '../../src/errors.ts';
import { jitStats, loadKernelModule } from '../../src/jit/compile.ts';
import { tempDir } from '../unit/helpers/temp.ts';
import { gpuSkip, seededRandom } from './gpu.ts';

// A fresh cache per run, so the first compile really compiles and the cache test sees its own entries.
process.env.TSEP_CACHE_DIR = tempDir('tsep-cache-');

let mod: Module | undefined;
async function smoke(): Promise<Module> {
  mod ??= await loadKernelModule(Device.get(0), 'smoke.cu');
  return mod;
}

function randomF32(rand: () => number, n: number, scale = 100): HostTensor<'f32'> {
  const t = HostTensor.empty('f32', [n]);
  for (let i = 0; i < n; i++) t.data[i] = (rand() * 2 - 1) * scale;
  return t;
}

test('compile and launch a kernel on fresh random data; every element checked', {
  skip: gpuSkip,
}, async () => {
  const rand = seededRandom('axpb');
  const dev = Device.get(0);
  const k = (await smoke()).kernel('tsep_axpb', ['ptr', 'ptr', 'f32', 'f32', 'i32']);
  const stream = Stream.create(dev);
  for (const n of [1, 1000, 1 << 20, 3_000_017]) {
    const x = randomF32(rand, n);
    const a = Math.fround(rand() * 4 - 2);
    const b = Math.fround(rand() * 10 - 5);
    const dx = DeviceTensor.fromHost(x);
    const dy = DeviceTensor.empty('f32', [n]);
    dy.fillBytes(0xff, stream); // NaN poison: an unwritten element cannot pass
    k.launch({ grid: Math.min(1024, Math.ceil(n / 256)), block: 256, stream }, [dx.ptr, dy.ptr, a, b, n]);
    await stream.synchronize();
    const y = dy.toHost().data;
    for (let i = 0; i < n; i++) {
      const want = Math.fround(Math.fround(a * x.data[i]!) + b);
      if (y[i] !== want) assert.fail(`n=${n} element ${i}: got ${y[i]}, want ${want}`);
    }
    dx.dispose();
    dy.dispose();
  }
  stream.dispose();
});

test('events time a kernel', { skip: gpuSkip }, async () => {
  const dev = Device.get(0);
  const k = (await smoke()).kernel('tsep_axpb', ['ptr', 'ptr', 'f32', 'f32', 'i32']);
  const stream = Stream.create(dev);
  const n = 1 << 26;
  const x = DeviceBuffer.alloc(n * 4);
  const y = DeviceBuffer.alloc(n * 4);
  x.fill(0x3f, stream);
  const start = Event.create(dev, { timing: true });
  const end = Event.create(dev, { timing: true });
  const times: number[] = [];
  for (const reps of [1, 4]) {
    start.record(stream);
    for (let r = 0; r < reps; r++) k.launch({ grid: 1024, block: 256, stream }, [x.ptr, y.ptr, 2, 1, n]);
    end.record(stream);
    await end.synchronize();
    times.push(Event.elapsedMs(start, end));
  }
  // 512 MiB of traffic per launch: well above a few microseconds, and four launches take longer than one.
  assert.ok(times[0]! > 0.01, `one launch took ${times[0]} ms`);
  assert.ok(times[1]! > times[0]! * 2, `4 launches ${times[1]} ms vs 1 launch ${times[0]} ms`);
  process.stdout.write(
    `# axpb over 2^26 floats: ${times[0]!.toFixed(3)} ms (${((8 * n) / times[0]! / 1e6).toFixed(0)} GB/s)\n`,
  );
  for (const r of [start, end, stream, x, y]) r.dispose();
});

test('a pool tensor made for one stream can be freed on another that joined it', {
  skip: gpuSkip,
}, async () => {
  // The normal mode allocates its outputs for the receive stream and frees them on the call's stream.
  const dev = Device.get(0);
  const k = (await smoke()).kernel('tsep_axpb', ['ptr', 'ptr', 'f32', 'f32', 'i32']);
  const [a, b] = [Stream.create(dev), Stream.create(dev)];
  const n = 1 << 20;
  const host = randomF32(seededRandom('pool free on another stream'), n);
  const x = DeviceTensor.fromHost(host);
  for (let round = 0; round < 3; round++) {
    const y = DeviceTensor.emptyOn('f32', [n], a, b);
    y.fillBytes(0xff, a); // poison: NaN unless the kernel writes every element
    k.launch({ grid: 256, block: 256, stream: a }, [x.ptr, y.ptr, 2, round, n]);
    const joined = Event.create(dev).record(a);
    b.waitEvent(joined);
    await b.synchronize();
    const check = (what: string, t: DeviceTensor<'f32'>, add: number) => {
      const got = t.toHost();
      for (let i = 0; i < n; i++) {
        const want = Math.fround(Math.fround(2 * host.data[i]!) + add);
        if (got.data[i] !== want) assert.fail(`round ${round} ${what}[${i}]: ${got.data[i]} != ${want}`);
      }
    };
    check('y', y, round);
    y.dispose(); // freed in b's order, after a's kernel
    const z = DeviceTensor.emptyOn('f32', [n], b); // may reuse y's memory, in b's order
    z.fillBytes(0xff, b);
    k.launch({ grid: 256, block: 256, stream: b }, [x.ptr, z.ptr, 2, round + 1, n]);
    await b.synchronize();
    check('z', z, round + 1);
    z.dispose();
    joined.dispose();
  }
  for (const r of [x, a, b]) r.dispose();
});

test('host copies of a pool tensor wait for its stream (toHost right after a launch on a busy stream)', {
  skip: gpuSkip,
}, async () => {
  // getDispatchLayout returns pool tensors at once; reading one with toHost() must see the kernel's
  // result, not what the memory held before, however long the stream is busy.
  const dev = Device.get(0);
  const m = await smoke();
  const axpb = m.kernel('tsep_axpb', ['ptr', 'ptr', 'f32', 'f32', 'i32']);
  const hold = m.kernel('tsep_signal_and_wait', ['ptr', 'ptr', 'i32', 'u64']);
  const stream = Stream.create(dev);
  const counter = HostBuffer.alloc(4);
  const never = HostBuffer.alloc(4); // never acknowledged: the hold kernel runs out its 100 ms
  never.int32()[0] = 0;
  const n = 1 << 16;
  const host = randomF32(seededRandom('pool toHost'), n);
  const x = DeviceTensor.fromHost(host);
  for (let round = 0; round < 3; round++) {
    hold.launch({ grid: 1, block: 32, stream }, [
      counter.devicePtr,
      never.devicePtr,
      7 + round,
      100_000_000n,
    ]);
    const y = DeviceTensor.emptyOn('f32', [n], stream);
    y.fillBytes(0xff, stream); // NaN poison, written after the hold like the result
    axpb.launch({ grid: 64, block: 256, stream }, [x.ptr, y.ptr, 3, round, n]);
    const got = y.toHost(); // no synchronize before: toHost must wait for the stream
    for (let i = 0; i < n; i++) {
      const want = Math.fround(Math.fround(3 * host.data[i]!) + round);
      if (got.data[i] !== want) assert.fail(`round ${round} [${i}]: ${got.data[i]} != ${want}`);
    }
    // And copyFromHost into a pool tensor lands after the stream's earlier work, not under it.
    const z = DeviceTensor.emptyOn('f32', [n], stream);
    hold.launch({ grid: 1, block: 32, stream }, [counter.devicePtr, never.devicePtr, 9, 50_000_000n]);
    z.fillBytes(0xff, stream);
    z.copyFromHost(host);
    assert.deepEqual(z.toHost().data, host.data, `round ${round}: copyFromHost overwritten by earlier work`);
    y.dispose();
    z.dispose();
  }
  for (const r of [x, stream, counter, never]) r.dispose();
});

test('copies and fills without a stream have landed when they return: a kernel on our stream sees them', {
  skip: gpuSkip,
}, async () => {
  // Our streams are non-blocking, so nothing orders their kernels after work on the legacy stream: a copy
  // or fill without a stream must be complete on return (a plain cuMemcpyHtoD from pageable memory is
  // not: it may return before its DMA lands, which once fed a layout kernel stale ids).
  const dev = Device.get(0);
  const axpb = (await smoke()).kernel('tsep_axpb', ['ptr', 'ptr', 'f32', 'f32', 'i32']);
  const stream = Stream.create(dev);
  const legacy = Stream.default(dev);
  const rand = seededRandom('legacy copies');
  const n = 1 << 24; // 64 MiB: the DMA takes milliseconds
  const x = DeviceTensor.empty('f32', [n]);
  const y = DeviceTensor.empty('f32', [n]);
  const check = async (want: (i: number) => number, what: string) => {
    y.fillBytes(0xff, stream);
    axpb.launch({ grid: 1024, block: 256, stream }, [x.ptr, y.ptr, 1, 0, n]);
    await stream.synchronize();
    const got = y.toHost().data;
    for (let i = 0; i < n; i++)
      if (got[i] !== want(i)) assert.fail(`${what}: [${i}] ${got[i]} != ${want(i)}`);
  };
  for (let round = 0; round < 3; round++) {
    const host = randomF32(rand, n);
    x.copyFromHost(host);
    assert.equal(legacy.query(), true, `round ${round}: copyFromHost returned before its copy finished`);
    await check((i) => host.data[i]!, `round ${round} copyFromHost`);
    const byte = 0x3c + round;
    if (round % 2 === 0) x.fillBytes(byte);
    else x.owner!.fill(byte); // DeviceBuffer.fill, the same promise
    assert.equal(legacy.query(), true, `round ${round}: the fill returned before it finished`);
    const f = new Float32Array(new Uint8Array([byte, byte, byte, byte]).buffer)[0]!;
    await check(() => f, `round ${round} fill`);
  }
  // A pool tensor's stream that is being captured cannot be waited for: a fill without a stream is
  // refused there, and the stream-ordered form is captured and replayed.
  const pool = DeviceTensor.emptyOn('f32', [n], stream);
  await stream.synchronize();
  const g = await Graph.captureAsync(stream, async () => {
    assert.throws(() => pool.fillBytes(0), ValidationError);
    pool.fillBytes(0x40, stream);
  });
  pool.fillBytes(0);
  g.launch(stream);
  await stream.synchronize();
  assert.ok(
    pool.toHost().data.every((v) => v === 3.0039215087890625),
    'the captured fill ran at replay (0x40404040 = 3.0039…)',
  );
  g.dispose();
  for (const r of [pool, x, y, stream]) r.dispose();
});

test('a running kernel’s host-mapped counter is seen before the kernel ends', { skip: gpuSkip }, async () => {
  const dev = Device.get(0);
  const k = (await smoke()).kernel('tsep_signal_and_wait', ['ptr', 'ptr', 'i32', 'u64']);
  const stream = Stream.create(dev);
  const counter = HostBuffer.alloc(4);
  const ack = HostBuffer.alloc(4);
  const value = 1 + Math.floor(Math.random() * 1000);
  k.launch({ grid: 1, block: 32, stream }, [counter.devicePtr, ack.devicePtr, value, 10_000_000_000n]);
  const c = counter.int32();
  const deadline = Date.now() + 5000;
  while (Atomics.load(c, 0) !== value) {
    assert.ok(Date.now() < deadline, 'the host never saw the kernel’s counter');
    await new Promise((r) => setImmediate(r));
  }
  assert.equal(stream.query(), false, 'the kernel must still be running while the host reads its counter');
  Atomics.store(ack.int32(), 0, value);
  await stream.synchronize({ timeoutMs: 10_000 });
  assert.equal(Atomics.load(c, 0), value + 1, 'the kernel saw the host’s acknowledgement');
  for (const r of [counter, ack, stream]) r.dispose();
});

test('a captured graph replays with changed inputs and updates to new buffers', {
  skip: gpuSkip,
}, async () => {
  const rand = seededRandom('graph');
  const dev = Device.get(0);
  const k = (await smoke()).kernel('tsep_axpb', ['ptr', 'ptr', 'f32', 'f32', 'i32']);
  const stream = Stream.create(dev);
  const n = 10_000;
  const x = DeviceTensor.empty('f32', [n]);
  const y = DeviceTensor.empty('f32', [n]);
  const graph = Graph.capture(stream, () => {
    k.launch({ grid: 40, block: 256, stream }, [x.ptr, y.ptr, 3, 0.5, n]);
  });
  const check = (src: HostTensor<'f32'>, out: DeviceTensor<'f32'>, a: number, b: number) => {
    const got = out.toHost().data;
    for (let i = 0; i < n; i++) {
      const want = Math.fround(Math.fround(a * src.data[i]!) + b);
      if (got[i] !== want) assert.fail(`element ${i}: got ${got[i]}, want ${want}`);
    }
  };
  for (let rep = 0; rep < 5; rep++) {
    const input = randomF32(rand, n);
    x.copyFromHost(input);
    y.fillBytes(0xff, stream);
    graph.launch(stream);
    await stream.synchronize();
    check(input, y, 3, 0.5);
  }
  // Same topology, other buffers and scalars: the executable graph is updated in place.
  const x2 = DeviceTensor.fromHost(randomF32(rand, n));
  const y2 = DeviceTensor.empty('f32', [n]);
  graph.update(stream, () => {
    k.launch({ grid: 40, block: 256, stream }, [x2.ptr, y2.ptr, -1.5, 2, n]);
  });
  y2.fillBytes(0xff, stream);
  graph.launch(stream);
  await stream.synchronize();
  check(x2.toHost(), y2, -1.5, 2);
  for (const r of [graph, x, y, x2, y2, stream]) r.dispose();
});

test('number formats on the GPU match the host reference bit for bit', { skip: gpuSkip }, async () => {
  const rand = seededRandom('formats');
  const m = await smoke();
  const convert = m.kernel('tsep_convert', ['ptr', 'ptr', 'ptr', 'i32']);
  const quant = m.kernel('tsep_quantize_fp8', ['ptr', 'ptr', 'ptr', 'i32', 'i32', 'i32']);
  const stream = Stream.create(Device.get(0));
  // Every bf16 value, the midpoints between neighbours (ties), and random floats of all magnitudes.
  const n = 65536 * 2 + 100_000;
  const x = HostTensor.empty('f32', [n]);
  const bits = new Uint32Array(x.data.buffer);
  for (let i = 0; i < 65536; i++) {
    bits[2 * i] = i << 16;
    bits[2 * i + 1] = ((i << 16) | 0x8000) >>> 0;
  }
  for (let i = 131072; i < n; i++) x.data[i] = (rand() * 2 - 1) * 2 ** (rand() * 40 - 20);
  const dx = DeviceTensor.fromHost(x);
  const b16 = DeviceTensor.empty('bf16', [n]);
  const f8 = DeviceTensor.empty('u8', [n]);
  b16.fillBytes(0xaa, stream);
  f8.fillBytes(0xaa, stream);
  convert.launch({ grid: 512, block: 256, stream }, [dx.ptr, b16.ptr, f8.ptr, n]);
  await stream.synchronize();
  const gb = b16.toHost().data;
  const gf = f8.toHost().data;
  let bad = 0;
  for (let i = 0; i < n; i++) {
    const v = x.data[i]!;
    const wb = f32ToBf16(v);
    // NaN payloads may differ; both sides must still be NaN (bf16: exponent all ones, mantissa non-zero).
    const bothNaN = Number.isNaN(v);
    const gpuNaN = (gb[i]! & 0x7f80) === 0x7f80 && (gb[i]! & 0x7f) !== 0;
    if ((bothNaN ? !gpuNaN : gb[i] !== wb) && bad++ < 5)
      process.stdout.write(`# bf16 ${v}: gpu ${gb[i]} host ${wb}\n`);
    const wf = f32ToFp8E4m3(v);
    if (gf[i] !== wf && !(bothNaN && (gf[i]! & 0x7f) === 0x7f) && bad++ < 5) {
      process.stdout.write(`# e4m3 ${v}: gpu ${gf[i]} host ${wf}\n`);
    }
  }
  assert.equal(bad, 0, 'conversions differ between GPU and host');

  for (const [rows, hidden] of [
    [3, 7168],
    [17, 2560],
    [5, 200],
  ] as const) {
    for (const roundScale of [false, true]) {
      const src = HostTensor.empty('f32', [rows, hidden]);
      for (let i = 0; i < src.numel; i++) src.data[i] = (rand() * 2 - 1) * 10 ** (rand() * 6 - 3);
      const want = quantizeFp8(src.data, rows, hidden, { roundScale });
      const s = Math.ceil(hidden / 128);
      const dsrc = DeviceTensor.fromHost(src);
      const dq = DeviceTensor.empty('fp8_e4m3', [rows, hidden]);
      const ds = DeviceTensor.empty('f32', [rows, s]);
      dq.fillBytes(0xaa, stream);
      ds.fillBytes(0xff, stream);
      const warps = rows * s;
      quant.launch({ grid: Math.ceil((warps * 32) / 256), block: 256, stream }, [
        dsrc.ptr,
        dq.ptr,
        ds.ptr,
        rows,
        hidden,
        roundScale ? 1 : 0,
      ]);
      await stream.synchronize();
      assert.deepEqual(ds.toHost().data, want.scales, `scales ${rows}x${hidden} roundScale=${roundScale}`);
      assert.deepEqual(dq.toHost().data, want.data, `fp8 data ${rows}x${hidden} roundScale=${roundScale}`);
      for (const t of [dsrc, dq, ds]) t.dispose();
    }
  }
  for (const r of [dx, b16, f8, stream]) r.dispose();
});

test('a second process finds every kernel in the disk cache (0 compiles)', { skip: gpuSkip }, async () => {
  await smoke();
  const script = `
    const { Device } = await import(${JSON.stringify(new URL('../../src/device/context.ts', import.meta.url).href)});
    const { loadKernelModule, jitStats } = await import(${JSON.stringify(new URL('../../src/jit/compile.ts', import.meta.url).href)});
    await loadKernelModule(Device.get(0), 'smoke.cu');
    console.log(JSON.stringify(jitStats()));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    encoding: 'utf8',
    env: process.env,
  });
  assert.equal(r.status, 0, r.stderr);
  const stats = JSON.parse(r.stdout.trim().split('\n').pop()!);
  assert.equal(stats.compiles, 0, `second process compiled ${stats.compiles} kernels`);
  assert.equal(stats.diskHits, 1);
  assert.ok(jitStats().compiles >= 1, 'the first process did compile');
});

test('launch overhead of an empty kernel (median of 10,000)', { skip: gpuSkip }, async () => {
  const k = (await smoke()).kernel('tsep_empty', []);
  const stream = Stream.create(Device.get(0));
  const samples = new Float64Array(10_000);
  for (let i = 0; i < 1000; i++) k.launch({ grid: 1, block: 32, stream }, []);
  await stream.synchronize();
  for (let i = 0; i < samples.length; i++) {
    const t0 = performance.now();
    k.launch({ grid: 1, block: 32, stream }, []);
    samples[i] = performance.now() - t0;
    // Keep the queue from filling up, which would make launches block and time the GPU instead.
    if (i % 512 === 511) stream.synchronizeBlocking();
  }
  await stream.synchronize();
  samples.sort();
  const medianUs = samples[samples.length >> 1]! * 1000;
  process.stdout.write(
    `# empty-kernel launch overhead: median ${medianUs.toFixed(2)} us, p90 ${(samples[9000]! * 1000).toFixed(2)} us\n`,
  );
  assert.ok(medianUs > 0 && medianUs < 50, `median launch overhead ${medianUs} us`);
  stream.dispose();
});

test('user mistakes raise typed errors, not native faults', { skip: gpuSkip }, async () => {
  Device.get(0);
  assert.throws(
    () => DeviceBuffer.alloc(2 ** 52),
    (e: unknown) =>
      e instanceof CudaError &&
      e.statusName === 'CUDA_ERROR_OUT_OF_MEMORY' &&
      /out of memory/.test(e.message),
  );
  const t = DeviceTensor.empty('f32', [4]);
  assert.throws(() => t.copyFromHost(HostTensor.empty('i32', [4])), ValidationError);
  assert.throws(() => t.copyFromHost(HostTensor.empty('f32', [5])), ValidationError);
  assert.throws(() => Device.get(99), ValidationError);
  t.dispose();
  assert.throws(() => t.owner!.ptr, /disposed/);
  const buf = DeviceBuffer.alloc(16);
  assert.throws(() => buf.copyFromHost(new Uint8Array(32)), ValidationError);
  buf.dispose();
});
