// Ranks simulated inside one process: each rank is an async task holding its own LocalGroup, and the
// collectives meet through shared in-memory slots. Used by the CPU backend's simulated worlds and tests.

import { DisposedError, ValidationError } from '../errors.ts';
import type { Group } from './group.ts';

interface Round {
  values: (Uint8Array | undefined)[];
  arrived: number;
  resolve: (values: Uint8Array[]) => void;
  done: Promise<Uint8Array[]>;
}

class LocalWorld {
  readonly size: number;
  // Collective calls are matched by sequence number: the n-th collective of every rank meets in round n.
  private readonly rounds = new Map<number, Round>();
  constructor(size: number) {
    this.size = size;
  }

  meet(seq: number, rank: number, value: Uint8Array | undefined): Promise<Uint8Array[]> {
    let round = this.rounds.get(seq);
    if (!round) {
      let resolve!: (v: Uint8Array[]) => void;
      const done = new Promise<Uint8Array[]>((r) => {
        resolve = r;
      });
      round = { values: new Array(this.size), arrived: 0, resolve, done };
      this.rounds.set(seq, round);
    }
    round.values[rank] = value;
    if (++round.arrived === this.size) {
      this.rounds.delete(seq);
      round.resolve(round.values.map((v) => v ?? new Uint8Array(0)));
    }
    return round.done;
  }
}

export class LocalGroup implements Group {
  readonly rank: number;
  readonly size: number;
  readonly localRank: number;
  readonly localSize: number;
  private readonly world: LocalWorld;
  private seq = 0;
  private destroyed = false;

  private constructor(world: LocalWorld, rank: number) {
    this.world = world;
    this.rank = rank;
    this.size = world.size;
    this.localRank = rank;
    this.localSize = world.size;
  }

  /** Creates the groups of a world of `size` simulated ranks, one per rank, all in this process. */
  static create(size: number): LocalGroup[] {
    if (!Number.isSafeInteger(size) || size < 1) {
      throw new ValidationError('size', String(size), 'a positive integer number of ranks');
    }
    const world = new LocalWorld(size);
    return Array.from({ length: size }, (_, r) => new LocalGroup(world, r));
  }

  private next(value: Uint8Array | undefined): Promise<Uint8Array[]> {
    if (this.destroyed) throw new DisposedError(`LocalGroup rank ${this.rank}`);
    return this.world.meet(this.seq++, this.rank, value);
  }

  async allGather(data: Uint8Array): Promise<Uint8Array[]> {
    // Copy so that a rank mutating its input afterwards cannot change what the others received.
    return this.next(new Uint8Array(data));
  }

  async broadcast(data: Uint8Array | undefined, root: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(root) || root < 0 || root >= this.size) {
      throw new ValidationError('root', String(root), `a rank in [0, ${this.size})`);
    }
    const all = await this.next(this.rank === root ? new Uint8Array(data ?? new Uint8Array(0)) : undefined);
    return all[root]!;
  }

  async barrier(): Promise<void> {
    await this.next(undefined);
  }

  async destroy(): Promise<void> {
    this.destroyed = true;
  }
}
