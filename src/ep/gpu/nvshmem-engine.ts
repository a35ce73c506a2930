// NVSHMEM as the engine between hosts (transport 'nvshmem'; docs/multi-host.md): the process joins one
// NVSHMEM job on first use (every rank of the group is a PE, PE id = rank), and buffers come from its
// symmetric heap, so a kernel reaches a peer on another host by NVSHMEM's puts at the same addresses it
// uses for its own buffer. Peers on this rank's host are mapped directly (nvshmem_ptr) and reached with
// plain stores over NVLink, as the single-host kernels do.

import type { Device } from '../../device/context.ts';
import { DeviceBuffer, HostBuffer } from '../../device/memory.ts';
import type { Module } from '../../device/module.ts';
import type { Group } from '../../dist/group.ts';
import { machineId } from '../../dist/machine.ts';
import { TsepError } from '../../errors.ts';
import { type Define, moduleOnce } from '../../jit/compile.ts';
import { loadNvshmemModule } from '../../jit/link.ts';
import { readKernelSource } from '../../jit/sources.ts';
import {
  nvshmemCumoduleFinalize,
  nvshmemFinalize,
  nvshmemFree,
  nvshmemGetUniqueId,
  nvshmemInit,
  nvshmemMalloc,
  nvshmemPtr,
} from '../../native/nvshmem.ts';

const MiB = 2 ** 20;
/** What the symmetric heap holds beyond the first buffer that needs it (NVSHMEM_SYMMETRIC_SIZE default). */
const HEAP_HEADROOM = 512 * MiB;

/** The job this process joined: one per process, as NVSHMEM allows; left when the process exits. */
let joined: { rank: number; size: number } | undefined;
/** Modules registered with NVSHMEM, dropped from its list before it finalizes. */
const registered: Module[] = [];

/**
 * At a clean exit, NVSHMEM is finalized (every rank exits, so every PE takes part): its library left
 * running while the process tore down the CUDA context crashed with SIGSEGV after the work was done
 * (2026-11-28). Not after a failure: the finalize is collective, peers that are still working never join
 * it, and Node runs exit handlers before it prints an uncaught error, so the rank hung with its error
 * unsaid (2026-11-29).
 */
function leaveAtExit(code: number): void {
  if (code !== 0) return;
  try {
    for (const m of registered.splice(0)) nvshmemCumoduleFinalize(m.handle);
    nvshmemFinalize();
  } catch (e) {
    process.stderr.write(`tsep: leaving NVSHMEM at exit failed: ${(e as Error).message}\n`);
  }
}

/**
 * Collective: makes this process PE `group.rank` of an NVSHMEM job of all the group's ranks (once; later
 * calls with the same group shape return at once). Rank 0 makes the unique id and the group broadcasts it.
 * `heapBytes` sizes the symmetric heap (NVSHMEM_SYMMETRIC_SIZE, unless set): what the first EpBuffer's
 * buffers need (GpuBackend passes both modes' sum), with headroom for later ones. When every
 * rank runs on one machine (virtual hosts), NVSHMEM's bootstrap stays on loopback and no network transport
 * is loaded, unless NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME / NVSHMEM_REMOTE_TRANSPORT say otherwise.
 */
export async function joinNvshmem(group: Group, device: Device, heapBytes: number): Promise<void> {
  if (joined) {
    if (joined.rank !== group.rank || joined.size !== group.size) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `This process is PE ${joined.rank} of an NVSHMEM job of ${joined.size}; a buffer of rank ${group.rank} ` +
          `of ${group.size} cannot join another (NVSHMEM allows one job per process).`,
      );
    }
    return;
  }
  const names = await group.allGather(new TextEncoder().encode(machineId()));
  const machine = new TextDecoder().decode(names[0]);
  if (names.every((n) => new TextDecoder().decode(n) === machine)) {
    process.env.NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME ??= 'lo';
    process.env.NVSHMEM_REMOTE_TRANSPORT ??= 'none';
  }
  // Every rank computes the same size from the agreed options: NVSHMEM wants the same heap everywhere.
  process.env.NVSHMEM_SYMMETRIC_SIZE ??= String(Math.ceil((heapBytes + HEAP_HEADROOM) / MiB) * MiB);
  const id = await group.broadcast(group.rank === 0 ? nvshmemGetUniqueId() : undefined, 0);
  device.makeCurrent();
  nvshmemInit(group.rank, group.size, id);
  joined = { rank: group.rank, size: group.size };
  process.once('exit', leaveAtExit);
}

