// NVSHMEM spike (issue #9; docs/multi-host.md "NVSHMEM spike"): a kernel compiled at run time with NVRTC
// and linked against libnvshmem_device.a puts data + signal into another process's GPU memory.
//
//   node src/cli/main.ts launch -n 2 --timeout 300 -- node bench/tools/nvshmem-spike.ts \
//     [--mib 64] [--sizes-kib 4,64,1024,16384,65536] [--iters 20] [--warmup 5] [--blocks 32] [--threads 512]
//
// Every rank: joins NVSHMEM with a unique id that rank 0 makes and broadcasts through tsep's process group,
// allocates symmetric source/destination buffers and a signal word, fills its source with fresh random bytes
// (AES-CTR keystream of a seed rank 0 draws and broadcasts, so any rank can regenerate any rank's bytes),
// poisons its destination, and launches bench/tools/nvshmem-put-signal.cu: put-with-signal of the whole
// source to PE rank+1, then a bounded wait on its own signal. The bytes received from PE rank-1 are compared
// bit for bit with what that PE sent. Then each size is timed (CUDA events, warm-up, median) and checked
// again. Prints `nvshmem spike ok rank R: ...` or fails with a reason and exit code 1.

import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Device } from '../../src/device/context.ts';
import { copyHostToDevice, DeviceBuffer } from '../../src/device/memory.ts';
import { Stream } from '../../src/device/stream.ts';
import { initProcessGroup } from '../../src/dist/init.ts';
import { loadNvshmemModule } from '../../src/jit/link.ts';
import { cu } from '../../src/native/cuda.ts';
import {
  NVSHMEM_UNIQUE_ID_BYTES,
  nvshmemBarrierAll,
  nvshmemCumoduleFinalize,
  nvshmemFinalize,
  nvshmemFree,
  nvshmemGetUniqueId,
  nvshmemInit,
  nvshmemMalloc,
  nvshmemMyPe,
  nvshmemNPes,
  nvshmemVersion,
} from '../../src/native/nvshmem.ts';
import { median, timeEvents } from '../stats.ts';

const MiB = 2 ** 20;
const SEED_BYTES = 16;
const POISON = 0xa5;
const WAIT_MS = 120_000;

function fail(rank: number, reason: string, detail?: string): never {
  if (detail) process.stderr.write(`${detail}\n`);
  process.stderr.write(`nvshmem spike FAILED rank ${rank}: ${reason}\n`);
  process.exit(1);
}

function options() {
  const { values } = parseArgs({
    options: {
      mib: { type: 'string', default: '64' },
      'sizes-kib': { type: 'string', default: '4,64,1024,16384,65536' },
      iters: { type: 'string', default: '20' },
      warmup: { type: 'string', default: '5' },
      blocks: { type: 'string', default: '32' },
      threads: { type: 'string', default: '512' },
      'timeout-s': { type: 'string', default: '10' },
    },
    strict: true,
  });
  const int = (name: keyof typeof values, min: number): number => {
    const v = Number(values[name]);
    if (!Number.isSafeInteger(v) || v < min) throw new Error(`--${name}: need an integer ≥ ${min}, got ${v}`);
    return v;
  };
  const bytes = int('mib', 1) * MiB;
  const blocks = int('blocks', 1);
  const sizes = values['sizes-kib'].split(',').map((s) => Number(s) * 1024);
  if (!sizes.every((s) => Number.isSafeInteger(s) && s >= 16 * blocks && s <= bytes)) {
    throw new Error(`--sizes-kib: each size must be between ${(16 * blocks) / 1024} KiB and --mib`);
  }
  return {
    bytes,
    sizes,
    iters: int('iters', 1),
    warmup: int('warmup', 0),
    blocks,
    threads: int('threads', 32),
    timeoutNs: BigInt(int('timeout-s', 1)) * 1_000_000_000n,
  };
}

/** Rank `r`'s source bytes: an AES-128-CTR keystream keyed by the shared seed and the rank. */
function sourceBytes(seed: Uint8Array, r: number, bytes: number): Buffer {
  const key = createHash('sha256')
    .update(seed)
    .update(`tsep nvshmem spike rank ${r}`)
    .digest()
    .subarray(0, 16);
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(bytes));
}

function compare(got: Uint8Array, want: Uint8Array): string | undefined {
  if (Buffer.compare(got, want) === 0) return undefined;
  let first = -1;
  let wrong = 0;
  let poison = 0;
  for (let i = 0; i < want.length; i++) {
    if (got[i] === want[i]) continue;
    if (first < 0) first = i;
    wrong++;
    if (got[i] === POISON) poison++;
  }
  return `${wrong} of ${want.length} bytes differ (first at ${first}; ${poison} still hold the poison 0x${POISON.toString(16)})`;
}

const fmtSize = (b: number): string => (b >= MiB ? `${b / MiB}MiB` : `${b / 1024}KiB`);

