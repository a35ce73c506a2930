// The process-group contract every backend relies on. Implementations: LocalGroup (ranks as async tasks
// in one process, for the CPU backend and tests) and the TCP-store group that `initProcessGroup` returns.

export interface Group {
  /** Global rank of this member, 0 ≤ rank < size. */
  readonly rank: number;
  /** Number of ranks in the job. */
  readonly size: number;
  /** Rank among the members on this host. */
  readonly localRank: number;
  /** Members on this host. */
  readonly localSize: number;
  /** Every rank contributes bytes; every rank receives all contributions, indexed by rank. */
  allGather(data: Uint8Array): Promise<Uint8Array[]>;
  /** Rank `root` sends `data`; every rank (root included) receives it. */
  broadcast(data: Uint8Array | undefined, root: number): Promise<Uint8Array>;
  /** Resolves once every rank has called it. */
  barrier(): Promise<void>;
  /** Leaves the group; later calls throw. */
  destroy(): Promise<void>;
}
