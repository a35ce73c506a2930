// The process group of real processes: collectives built on the TCP store. The n-th collective of every
// rank uses keys under `<namespace>/<n>/<kind>/`, so successive collectives never mix and a rank that calls
// a different collective than the others waits on keys nobody writes (and times out naming them). The
// last rank to finish a collective deletes its keys, so the store does not grow with the number of calls.

import { DisposedError, RendezvousError, ValidationError } from '../errors.ts';
import type { Group } from './group.ts';
import type { StoreClient, StoreServer } from './store.ts';

/** How a {@link StoreGroup} sits in the job; see `initProcessGroup` for the usual way to make one. */
export interface StoreGroupOptions {
  rank: number;
  size: number;
  localRank: number;
  localSize: number;
  /** Bound on each collective's wait; default: the store client's timeout. */
  timeoutMs?: number;
  /** The store server this rank hosts, if any: kept alive in destroy() until the other ranks left. */
  hostedServer?: StoreServer;
  /**
   * Key prefix of this group's collectives. It must differ from that of every other group sharing the
   * store, or their keys collide; {@link StoreGroup.join} picks a fresh one.
   */
  namespace: string;
}

/** A {@link Group} whose ranks are processes that meet through a TCP store. */
export class StoreGroup implements Group {
  readonly rank: number;
  readonly size: number;
  readonly localRank: number;
  readonly localSize: number;
  /** The store connection, for other layers' rendezvous (NCCL unique ids, IPC handles). */
  readonly store: StoreClient;
  readonly timeoutMs: number;
  private readonly hostedServer: StoreServer | undefined;
  private readonly namespace: string;
  private seq = 0;
  private destroyed = false;

  constructor(store: StoreClient, options: StoreGroupOptions) {
    const { rank, size, localRank, localSize } = options;
    if (!Number.isSafeInteger(size) || size < 1) {
      throw new ValidationError('size', String(size), 'an integer ≥ 1');
    }
    if (!Number.isSafeInteger(rank) || rank < 0 || rank >= size) {
      throw new ValidationError('rank', String(rank), `an integer in [0, ${size})`);
    }
    if (!Number.isSafeInteger(localSize) || localSize < 1 || localSize > size) {
      throw new ValidationError('localSize', String(localSize), `an integer in [1, ${size}]`);
    }
    if (!Number.isSafeInteger(localRank) || localRank < 0 || localRank >= localSize) {
      throw new ValidationError('localRank', String(localRank), `an integer in [0, ${localSize})`);
    }
    this.store = store;
    this.rank = rank;
    this.size = size;
    this.localRank = localRank;
    this.localSize = localSize;
    this.timeoutMs = options.timeoutMs ?? store.timeoutMs;
    this.hostedServer = options.hostedServer;
    this.namespace = options.namespace;
  }

  /**
   * Creates this rank's group on `store` under a namespace no earlier group on the store used, and
   * resolves once every rank has joined (a barrier). Joins are counted on the store per group size: all
   * ranks of one join count before any rank can start the next (that needs this join's barrier), so
   * `(count - 1) / size` names the same generation on every rank.
   */
  static async join(store: StoreClient, options: Omit<StoreGroupOptions, 'namespace'>): Promise<StoreGroup> {
    const base = `tsep/pg/${options.size}`;
    const joined = await store.add(`${base}/joins`, 1, { timeoutMs: options.timeoutMs ?? store.timeoutMs });
    const generation = Math.floor((joined - 1) / options.size);
    const group = new StoreGroup(store, { ...options, namespace: `${base}/${generation}` });
    await group.barrier();
    return group;
  }

  async allGather(data: Uint8Array): Promise<Uint8Array[]> {
    const { base, keys } = this.begin('allGather');
    await this.store.set(keys[this.rank]!, data);
    await this.awaitRanks('allGather', keys, () => this.store.wait(keys, { timeoutMs: this.timeoutMs }));
    const values = await Promise.all(
      keys.map((k, r) =>
        r === this.rank ? new Uint8Array(data) : this.store.get(k, { timeoutMs: this.timeoutMs }),
      ),
    );
    await this.finish(base, keys);
    return values;
  }

