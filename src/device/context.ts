// Device: one GPU, its primary context and its properties. tsep uses the primary context (as the CUDA
// runtime does), so memory and modules are shared with any other library in the process.

import { DisposedError, TsepError, ValidationError } from '../errors.ts';
import { cString, cu, DEVICE_ATTR, driverVersion, ensureInit } from '../native/cuda.ts';

export interface DeviceInfo {
  ordinal: number;
  name: string;
  smCount: number;
  computeCapability: [number, number];
  totalMemory: number;
  l2CacheBytes: number;
  maxSharedMemoryPerBlockOptin: number;
  pciBusId: string;
  /** The GPU's UUID (hex): the same GPU seen from any process or container has the same one. */
  uuid: string;
}

function attr(dev: number, a: number): number {
  const v = new Int32Array(1);
  cu('cuDeviceGetAttribute', v, a, dev);
  return v[0]!;
}

const devices = new Map<number, Device>();
let current: Device | undefined;

export class Device {
  readonly ordinal: number;
  readonly info: DeviceInfo;
  private ctx: bigint;
  private readonly peersEnabled = new Set<number>();

  private constructor(ordinal: number) {
    this.ordinal = ordinal;
    const handle = new Int32Array(1);
    cu('cuDeviceGet', handle, ordinal);
    const ctx = new BigUint64Array(1);
    cu('cuDevicePrimaryCtxRetain', ctx, ordinal);
    this.ctx = ctx[0]!;
    cu('cuCtxSetCurrent', this.ctx);
    const name = new Uint8Array(256);
    cu('cuDeviceGetName', name, name.length, ordinal);
    const mem = new BigUint64Array(1);
    cu('cuDeviceTotalMem_v2', mem, ordinal);
    const bus = new Uint8Array(64);
    cu('cuDeviceGetPCIBusId', bus, bus.length, ordinal);
    const uuid = new Uint8Array(16);
    cu('cuDeviceGetUuid_v2', uuid, ordinal);
    this.info = {
      ordinal,
      name: cString(name),
      smCount: attr(ordinal, DEVICE_ATTR.MULTIPROCESSOR_COUNT),
      computeCapability: [
        attr(ordinal, DEVICE_ATTR.COMPUTE_CAPABILITY_MAJOR),
        attr(ordinal, DEVICE_ATTR.COMPUTE_CAPABILITY_MINOR),
      ],
      totalMemory: Number(mem[0]),
      l2CacheBytes: attr(ordinal, DEVICE_ATTR.L2_CACHE_SIZE),
      maxSharedMemoryPerBlockOptin: attr(ordinal, DEVICE_ATTR.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
      pciBusId: cString(bus),
      uuid: Buffer.from(uuid).toString('hex'),
    };
  }

  /** Number of visible GPUs (0 when the driver is present but no GPU is visible). */
  static count(): number {
    ensureInit();
    const n = new Int32Array(1);
    cu('cuDeviceGetCount', n);
    return n[0]!;
  }

  /** The device with this ordinal, made current on the calling thread. */
  static get(ordinal = 0): Device {
    ensureInit();
    const n = Device.count();
    if (!Number.isSafeInteger(ordinal) || ordinal < 0 || ordinal >= n) {
      throw new ValidationError('ordinal', String(ordinal), `a GPU index in [0, ${n})`);
    }
    let d = devices.get(ordinal);
    if (!d) {
      d = new Device(ordinal);
      devices.set(ordinal, d);
    }
    d.makeCurrent();
    return d;
  }

  /** PCI bus id of every visible GPU, by ordinal (creates no context). */
  static pciBusIds(): string[] {
    const n = Device.count();
    return Array.from({ length: n }, (_, i) => {
      const bus = new Uint8Array(64);
      cu('cuDeviceGetPCIBusId', bus, bus.length, i);
      return cString(bus);
    });
  }

  /** The device most recently made current (throws if none). */
  static current(): Device {
    if (!current)
      throw new TsepError('TSEP_NO_GPU', 'No GPU has been selected: call Device.get(ordinal) first.');
    return current;
  }

  static driverVersion(): [number, number] {
    ensureInit();
    return driverVersion();
  }

  get context(): bigint {
    if (this.ctx === 0n) throw new DisposedError(`Device ${this.ordinal}`);
    return this.ctx;
  }

  makeCurrent(): void {
    if (current === this) return;
    cu('cuCtxSetCurrent', this.context);
    current = this;
  }

  /** Whether this GPU can read and write `peer`'s memory directly (NVLink or PCIe P2P). */
  canAccessPeer(peer: number): boolean {
    if (peer === this.ordinal) return true;
    const v = new Int32Array(1);
    cu('cuDeviceCanAccessPeer', v, this.ordinal, peer);
    return v[0] === 1;
  }

  /** Lets kernels on this device dereference `peer`'s memory (idempotent). */
  enablePeerAccess(peer: Device): void {
    if (peer.ordinal === this.ordinal || this.peersEnabled.has(peer.ordinal)) return;
    this.makeCurrent();
    try {
      cu('cuCtxEnablePeerAccess', peer.context, 0);
    } catch (e) {
      // CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED (704) is fine: someone else in the process enabled it.
      if ((e as { status?: number }).status !== 704) throw e;
    }
    this.peersEnabled.add(peer.ordinal);
  }

  /** Free and total device memory in bytes. */
  memoryInfo(): { free: number; total: number } {
    this.makeCurrent();
    const f = new BigUint64Array(1);
    const t = new BigUint64Array(1);
    cu('cuMemGetInfo_v2', f, t);
    return { free: Number(f[0]), total: Number(t[0]) };
  }

  /** Blocks until all work on the device is done. Prefer Event/Stream waits, which do not block. */
  synchronize(): void {
    this.makeCurrent();
    cu('cuCtxSynchronize');
  }
}
