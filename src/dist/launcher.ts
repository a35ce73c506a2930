// `tsep launch`: starts the local ranks of one node with torchrun's environment, hosts the TCP store on
// node 0, prefixes their output, and ends the job as a whole: the first rank to fail (or the timeout,
// or a signal) stops all the others, SIGTERM first and SIGKILL after a grace period.

import { constants } from 'node:os';
import type { Writable } from 'node:stream';
import { ValidationError } from '../errors.ts';
import { type RankExit, RankProcess } from './rank-process.ts';
import { StoreServer, storeBindAddress } from './store.ts';

/** Options of {@link launch}; the CLI flags of `tsep launch` map onto these one to one. */
export interface LaunchOptions {
  /** Ranks to start on this node (`-n`). */
  nprocPerNode: number;
  /** Nodes in the job; default 1. */
  nnodes?: number;
  /** This node's index in [0, nnodes); default 0. Node 0 hosts the store. */
  nodeRank?: number;
  /** Address the ranks dial for the store; default 127.0.0.1 (single node). */
  masterAddr?: string;
  /** Store port; default: a free port (only possible on a single node). */
  masterPort?: number;
  /** Kill the whole job after this many seconds. */
  timeoutS?: number;
  /** Time between SIGTERM and SIGKILL when stopping ranks; default 3000 ms. */
  graceMs?: number;
  /** The rank command and its arguments. */
  command: string;
  args?: readonly string[];
  /** Environment the ranks inherit (before the launcher's own variables); default process.env. */
  env?: NodeJS.ProcessEnv;
  /** Where prefixed rank output and launcher messages go; default process.stdout / process.stderr. */
  stdout?: Writable;
  stderr?: Writable;
}

/** How a launch ended. `exitCode` is what the `tsep launch` process exits with. */
export interface LaunchResult {
  exitCode: number;
  outcome: 'success' | 'rank-failed' | 'timeout' | 'interrupted';
  /** The first rank that failed, when outcome is 'rank-failed'. */
  failure?: RankExit;
  /** Every local rank's exit, indexed by local rank. */
  ranks: RankExit[];
}

/** Exit code when --timeout expires, as coreutils' `timeout` uses. */
export const TIMEOUT_EXIT_CODE = 124;

// NVLink multicast (NVLS) must stay off on the machines this library targets; see docs/process-group.md.
const MULTICAST_OFF = {
  NCCL_NVLS_ENABLE: '0',
  NVSHMEM_DISABLE_NVLS: '1',
  TORCH_SYMM_MEM_DISABLE_MULTICAST: '1',
};

const FORWARDED_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

/**
 * How long node 0 keeps the store after its own ranks exited cleanly, for the ranks of other nodes still
 * finishing their last collective on it (torchrun's agents hold an exit barrier for the same reason, 300 s
 * by default); --timeout, when sooner, ends it.
 */
export const STORE_LINGER_MS = 300_000;
/** After this long with ranks of other nodes still connected, node 0's launcher says what it waits for. */
const LINGER_NOTICE_MS = 2000;

