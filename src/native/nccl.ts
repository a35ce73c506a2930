// NCCL through koffi. Bound lazily; every non-zero ncclResult_t becomes an NcclError with NCCL's own text.

import { NcclError } from '../errors.ts';
import { loadLibrary, NCCL } from './loader.ts';

// biome-ignore lint/suspicious/noExplicitAny: FFI boundary
type Raw = any;
let fns: Record<string, Raw> | undefined;
let path = '';

function api(): Record<string, Raw> {
  if (fns) return fns;
  const loaded = loadLibrary(NCCL);
  path = loaded.path;
  const l = loaded.lib;
  fns = {
    getVersion: l.func('int ncclGetVersion(int *version)'),
    errorString: l.func('const char *ncclGetErrorString(int result)'),
  };
  return fns;
}

export function ncclPath(): string {
  api();
  return path;
}

function check(call: string, status: number): void {
  if (status === 0) return;
  throw new NcclError(call, status, api().errorString(status) as string);
}

/** NCCL version as [major, minor, patch]. */
export function ncclVersion(): [number, number, number] {
  const v = new Int32Array(1);
  check('ncclGetVersion', api().getVersion(v));
  const code = v[0]!;
  // Since 2.9 the code is major*10000 + minor*100 + patch.
  return [Math.floor(code / 10000), Math.floor((code % 10000) / 100), code % 100];
}
