// NCCL through koffi. Bound lazily; every non-zero ncclResult_t becomes an NcclError with NCCL's own text.
// Communicator handles and buffers cross this boundary as bigint addresses.

import koffi from 'koffi';
import { NcclError } from '../errors.ts';
import { loadLibrary, NCCL } from './loader.ts';

// biome-ignore lint/suspicious/noExplicitAny: FFI boundary
type Raw = any;
let fns: Record<string, Raw> | undefined;
let path = '';

export const NCCL_UNIQUE_ID_BYTES = 128;

function api(): Record<string, Raw> {
  if (fns) return fns;
  const loaded = loadLibrary(NCCL);
  path = loaded.path;
  const l = loaded.lib;
  // ncclUniqueId is passed by value to ncclCommInitRank: a 128-byte struct.
  const uid = koffi.struct('tsep_ncclUniqueId', {
    internal: koffi.array('uint8_t', NCCL_UNIQUE_ID_BYTES, 'Typed'),
  });
  fns = {
    getVersion: l.func('int ncclGetVersion(int *version)'),
    errorString: l.func('const char *ncclGetErrorString(int result)'),
    lastError: l.func('const char *ncclGetLastError(uint64_t comm)'),
    getUniqueId: l.func('int ncclGetUniqueId(uint8_t *uniqueId)'),
    commInitRank: l.func('ncclCommInitRank', 'int', ['uint64_t *', 'int', uid, 'int']),
    commDestroy: l.func('int ncclCommDestroy(uint64_t comm)'),
    commAbort: l.func('int ncclCommAbort(uint64_t comm)'),
    commGetAsyncError: l.func('int ncclCommGetAsyncError(uint64_t comm, int *asyncError)'),
    allGather: l.func(
      'int ncclAllGather(uint64_t send, uint64_t recv, size_t count, int dtype, uint64_t comm, uint64_t stream)',
    ),
    allReduce: l.func(
      'int ncclAllReduce(uint64_t send, uint64_t recv, size_t count, int dtype, int op, uint64_t comm, uint64_t stream)',
    ),
    send: l.func(
      'int ncclSend(uint64_t send, size_t count, int dtype, int peer, uint64_t comm, uint64_t stream)',
    ),
    recv: l.func(
      'int ncclRecv(uint64_t recv, size_t count, int dtype, int peer, uint64_t comm, uint64_t stream)',
    ),
    groupStart: l.func('int ncclGroupStart()'),
    groupEnd: l.func('int ncclGroupEnd()'),
  };
  return fns;
}

export function ncclPath(): string {
  api();
  return path;
}

function check(call: string, status: number, comm?: bigint): void {
  if (status === 0) return;
  const f = api();
  const last = comm !== undefined ? (f.lastError(comm) as string | null) : null;
  throw new NcclError(call, status, `${f.errorString(status) as string}${last ? ` (${last})` : ''}`);
}

/** NCCL version as [major, minor, patch]. */
export function ncclVersion(): [number, number, number] {
  const v = new Int32Array(1);
  check('ncclGetVersion', api().getVersion(v));
  const code = v[0]!;
  // Since 2.9 the code is major*10000 + minor*100 + patch.
  return [Math.floor(code / 10000), Math.floor((code % 10000) / 100), code % 100];
}

export function ncclGetUniqueId(): Uint8Array {
  const id = new Uint8Array(NCCL_UNIQUE_ID_BYTES);
  check('ncclGetUniqueId', api().getUniqueId(id));
  return id;
}

/**
 * Joins a communicator. Called on the main thread on purpose: NCCL binds the communicator to the calling
 * thread's current CUDA device, and a worker thread would have none (every rank would land on GPU 0).
 * It blocks until every rank has joined, which takes well under a second once all ranks are up.
 */
export function ncclCommInitRank(nranks: number, id: Uint8Array, rank: number): bigint {
  const out = new BigUint64Array(1);
  check('ncclCommInitRank', api().commInitRank(out, nranks, { internal: id }, rank));
  return out[0]!;
}

export function ncclCommDestroy(comm: bigint): void {
  check('ncclCommDestroy', api().commDestroy(comm));
}

export function ncclCommAbort(comm: bigint): void {
  check('ncclCommAbort', api().commAbort(comm));
}

/** The communicator's asynchronous error status (0 when healthy, 7 while an operation is in progress). */
export function ncclCommGetAsyncError(comm: bigint): number {
  const v = new Int32Array(1);
  check('ncclCommGetAsyncError', api().commGetAsyncError(comm, v), comm);
  return v[0]!;
}

export function ncclAllGather(
  send: bigint,
  recv: bigint,
  count: number,
  dtype: number,
  comm: bigint,
  stream: bigint,
): void {
  check('ncclAllGather', api().allGather(send, recv, count, dtype, comm, stream), comm);
}

export function ncclAllReduce(
  send: bigint,
  recv: bigint,
  count: number,
  dtype: number,
  op: number,
  comm: bigint,
  stream: bigint,
): void {
  check('ncclAllReduce', api().allReduce(send, recv, count, dtype, op, comm, stream), comm);
}

export function ncclSend(
  buf: bigint,
  count: number,
  dtype: number,
  peer: number,
  comm: bigint,
  stream: bigint,
): void {
  check('ncclSend', api().send(buf, count, dtype, peer, comm, stream), comm);
}

export function ncclRecv(
  buf: bigint,
  count: number,
  dtype: number,
  peer: number,
  comm: bigint,
  stream: bigint,
): void {
  check('ncclRecv', api().recv(buf, count, dtype, peer, comm, stream), comm);
}

export function ncclGroupStart(): void {
  check('ncclGroupStart', api().groupStart());
}

export function ncclGroupEnd(): void {
  check('ncclGroupEnd', api().groupEnd());
}