/**
 * Runs one node's share of a job and resolves when every local rank has exited (on node 0 of several,
 * after a clean exit, once the other nodes' ranks have also left the store: at most STORE_LINGER_MS).
 * While it runs it owns SIGINT/SIGTERM/SIGHUP of this process (forwarded to the ranks; a second one kills
 * them at once; during that last wait one closes the store at once).
 * Throws ValidationError for bad options and RendezvousError when the store cannot be hosted.
 */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const o = validate(options);
  const startedAt = Date.now();
  const stderr = options.stderr ?? process.stderr;
  const say = (text: string): void => {
    stderr.write(`tsep launch: ${text}\n`);
  };

  const server =
    o.nodeRank === 0
      ? await StoreServer.listen({ host: storeBindAddress(o.masterAddr), port: o.masterPort ?? 0 })
      : undefined;
  const port = server?.port ?? o.masterPort!;
  const base = options.env ?? process.env;

  const ranks = Array.from({ length: o.nprocPerNode }, (_, localRank) => {
    const rank = o.nodeRank * o.nprocPerNode + localRank;
    return new RankProcess({
      rank,
      localRank,
      command: options.command,
      args: options.args ?? [],
      env: {
        ...base,
        RANK: String(rank),
        WORLD_SIZE: String(o.nnodes * o.nprocPerNode),
        LOCAL_RANK: String(localRank),
        LOCAL_WORLD_SIZE: String(o.nprocPerNode),
        MASTER_ADDR: o.masterAddr,
        MASTER_PORT: String(port),
        TSEP_STORE_HOSTED: '1',
        ...MULTICAST_OFF,
      },
      graceMs: o.graceMs,
      stdout: options.stdout ?? process.stdout,
      stderr,
    });
  });

  let outcome: LaunchResult['outcome'] = 'success';
  let exitCode = 0;
  let failure: RankExit | undefined;
  let killTimer: NodeJS.Timeout | undefined;
  let stopping = false;

  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) return;
    stopping = true;
    for (const r of ranks) r.signal(signal);
    killTimer = setTimeout(() => {
      for (const r of ranks) r.kill();
    }, o.graceMs);
  };

  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      say(`received ${signal} again; killing all ranks now`);
      for (const r of ranks) r.kill();
      return;
    }
    if (outcome === 'success') {
      outcome = 'interrupted';
      exitCode = 128 + constants.signals[signal];
    }
    say(`received ${signal}; forwarding it to all ranks (SIGKILL in ${o.graceMs / 1000} s)`);
    stop(signal);
  };
  for (const s of FORWARDED_SIGNALS) process.on(s, onSignal);

  const timeoutTimer =
    o.timeoutS === undefined
      ? undefined
      : setTimeout(() => {
          if (stopping) return;
          outcome = 'timeout';
          exitCode = TIMEOUT_EXIT_CODE;
          say(`timed out after ${o.timeoutS} s (--timeout); stopping all ranks`);
          stop('SIGTERM');
        }, o.timeoutS * 1000);

  const exits = await Promise.all(
    ranks.map((r) =>
      r.exited.then((exit) => {
        if (!stopping && failed(exit)) {
          failure = exit;
          outcome = 'rank-failed';
          exitCode = exitCodeOf(exit);
          say(`rank ${exit.rank} ${describe(exit)}; stopping the other ranks`);
          stop('SIGTERM');
        }
        return exit;
      }),
    ),
  );

  clearTimeout(timeoutTimer);
  clearTimeout(killTimer);
  for (const s of FORWARDED_SIGNALS) process.off(s, onSignal);
  if (server) {
    if (outcome === 'success') await lingerForOtherNodes(server, o, startedAt, say);
    await server.close();
  }
  if (failure) say(summary(failure));
  return { exitCode, outcome, ...(failure ? { failure } : {}), ranks: exits };
}

/**
 * Node 0's ranks may finish before the other nodes' ranks have left the store (their last barrier's
 * bookkeeping, their goodbye): closing it then fails them with ECONNRESET. Waits until every connection
 * is gone, at most STORE_LINGER_MS or what is left of --timeout, or until a signal; says so when it takes
 * a while.
 */
