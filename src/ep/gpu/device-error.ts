// Bounded device waits: the timeout every EP kernel gets, and the host side of the error record a kernel
// writes into host-mapped memory when a wait expires (kernels/ep_sync.cuh ErrorRecord).

import type { HostBuffer } from '../../device/memory.ts';
import { EpTimeoutError } from '../../errors.ts';

const KERNEL_NAMES: Record<number, string> = {
  1: 'normal notify',
  2: 'normal dispatch send',
  3: 'normal dispatch receive',
  4: 'normal barrier',
  5: 'normal combine send',
  6: 'normal combine reduce',
  7: 'cross-host count exchange',
  8: 'cross-host dispatch receive',
  9: 'cross-host barrier',
  10: 'cross-host combine (host partials)',
  11: 'cross-host combine reduce',
};

/** Device wait bound in nanoseconds: TSEP_TIMEOUT_S (default 10 s). */
export function deviceTimeoutNs(): bigint {
  const s = Number(process.env.TSEP_TIMEOUT_S ?? 10);
  return BigInt(Math.round((Number.isFinite(s) && s > 0 ? s : 10) * 1e9));
}

/** The host's bound on waiting for a stream whose kernels wait at most `timeoutNs`: that, plus 5 s. */
export function hostWaitMs(timeoutNs: bigint): number {
  return Number(timeoutNs / 1_000_000n) + 5000;
}

/** Reads the error record at `offset` of `page`; undefined while no kernel has reported. */
export function readDeviceError(page: HostBuffer, offset: number): string | undefined {
  const ints = new Int32Array(page.arrayBuffer, offset, 6);
  if (Atomics.load(ints, 0) !== 1) return undefined;
  const longs = new BigInt64Array(page.arrayBuffer, offset + 24, 2);
  const [, rank, kernel, phase, peer] = ints;
  const what = KERNEL_NAMES[kernel!] ?? `kernel ${kernel}`;
  return (
    `rank ${rank} timed out in the ${what} kernel (phase ${phase}) waiting for ${peer! >= 0 ? `rank ${peer}` : 'all ranks'}: ` +
    `expected ${longs[0]}, saw ${longs[1]}. A peer rank is missing, dead or running a different call; ` +
    'check that every rank makes the same EP calls in the same order (TSEP_TIMEOUT_S sets the bound).'
  );
}

/** Throws EpTimeoutError if a kernel has reported a timeout. */
export function throwIfDeviceError(page: HostBuffer, offset: number): void {
  const msg = readDeviceError(page, offset);
  if (msg !== undefined) throw new EpTimeoutError(msg);
}

/** Clears the record so the buffer can be used again after the caller handled the failure. */
export function clearDeviceError(page: HostBuffer, offset: number): void {
  new Uint8Array(page.arrayBuffer, offset, 40).fill(0);
}
