// Symmetric buffers: every rank of a host allocates the same number of bytes, the CUDA IPC handles are
// exchanged through the group, and each rank maps its peers' buffers. Kernels get a device-side table of
// the peers' addresses (indexed by local rank) and can load/store any peer's memory directly over NVLink.

import { Device } from '../device/context.ts';
import { DeviceBuffer, HostBuffer } from '../device/memory.ts';
import { DisposedError, TsepError, ValidationError } from '../errors.ts';
import { IPC_HANDLE_BYTES, ipcCloseMemHandle, ipcGetMemHandle, ipcOpenMemHandle } from '../native/cuda.ts';
import type { Group } from './group.ts';

export interface SymmetricOptions {
  /** Bytes of pinned, device-mapped host memory for host<->kernel signalling (default 4 KiB). */
  signalBytes?: number;
}

export class SymmetricBuffer {
  readonly group: Group;
  readonly device: Device;
  readonly bytes: number;
  /** This rank's allocation. */
  readonly local: DeviceBuffer;
  /** Peer base addresses as seen from this GPU, indexed by local rank (own entry = local.ptr). */
  readonly peers: readonly bigint[];
  /** The same table in device memory: u64[localSize], for kernels. */
  readonly peerTable: DeviceBuffer;
  /** Host-mapped pinned memory for flags and counters a kernel writes and the host polls. */
  readonly signal: HostBuffer;
  private opened: bigint[];
  private destroyed = false;

  private constructor(
    group: Group,
    device: Device,
    bytes: number,
    local: DeviceBuffer,
    peers: bigint[],
    opened: bigint[],
    signal: HostBuffer,
  ) {
    this.group = group;
    this.device = device;
    this.bytes = bytes;
    this.local = local;
    this.peers = Object.freeze([...peers]);
    this.opened = opened;
    this.signal = signal;
    this.peerTable = DeviceBuffer.alloc(8 * peers.length, device);
    this.peerTable.copyFromHost(BigUint64Array.from(peers));
  }

  /**
   * Collective: every rank of `group` calls it with the same `bytes`. Only the ranks of this host are
   * mapped (ranks are laid out host by host, as `tsep launch` and torchrun do).
   */
  static async create(
    group: Group,
    bytes: number,
    device: Device = Device.current(),
    options: SymmetricOptions = {},
  ): Promise<SymmetricBuffer> {
    if (!Number.isSafeInteger(bytes) || bytes <= 0)
      throw new ValidationError('bytes', String(bytes), 'a positive integer');
    const sizes = await group.allGather(new TextEncoder().encode(String(bytes)));
    const mismatch = sizes.findIndex((s) => Number(new TextDecoder().decode(s)) !== bytes);
    if (mismatch >= 0) {
      throw new ValidationError(
        'bytes',
        `${bytes} on rank ${group.rank} but ${new TextDecoder().decode(sizes[mismatch])} on rank ${mismatch}`,
        'the same size on every rank',
      );
    }
    const local = DeviceBuffer.alloc(bytes, device);
    local.fill(0); // done when it returns, before any peer learns of the buffer
    const handles = await group.allGather(ipcGetMemHandle(local.ptr));
    const first = group.rank - group.localRank;
    const peers: bigint[] = [];
    const opened: bigint[] = [];
    try {
      for (let l = 0; l < group.localSize; l++) {
        if (first + l === group.rank) {
          peers.push(local.ptr);
          continue;
        }
        const h = handles[first + l]!;
        if (h.length !== IPC_HANDLE_BYTES)
          throw new TsepError('TSEP_RENDEZVOUS_ERROR', `rank ${first + l} sent a malformed IPC handle`);
        device.makeCurrent();
        const p = ipcOpenMemHandle(h);
        peers.push(p);
        opened.push(p);
      }
    } catch (e) {
      for (const p of opened) ipcCloseMemHandle(p);
      local.dispose();
      throw e;
    }
    const signal = HostBuffer.alloc(options.signalBytes ?? 4096, device);
    const sb = new SymmetricBuffer(group, device, bytes, local, peers, opened, signal);
    // Nobody may write into a peer before that peer has finished mapping everyone.
    await group.barrier();
    return sb;
  }

  /** Address of `offset` in the buffer of local rank `localRank`, as seen from this GPU. */
  peerPtr(localRank: number, offset = 0): bigint {
    if (this.destroyed) throw new DisposedError('SymmetricBuffer');
    const p = this.peers[localRank];
    if (p === undefined)
      throw new ValidationError('localRank', String(localRank), `a local rank in [0, ${this.peers.length})`);
    return p + BigInt(offset);
  }

  /**
   * Collective teardown. Every rank first waits until all its own work is done and a barrier shows that
   * every rank has stopped touching peers; then the peer mappings are closed, and only after a second
   * barrier (no one maps our memory any more) is the local allocation freed.
   */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    this.device.synchronize();
    await this.group.barrier();
    this.device.makeCurrent();
    for (const p of this.opened) ipcCloseMemHandle(p);
    this.opened = [];
    await this.group.barrier();
    this.peerTable.dispose();
    this.signal.dispose();
    this.local.dispose();
  }
}