/**
 * A kernel source under kernels/ compiled and linked with NVSHMEM's device library and registered with
 * NVSHMEM (after joinNvshmem): once per (device, source, specialization) in a process, as rt.kernels does
 * for the other kernels, so every buffer of a shape shares one registered module.
 */
export function loadEngineModule(
  device: Device,
  file: string,
  defines: Record<string, Define>,
): Promise<Module> {
  return moduleOnce('nvshmem', device, file, defines, () =>
    loadNvshmemModule(device, { ...readKernelSource(file), defines }).then(({ module }) => {
      registered.push(module);
      return module;
    }),
  );
}

/**
 * A buffer of `bytes` in every rank's symmetric heap, zeroed, with the table kernels index by rank: a
 * direct address for ranks on this rank's host (`ranksPerHost` consecutive ranks), this rank's own buffer
 * for the others (their slots are symmetric addresses that NVSHMEM's puts translate). The same shape as a
 * SymmetricBuffer to the low-latency path.
 */
export class NvshmemSymmetric {
  readonly local: DeviceBuffer;
  readonly peerTable: DeviceBuffer;
  /** Host-mapped pinned memory for the kernels' timeout record. */
  readonly signal: HostBuffer;
  private readonly group: Group;
  private destroyed = false;

  private constructor(group: Group, local: DeviceBuffer, peerTable: DeviceBuffer, signal: HostBuffer) {
    this.group = group;
    this.local = local;
    this.peerTable = peerTable;
    this.signal = signal;
  }

  /** Collective (after joinNvshmem): every rank allocates the same `bytes`. */
  static async create(
    group: Group,
    device: Device,
    bytes: number,
    ranksPerHost: number,
  ): Promise<NvshmemSymmetric> {
    // nvshmem_malloc blocks until every PE calls it: meet at a bounded barrier first.
    await group.barrier();
    device.makeCurrent();
    const base = nvshmemMalloc(bytes);
    const local = DeviceBuffer.wrap(base, bytes, device);
    local.fill(0); // done when it returns, before any peer learns of the buffer
    const host = Math.floor(group.rank / ranksPerHost);
    const peers = Array.from({ length: group.size }, (_, r) => {
      if (r === group.rank || Math.floor(r / ranksPerHost) !== host) return base;
      const p = nvshmemPtr(base, r);
      if (p === 0n) {
        throw new TsepError(
          'TSEP_UNSUPPORTED',
          `NVSHMEM maps no direct path from rank ${group.rank} to rank ${r}, which ranksPerHost = ${ranksPerHost} puts on the same host; their GPUs need peer access (NVLink), or use a smaller ranksPerHost.`,
        );
      }
      return p;
    });
    const peerTable = DeviceBuffer.alloc(8 * peers.length, device);
    peerTable.copyFromHost(BigUint64Array.from(peers));
    const signal = HostBuffer.alloc(4096, device);
    // Nobody writes into a peer before that peer's buffer is zeroed.
    await group.barrier();
    return new NvshmemSymmetric(group, local, peerTable, signal);
  }

  /**
   * Collective: waits for every rank (a bounded barrier), then frees the symmetric allocation everywhere
   * (nvshmem_free is itself collective and unbounded: the barrier first makes sure every rank is there).
   * The caller first waits for its own work that uses the buffer (its streams).
   */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await this.group.barrier();
    this.local.device.makeCurrent();
    nvshmemFree(this.local.ptr);
    this.local.dispose();
    this.peerTable.dispose();
    this.signal.dispose();
  }
}
