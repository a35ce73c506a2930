// Loaded kernel modules and fast kernel launches. Arguments are packed into one native block that the
// driver reads through CU_LAUNCH_PARAM_BUFFER_POINTER, so a launch is a single FFI call with no per-call
// allocation.

import { DisposedError, ValidationError } from '../errors.ts';
import { allocNative, cu, FUNC_ATTR } from '../native/cuda.ts';
import { Device } from './context.ts';
import type { Stream } from './stream.ts';

/** Kernel parameter kinds, in the order the kernel declares them. */
export type ArgKind = 'ptr' | 'i32' | 'u32' | 'f32' | 'i64' | 'u64';

const ARG_SIZE: Record<ArgKind, number> = { ptr: 8, i32: 4, u32: 4, f32: 4, i64: 8, u64: 8 };
const MAX_ARG_BYTES = 4096;

export interface LaunchConfig {
  grid: number | [number, number?, number?];
  block: number | [number, number?, number?];
  sharedBytes?: number;
  stream: Stream;
}

function dims(d: number | [number, number?, number?]): [number, number, number] {
  return typeof d === 'number' ? [d, 1, 1] : [d[0], d[1] ?? 1, d[2] ?? 1];
}

export class Module {
  readonly device: Device;
  private h: bigint;
  private readonly kernels = new Map<string, Kernel>();

  private constructor(device: Device, handle: bigint) {
    this.device = device;
    this.h = handle;
  }

  /** Loads a cubin image into the current context. */
  static load(image: Uint8Array, device: Device = Device.current()): Module {
    device.makeCurrent();
    const out = new BigUint64Array(1);
    cu('cuModuleLoadData', out, image);
    return new Module(device, out[0]!);
  }

  get handle(): bigint {
    if (this.h === 0n) throw new DisposedError('Module');
    return this.h;
  }

  /** Looks up an `extern "C"` kernel (once) and declares its parameter kinds. */
  kernel(name: string, params: readonly ArgKind[]): Kernel {
    const known = this.kernels.get(name);
    if (known) {
      // Runs on every launch of the EP paths: compare in place, without building strings.
      if (known.params.length !== params.length || known.params.some((k, i) => k !== params[i])) {
        throw new ValidationError(`parameters of kernel ${name}`, params.join(', '), known.params.join(', '));
      }
      return known;
    }
    const out = new BigUint64Array(1);
    cu('cuModuleGetFunction', out, this.handle, name);
    const k = new Kernel(this, name, out[0]!, params);
    this.kernels.set(name, k);
    return k;
  }

  /** Address and size of a `__device__` global. */
  global(name: string): { ptr: bigint; bytes: number } {
    const p = new BigUint64Array(1);
    const n = new BigUint64Array(1);
    cu('cuModuleGetGlobal_v2', p, n, this.handle, name);
    return { ptr: p[0]!, bytes: Number(n[0]) };
  }

  dispose(): void {
    if (this.h === 0n) return;
    this.device.makeCurrent();
    cu('cuModuleUnload', this.h);
    this.h = 0n;
  }
}

export class Kernel {
  readonly module: Module;
  readonly name: string;
  readonly params: readonly ArgKind[];
  private readonly fn: bigint;
  private readonly offsets: number[];
  private readonly argView: DataView;
  private readonly extraAddress: bigint;
  private maxDynamicShared = 0;

  constructor(module: Module, name: string, fn: bigint, params: readonly ArgKind[]) {
    this.module = module;
    this.name = name;
    this.fn = fn;
    this.params = params;
    this.offsets = [];
    let off = 0;
    for (const k of params) {
      const size = ARG_SIZE[k];
      off = Math.ceil(off / size) * size;
      this.offsets.push(off);
      off += size;
    }
    if (off > MAX_ARG_BYTES) throw new ValidationError('params', `${off} bytes`, `at most ${MAX_ARG_BYTES}`);
    // Layout of the native block: extra[5] (40 B), the size_t the extra array points to, then the args.
    const block = allocNative(64 + MAX_ARG_BYTES);
    const base = block.address;
    const header = new BigUint64Array(block.view, 0, 6);
    header[0] = 1n; // CU_LAUNCH_PARAM_BUFFER_POINTER
    header[1] = base + 64n;
    header[2] = 2n; // CU_LAUNCH_PARAM_BUFFER_SIZE
    header[3] = base + 40n;
    header[4] = 0n; // CU_LAUNCH_PARAM_END
    header[5] = BigInt(off); // must equal the kernel's parameter bytes exactly, without tail padding
    this.argView = new DataView(block.view, 64, MAX_ARG_BYTES);
    this.extraAddress = base;
    // The block lives as long as the kernel object; modules are few and long-lived.
    retained.push(block.external);
  }

  /** Registers per thread, as the compiler allocated them. */
  get registers(): number {
    const v = new Int32Array(1);
    cu('cuFuncGetAttribute', v, FUNC_ATTR.NUM_REGS, this.fn);
    return v[0]!;
  }

  /** Raises the dynamic shared-memory limit so launches can ask for more than 48 KiB. */
  setMaxDynamicShared(bytes: number): void {
    if (bytes <= this.maxDynamicShared) return;
    cu('cuFuncSetAttribute', this.fn, FUNC_ATTR.MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes);
    this.maxDynamicShared = bytes;
  }

  /** Blocks of this kernel that fit on one SM at `blockSize` threads and `sharedBytes` dynamic shared memory. */
  occupancy(blockSize: number, sharedBytes = 0): number {
    const v = new Int32Array(1);
    cu('cuOccupancyMaxActiveBlocksPerMultiprocessor', v, this.fn, blockSize, sharedBytes);
    return v[0]!;
  }

  /** Enqueues the kernel. `args` follow `params`: bigint or number for pointers and 64-bit values. */
  launch(config: LaunchConfig, args: readonly (number | bigint)[]): void {
    const p = this.params;
    if (args.length !== p.length) {
      throw new ValidationError(`arguments of kernel ${this.name}`, `${args.length} values`, `${p.length}`);
    }
    const v = this.argView;
    for (let i = 0; i < p.length; i++) {
      const o = this.offsets[i]!;
      const a = args[i]!;
      switch (p[i]) {
        case 'ptr':
        case 'u64':
          v.setBigUint64(o, BigInt(a), true);
          break;
        case 'i64':
          v.setBigInt64(o, BigInt(a), true);
          break;
        case 'i32':
          v.setInt32(o, Number(a), true);
          break;
        case 'u32':
          v.setUint32(o, Number(a), true);
          break;
        case 'f32':
          v.setFloat32(o, Number(a), true);
          break;
      }
    }
    // The caller may have made another GPU current since (a tensor made there, a second buffer): a
    // launch must run in its module's context. A compare when nothing changed.
    this.module.device.makeCurrent();
    const [gx, gy, gz] = dims(config.grid);
    const [bx, by, bz] = dims(config.block);
    const smem = config.sharedBytes ?? 0;
    if (smem > 48 * 1024) this.setMaxDynamicShared(smem);
    cu(
      'cuLaunchKernel',
      this.fn,
      gx,
      gy,
      gz,
      bx,
      by,
      bz,
      smem,
      config.stream.handle,
      null,
      this.extraAddress,
    );
  }
}

const retained: unknown[] = [];