async function lingerForOtherNodes(
  server: StoreServer,
  o: { nnodes: number; timeoutS?: number },
  startedAt: number,
  say: (text: string) => void,
): Promise<void> {
  if (o.nnodes === 1 || server.connectionCount === 0) return;
  const left = o.timeoutS === undefined ? STORE_LINGER_MS : o.timeoutS * 1000 - (Date.now() - startedAt);
  const limitMs = Math.max(0, Math.min(STORE_LINGER_MS, left));
  const { promise: interrupted, resolve } = Promise.withResolvers<boolean>();
  const interrupt = (): void => resolve(false);
  for (const s of FORWARDED_SIGNALS) process.once(s, interrupt);
  const idleWithin = (ms: number): Promise<boolean> => Promise.race([server.whenIdle(ms), interrupted]);
  try {
    const first = Math.min(limitMs, LINGER_NOTICE_MS);
    if (await idleWithin(first)) return;
    if (limitMs > first) {
      say(
        `this node's ranks are done; waiting up to another ${Math.round((limitMs - first) / 1000)} s for ` +
          `the ${server.connectionCount} rank(s) of other nodes still connected to the store`,
      );
      if (await idleWithin(limitMs - first)) return;
    }
    say(`closing the store with ${server.connectionCount} connection(s) still open; those ranks will fail`);
  } finally {
    for (const s of FORWARDED_SIGNALS) process.off(s, interrupt);
  }
}

function failed(exit: RankExit): boolean {
  return exit.error !== undefined || exit.signal !== null || exit.code !== 0;
}

function exitCodeOf(exit: RankExit): number {
  if (exit.signal) return 128 + constants.signals[exit.signal];
  return exit.code !== null && exit.code > 0 && exit.code < 256 ? exit.code : 1;
}

function describe(exit: RankExit): string {
  if (exit.error !== undefined) return `could not start: ${exit.error}`;
  return exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
}

function summary(exit: RankExit): string {
  const lines = [
    `job failed: first failure was rank ${exit.rank} (local rank ${exit.localRank}), which ${describe(exit)}.`,
  ];
  if (exit.stderrTail.length > 0) {
    lines.push(`last stderr lines of rank ${exit.rank}:`, ...exit.stderrTail.map((l) => `  | ${l}`));
  } else {
    lines.push(`rank ${exit.rank} wrote nothing to stderr.`);
  }
  return lines.join('\n');
}

interface Checked {
  nprocPerNode: number;
  nnodes: number;
  nodeRank: number;
  masterAddr: string;
  masterPort: number | undefined;
  timeoutS: number | undefined;
  graceMs: number;
}

function validate(options: LaunchOptions): Checked {
  const { nprocPerNode, nnodes = 1, nodeRank = 0, masterPort, timeoutS, graceMs = 3000 } = options;
  if (!Number.isSafeInteger(nprocPerNode) || nprocPerNode < 1) {
    throw new ValidationError('nproc-per-node', String(nprocPerNode), 'an integer ≥ 1');
  }
  if (!Number.isSafeInteger(nnodes) || nnodes < 1) {
    throw new ValidationError('nnodes', String(nnodes), 'an integer ≥ 1');
  }
  if (!Number.isSafeInteger(nodeRank) || nodeRank < 0 || nodeRank >= nnodes) {
    throw new ValidationError('node-rank', String(nodeRank), `an integer in [0, ${nnodes})`);
  }
  if (
    masterPort !== undefined &&
    (!Number.isSafeInteger(masterPort) || masterPort < 1 || masterPort > 65535)
  ) {
    throw new ValidationError('master-port', String(masterPort), 'a TCP port in [1, 65535]');
  }
  if (nnodes > 1 && (options.masterAddr === undefined || masterPort === undefined)) {
    throw new ValidationError(
      options.masterAddr === undefined ? 'master-addr' : 'master-port',
      'unset',
      'with more than one node, the address of node 0 and a port every node agrees on',
    );
  }
  if (timeoutS !== undefined && !(timeoutS > 0 && Number.isFinite(timeoutS))) {
    throw new ValidationError('timeout', String(timeoutS), 'a positive number of seconds');
  }
  if (!Number.isSafeInteger(graceMs) || graceMs < 0) {
    throw new ValidationError('graceMs', String(graceMs), 'an integer number of milliseconds ≥ 0');
  }
  if (options.command === '') throw new ValidationError('command', 'an empty string', 'a program to run');
  return {
    nprocPerNode,
    nnodes,
    nodeRank,
    masterAddr: options.masterAddr ?? '127.0.0.1',
    masterPort,
    timeoutS,
    graceMs,
  };
}