async function main(): Promise<void> {
  const o = options();
  const group = await initProcessGroup({ timeoutMs: WAIT_MS });
  const { rank, size } = group;
  // One rank puts to itself (its "next PE"): init, link and a local put, where only one GPU is lent.
  // One host: NVSHMEM's bootstrap over loopback and no network transport (P2P over NVLink only), unless
  // the caller chose otherwise.
  if (group.localSize === size) {
    process.env.NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME ??= 'lo';
    process.env.NVSHMEM_REMOTE_TRANSPORT ??= 'none';
  }
  // More ranks than GPUs (the one-GPU machine): ranks share GPUs round-robin, as EpBuffer's ranks do;
  // NVSHMEM then runs several PEs per GPU (its "MPG" mode), each PE a process of its own.
  const dev = Device.get(group.localRank % Device.count());

  // Rank 0's unique id and seed reach every rank through the TCP store.
  const root = rank === 0 ? new Uint8Array([...nvshmemGetUniqueId(), ...randomBytes(SEED_BYTES)]) : undefined;
  const shared = await group.broadcast(root, 0);
  const id = shared.slice(0, NVSHMEM_UNIQUE_ID_BYTES);
  const seed = shared.slice(NVSHMEM_UNIQUE_ID_BYTES);
  nvshmemInit(rank, size, id);
  if (nvshmemMyPe() !== rank || nvshmemNPes() !== size) {
    fail(
      rank,
      `NVSHMEM says PE ${nvshmemMyPe()} of ${nvshmemNPes()}, the group says rank ${rank} of ${size}`,
    );
  }

  const here = dirname(fileURLToPath(import.meta.url));
  const name = 'nvshmem-put-signal.cu';
  const linked = await loadNvshmemModule(dev, { name, source: readFileSync(join(here, name), 'utf8') });
  const kernel = linked.module.kernel('put_signal', ['ptr', 'ptr', 'u64', 'ptr', 'u64', 'i32', 'u64', 'ptr']);

  const src = nvshmemMalloc(o.bytes);
  const dst = nvshmemMalloc(o.bytes);
  const sig = nvshmemMalloc(8);
  const status = DeviceBuffer.alloc(16, dev);
  const stream = Stream.create(dev);
  const next = (rank + 1) % size;
  const prev = (rank + size - 1) % size;
  copyHostToDevice(src, sourceBytes(seed, rank, o.bytes));
  const want = sourceBytes(seed, prev, o.bytes);
  cu('cuMemsetD8Async', sig, 0, 8, stream.handle);
  stream.synchronizeBlocking();
  nvshmemBarrierAll(); // every signal word is zero before anyone signals
  let expect = 0n;

  const launch = (bytes: number): void => {
    expect += BigInt(o.blocks);
    kernel.launch({ grid: o.blocks, block: o.threads, stream }, [
      dst,
      src,
      bytes,
      sig,
      expect,
      next,
      o.timeoutNs,
      status.ptr,
    ]);
  };
  // Poisons the destination and clears the status; the barrier keeps the peer's puts after our poison.
  const prepare = (): void => {
    cu('cuMemsetD8Async', dst, POISON, o.bytes, stream.handle);
    status.fill(0, stream);
    stream.synchronizeBlocking();
    nvshmemBarrierAll();
  };
  const finish = async (what: string, bytes: number): Promise<void> => {
    await stream.synchronize({ timeoutMs: WAIT_MS, what });
    const st = new Uint32Array(4);
    status.copyToHost(st);
    if (st[0] === 2) {
      const seen = BigInt(st[1]!) | (BigInt(st[2]!) << 32n);
      fail(
        rank,
        `${what}: signal from PE ${prev} stopped at ${seen}, expected ${expect} (kernel wait timed out)`,
      );
    }
    if (st[0] !== 1) fail(rank, `${what}: the kernel did not report completion (status ${st[0]})`);
    const got = new Uint8Array(bytes);
    cu('cuMemcpyDtoH_v2', got, dst, bytes);
    const bad = compare(got, want.subarray(0, bytes));
    if (bad) fail(rank, `${what}: data from PE ${prev} is wrong: ${bad}`);
  };

  prepare();
  launch(o.bytes);
  await finish(`${fmtSize(o.bytes)} put+signal`, o.bytes);

  const rates: string[] = [];
  for (const bytes of o.sizes) {
    prepare();
    const times = await timeEvents(stream, o.iters, () => launch(bytes), {
      warmup: o.warmup,
      afterWarmup: () => nvshmemBarrierAll(),
      timeoutMs: WAIT_MS,
    });
    await finish(`timed ${fmtSize(bytes)}`, bytes);
    const ms = median(times);
    rates.push(`${fmtSize(bytes)} ${(bytes / ms / 1e6).toFixed(1)} GB/s (${(ms * 1000).toFixed(1)} µs)`);
  }

  process.stdout.write(
    `nvshmem spike ok rank ${rank}: NVSHMEM ${nvshmemVersion().join('.')}, PE ${rank}/${size} on ${dev.info.name}; ` +
      `${fmtSize(o.bytes)} from PE ${prev} bit-exact; kernel ${linked.cached ? 'from cache' : `compiled+linked in ${linked.ms.toFixed(0)} ms`} ` +
      `(${linked.bytes} B cubin); put+signal to PE ${next}, median of ${o.iters}: ${rates.join(', ')}\n`,
  );

  stream.dispose();
  status.dispose();
  nvshmemFree(sig);
  nvshmemFree(dst);
  nvshmemFree(src);
  nvshmemCumoduleFinalize(linked.module.handle);
  linked.module.dispose();
  nvshmemFinalize();
  await group.destroy();
}

main().catch((e: unknown) => {
  const rank = Number(process.env.RANK ?? -1);
  if (e instanceof Error) fail(rank, `${e.name}: ${e.message.split('\n')[0]}`, e.stack);
  fail(rank, String(e));
});
