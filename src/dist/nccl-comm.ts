// NCCL communicator over a Group: the unique id travels through the group's broadcast, then every rank
// joins. Collectives are enqueued on a stream, never synchronized here.

import type { Device } from '../device/context.ts';
import { type DType, dtypeSize } from '../device/dtypes.ts';
import type { Stream } from '../device/stream.ts';
import { DisposedError, NcclError, TsepError, ValidationError } from '../errors.ts';
import {
  ncclAllGather,
  ncclAllReduce,
  ncclCommAbort,
  ncclCommDestroy,
  ncclCommGetAsyncError,
  ncclCommInitRank,
  ncclGetUniqueId,
  ncclGroupEnd,
  ncclGroupStart,
  ncclRecv,
  ncclSend,
  ncclVersion,
} from '../native/nccl.ts';
import type { Group } from './group.ts';
import { gatherPlaces, sharedGpu } from './rank-place.ts';
import type { StoreClient } from './store.ts';

/** Oldest NCCL tsep works with (grouped send/recv and ncclGetLastError). */
export const MIN_NCCL: readonly [number, number] = [2, 18];

const NCCL_DTYPE: Partial<Record<DType, number>> = {
  u8: 1,
  fp8_e4m3: 1, // moved as bytes; NCCL never reduces FP8 for tsep
  bool: 1,
  i32: 2,
  i64: 4,
  f16: 6,
  f32: 7,
  bf16: 9,
};

export type ReduceOp = 'sum' | 'prod' | 'max' | 'min';
const NCCL_OP: Record<ReduceOp, number> = { sum: 0, prod: 1, max: 2, min: 3 };

function ncclType(dtype: DType): number {
  const t = NCCL_DTYPE[dtype];
  if (t === undefined)
    throw new ValidationError('dtype', dtype, 'one of u8, bool, fp8_e4m3, i32, i64, f16, f32, bf16');
  return t;
}

/** Throws a clear error when the loaded NCCL is older than tsep needs. */
export function checkNcclVersion(version = ncclVersion()): void {
  const [maj, min] = version;
  if (maj < MIN_NCCL[0] || (maj === MIN_NCCL[0] && min < MIN_NCCL[1])) {
    throw new TsepError(
      'TSEP_UNSUPPORTED',
      `NCCL ${version.join('.')} is too old: tsep needs NCCL ≥ ${MIN_NCCL.join('.')}. Install a newer libnccl (e.g. the nvidia-nccl-cu12/cu13 wheel) and point TSEP_NCCL_LIB at it.`,
    );
  }
}

export class NcclCommunicator {
  readonly rank: number;
  readonly size: number;
  readonly device: Device;
  private comm: bigint;

  private constructor(comm: bigint, rank: number, size: number, device: Device) {
    this.comm = comm;
    this.rank = rank;
    this.size = size;
    this.device = device;
  }

  /**
   * Collective: the communicator of all ranks of `group`, this rank on `device`. Throws ValidationError when
   * two ranks use one GPU (NCCL refuses that; said here with the ranks named, before NCCL fails with a bare
   * "invalid usage").
   */
  static async create(group: Group, device: Device): Promise<NcclCommunicator> {
    checkNcclVersion();
    const shared = sharedGpu(await gatherPlaces(group, device));
    if (shared !== undefined) {
      throw new ValidationError(
        'NCCL communicator',
        shared,
        'one GPU per rank (NCCL refuses two ranks on one GPU); run one rank per GPU',
      );
    }
    const id = await group.broadcast(group.rank === 0 ? ncclGetUniqueId() : undefined, 0);
    // ncclCommInitRank blocks the calling thread until every rank joins, and rank 0 may host the TCP
    // store in this very event loop (torchrun, Slurm). So rank 0 starts only once every other rank's
    // last store operation (this `set`) is done; afterwards no rank needs the store to join.
    const store = (group as { store?: StoreClient }).store;
    const tag = `tsep/nccl/${Buffer.from(id.subarray(0, 16)).toString('hex')}`;
    if (store && group.rank !== 0) await store.set(`${tag}/${group.rank}`, '1');
    if (store && group.rank === 0) {
      await store.wait(Array.from({ length: group.size - 1 }, (_, i) => `${tag}/${i + 1}`));
    }
    device.makeCurrent();
    const comm = ncclCommInitRank(group.size, id, group.rank);
    if (store && group.rank === 0) {
      await Promise.all(Array.from({ length: group.size - 1 }, (_, i) => store.delete(`${tag}/${i + 1}`)));
    }
    return new NcclCommunicator(comm, group.rank, group.size, device);
  }