  async broadcast(data: Uint8Array | undefined, root: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(root) || root < 0 || root >= this.size) {
      throw new ValidationError('root', String(root), `a rank in [0, ${this.size})`);
    }
    const { base, keys } = this.begin('broadcast');
    const key = keys[root]!;
    let value: Uint8Array;
    if (this.rank === root) {
      value = data ? new Uint8Array(data) : new Uint8Array(0);
      await this.store.set(key, value);
    } else {
      value = await this.awaitRanks(
        'broadcast',
        keys,
        () => this.store.get(key, { timeoutMs: this.timeoutMs }),
        [root],
      );
    }
    await this.finish(base, [key]);
    return value;
  }

  async barrier(): Promise<void> {
    const { base, keys } = this.begin('barrier');
    await this.store.set(keys[this.rank]!, '');
    await this.awaitRanks('barrier', keys, () => this.store.wait(keys, { timeoutMs: this.timeoutMs }));
    await this.finish(base, keys);
  }

  /**
   * Leaves the group and closes the store connection. A rank that hosts the store first waits (at most
   * the timeout) until every other rank has disconnected, so nobody loses the server mid-collective.
   */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await this.store.close();
    const server = this.hostedServer;
    if (!server) return;
    const idle = await server.whenIdle(this.timeoutMs);
    const stayed = server.connectionCount;
    await server.close();
    if (!idle) {
      throw new RendezvousError(
        `Rank ${this.rank} hosts the TCP store and waited ${this.timeoutMs / 1000} s for the other ranks to ` +
          `leave; ${stayed} connection(s) were still open, and were closed.`,
      );
    }
  }

  private begin(kind: string): { base: string; keys: string[] } {
    if (this.destroyed) throw new DisposedError(`StoreGroup rank ${this.rank}`);
    const base = `${this.namespace}/${this.seq++}/${kind}`;
    return { base, keys: Array.from({ length: this.size }, (_, r) => `${base}/${r}`) };
  }

  /**
   * Runs a wait on the keys of `ranks` (keys[r] belongs to rank r). When it fails, asks the store which
   * of those ranks never wrote their key, and raises a RendezvousError that names them.
   */
  private async awaitRanks<T>(
    kind: string,
    keys: string[],
    wait: () => Promise<T>,
    ranks: number[] = keys.map((_, r) => r),
  ): Promise<T> {
    try {
      return await wait();
    } catch (err) {
      if (!(err instanceof RendezvousError)) throw err;
      let missing: number[] = [];
      try {
        const present = await this.store.check(
          ranks.map((r) => keys[r]!),
          { timeoutMs: Math.min(this.timeoutMs, 5000) },
        );
        missing = ranks.filter((_, i) => !present[i]);
      } catch {
        // The store itself is unreachable; the original error says why.
      }
      if (missing.length === 0) {
        const error = new RendezvousError(`${kind} on rank ${this.rank} failed: ${err.message}`, {
          key: err.key,
        });
        error.cause = err;
        throw error;
      }
      const key = keys[missing[0]!]!;
      const error = new RendezvousError(
        `${kind} on rank ${this.rank} timed out after ${this.timeoutMs / 1000} s: ` +
          `rank${missing.length > 1 ? 's' : ''} ${missing.join(', ')} never arrived (store key "${key}"). ` +
          'Every rank must call the same collectives in the same order; a rank that crashed or hangs shows ' +
          'up here.',
        { key, missingRanks: missing },
      );
      error.cause = err;
      throw error;
    }
  }

  /** Counts this rank out; the last rank out deletes the collective's keys. */
  private async finish(base: string, keys: string[]): Promise<void> {
    const doneKey = `${base}/done`;
    if ((await this.store.add(doneKey, 1)) < this.size) return;
    await Promise.all([...keys, doneKey].map((k) => this.store.delete(k)));
  }
}
