// initProcessGroup: from the environment a launcher (tsep launch, torchrun, srun) set up to a connected,
// rendezvoused StoreGroup.

import { readDistEnv } from './env.ts';
import { DEFAULT_STORE_TIMEOUT_MS, StoreClient, StoreServer, storeBindAddress } from './store.ts';
import { StoreGroup } from './store-group.ts';

/** Options for {@link initProcessGroup}. */
export interface InitProcessGroupOptions {
  /**
   * Bound on connecting, on each store operation and on each collective's wait. Default: the env var
   * TSEP_STORE_TIMEOUT_S (seconds), else 300 s.
   */
  timeoutMs?: number;
  /** Environment to read instead of process.env. */
  env?: Readonly<Record<string, string | undefined>>;
  /**
   * Whether this rank hosts the TCP store on MASTER_PORT. Default: rank 0 does, unless a launcher already
   * hosts it (TSEP_STORE_HOSTED=1, which `tsep launch` sets).
   */
  hostStore?: boolean;
}

/**
 * Joins the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
 * MASTER_ADDR, MASTER_PORT, or Slurm's SLURM_* equivalents). Resolves once every rank has joined (an
 * initial barrier), so a rank that never starts surfaces here as a RendezvousError naming it.
 */
export async function initProcessGroup(options: InitProcessGroupOptions = {}): Promise<StoreGroup> {
  const env = readDistEnv(options.env);
  const timeoutMs = options.timeoutMs ?? env.storeTimeoutMs ?? DEFAULT_STORE_TIMEOUT_MS;
  const hosting = options.hostStore ?? (env.rank === 0 && !env.storeHosted);
  const server = hosting
    ? (await StoreServer.listen({ host: storeBindAddress(env.masterAddr), port: env.masterPort })).unref()
    : undefined;
  let store: StoreClient | undefined;
  try {
    store = await StoreClient.connect(env.masterAddr, env.masterPort, { timeoutMs });
    const group = await StoreGroup.join(store, {
      rank: env.rank,
      size: env.worldSize,
      localRank: env.localRank,
      localSize: env.localWorldSize,
      timeoutMs,
      hostedServer: server,
    });
    // The hosting rank's server does not keep the process alive (a forgotten destroy() must not hang the
    // job), so when its work is done it still waits here for the others to leave before exiting.
    if (server) process.once('beforeExit', () => void group.destroy());
    return group;
  } catch (err) {
    await store?.close();
    if (server) {
      // The other ranks are failing too; let them read what they need (e.g. who is missing) first.
      await server.whenIdle(timeoutMs);
      await server.close();
    }
    throw err;
  }
}