  get handle(): bigint {
    if (this.comm === 0n) throw new DisposedError('NcclCommunicator');
    return this.comm;
  }

  /** Raises the communicator's asynchronous error, if any (e.g. a peer failed). */
  checkAsyncError(): void {
    const status = ncclCommGetAsyncError(this.handle);
    if (status !== 0 && status !== 7)
      throw new NcclError('ncclCommGetAsyncError', status, 'asynchronous NCCL failure');
  }

  /** recv[r*count ..] = rank r's send[0..count) */
  allGather(send: bigint, recv: bigint, count: number, dtype: DType, stream: Stream): void {
    this.device.makeCurrent();
    ncclAllGather(send, recv, count, ncclType(dtype), this.handle, stream.handle);
  }

  allReduce(send: bigint, recv: bigint, count: number, dtype: DType, op: ReduceOp, stream: Stream): void {
    this.device.makeCurrent();
    ncclAllReduce(send, recv, count, ncclType(dtype), NCCL_OP[op], this.handle, stream.handle);
  }

  /** Equal-size all-to-all: block r of `send` goes to rank r, block s of `recv` comes from rank s. */
  allToAll(send: bigint, recv: bigint, countPerRank: number, dtype: DType, stream: Stream): void {
    const counts = new Array<number>(this.size).fill(countPerRank);
    const offsets = counts.map((_, r) => r * countPerRank);
    this.allToAllv(send, counts, offsets, recv, counts, offsets, dtype, stream);
  }

  /** All-to-all with per-peer counts and offsets (in elements), as grouped send/recv. */
  allToAllv(
    send: bigint,
    sendCounts: readonly number[],
    sendOffsets: readonly number[],
    recv: bigint,
    recvCounts: readonly number[],
    recvOffsets: readonly number[],
    dtype: DType,
    stream: Stream,
  ): void {
    for (const [name, a] of [
      ['sendCounts', sendCounts],
      ['sendOffsets', sendOffsets],
      ['recvCounts', recvCounts],
      ['recvOffsets', recvOffsets],
    ] as const) {
      if (a.length !== this.size)
        throw new ValidationError(name, `${a.length} entries`, `${this.size}, one per rank`);
    }
    ncclType(dtype); // rejects dtypes NCCL cannot move
    const es = dtypeSize(dtype);
    this.exchange(
      Array.from({ length: this.size }, (_, r) => ({
        peer: r,
        send: send + BigInt(sendOffsets[r]! * es),
        sendBytes: sendCounts[r]! * es,
        recv: recv + BigInt(recvOffsets[r]! * es),
        recvBytes: recvCounts[r]! * es,
      })),
      stream,
    );
  }

  /**
   * Point-to-point transfers in one NCCL group, as bytes: each entry sends `sendBytes` from `send` to
   * `peer` and/or receives `recvBytes` from `peer` into `recv` (an entry may do either or both; zero-byte
   * sides are skipped). Every rank must post the matching entries.
   */
  exchange(
    transfers: readonly {
      peer: number;
      send?: bigint;
      sendBytes?: number;
      recv?: bigint;
      recvBytes?: number;
    }[],
    stream: Stream,
  ): void {
    this.device.makeCurrent();
    ncclGroupStart();
    try {
      for (const t of transfers) {
        if (t.send !== undefined && (t.sendBytes ?? 0) > 0)
          ncclSend(t.send, t.sendBytes!, 1, t.peer, this.handle, stream.handle);
        if (t.recv !== undefined && (t.recvBytes ?? 0) > 0)
          ncclRecv(t.recv, t.recvBytes!, 1, t.peer, this.handle, stream.handle);
      }
    } finally {
      ncclGroupEnd();
    }
  }

  /** Aborts outstanding operations and frees the communicator (use after a peer failure). */
  abort(): void {
    if (this.comm === 0n) return;
    const c = this.comm;
    this.comm = 0n;
    ncclCommAbort(c);
  }

  destroy(): void {
    if (this.comm === 0n) return;
    const c = this.comm;
    this.comm = 0n;
    ncclCommDestroy(c);
  }
}
