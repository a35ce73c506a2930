// Reads the process-group description from the environment: torchrun's names (set by `tsep launch`,
// torchrun or by hand) or, when those are absent, Slurm's (srun).

import { ValidationError } from '../errors.ts';

/** Where this rank sits in the job and where the TCP store is. */
export interface DistEnv extends Omit<Layout, 'names'> {
  /** Which set of variables described the job. */
  source: 'torchrun' | 'slurm';
  /** TSEP_STORE_HOSTED=1: a launcher already serves the store, so rank 0 must not host one. */
  storeHosted: boolean;
  /** TSEP_STORE_TIMEOUT_S in milliseconds, when set. */
  storeTimeoutMs: number | undefined;
}

type Env = Readonly<Record<string, string | undefined>>;

const TORCHRUN_NAMES = ['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'] as const;

const HOW_TO =
  'run under `tsep launch`, torchrun or srun, or set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, ' +
  'MASTER_ADDR and MASTER_PORT';

/**
 * Parses the process-group environment. Throws ValidationError naming the variable that is missing or
 * malformed, and what would fix it.
 */
export function readDistEnv(env: Env = process.env): DistEnv {
  const torchrun = TORCHRUN_NAMES.some((n) => env[n] !== undefined);
  if (!torchrun && env.SLURM_PROCID === undefined) {
    throw new ValidationError('environment', 'neither RANK/WORLD_SIZE nor SLURM_PROCID set', HOW_TO);
  }
  const layout = torchrun ? readTorchrun(env) : readSlurm(env);
  if (layout.rank >= layout.worldSize) {
    throw new ValidationError(
      layout.names[0],
      String(layout.rank),
      `a rank below the world size ${layout.worldSize}`,
    );
  }
  if (layout.localRank >= layout.localWorldSize) {
    throw new ValidationError(
      layout.names[2],
      String(layout.localRank),
      `a local rank below the local world size ${layout.localWorldSize}`,
    );
  }
  if (layout.localWorldSize > layout.worldSize) {
    throw new ValidationError(
      layout.names[3],
      String(layout.localWorldSize),
      `at most the world size ${layout.worldSize}`,
    );
  }
  return {
    rank: layout.rank,
    worldSize: layout.worldSize,
    localRank: layout.localRank,
    localWorldSize: layout.localWorldSize,
    masterAddr: layout.masterAddr,
    masterPort: layout.masterPort,
    source: torchrun ? 'torchrun' : 'slurm',
    storeHosted: env.TSEP_STORE_HOSTED === '1',
    storeTimeoutMs: readTimeout(env),
  };
}

interface Layout {
  rank: number;
  worldSize: number;
  localRank: number;
  localWorldSize: number;
  masterAddr: string;
  masterPort: number;
  /** Variable names of rank, world size, local rank, local world size, for messages. */
  names: readonly [string, string, string, string];
}

function readTorchrun(env: Env): Layout {
  return {
    rank: int(env, 'RANK', 0),
    worldSize: int(env, 'WORLD_SIZE', 1),
    localRank: int(env, 'LOCAL_RANK', 0),
    localWorldSize: int(env, 'LOCAL_WORLD_SIZE', 1),
    masterAddr: required(env, 'MASTER_ADDR', 'the host name or IP of the rank-0 node'),
    masterPort: port(env, 'MASTER_PORT'),
    names: TORCHRUN_NAMES,
  };
}

function readSlurm(env: Env): Layout {
  const nodeList = env.SLURM_STEP_NODELIST ?? env.SLURM_JOB_NODELIST;
  return {
    rank: int(env, 'SLURM_PROCID', 0),
    worldSize: int(env, env.SLURM_NTASKS !== undefined ? 'SLURM_NTASKS' : 'SLURM_NPROCS', 1),
    localRank: int(env, 'SLURM_LOCALID', 0),
    localWorldSize: slurmTasksOnThisNode(env),
    // Ranks are placed node by node, so rank 0 runs on the first node of the step.
    masterAddr:
      env.MASTER_ADDR ??
      (nodeList !== undefined
        ? firstSlurmHost(nodeList)
        : required(env, 'MASTER_ADDR', 'the host name or IP of the rank-0 node')),
    masterPort: env.MASTER_PORT !== undefined ? port(env, 'MASTER_PORT') : slurmPort(env),
    names: ['SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_NTASKS_PER_NODE'],
  };
}

// With no MASTER_PORT, every rank of a Slurm job derives the same port from the job id, as PyTorch
// Lightning does; two jobs sharing a node collide only if their ids are equal modulo 20000.
function slurmPort(env: Env): number {
  const jobId = env.SLURM_JOB_ID;
  if (jobId === undefined || !/^\d+$/.test(jobId)) {
    throw new ValidationError(
      'MASTER_PORT',
      'unset (and no numeric SLURM_JOB_ID to derive it from)',
      'a TCP port',
    );
  }
  return 20000 + (Number(jobId) % 20000);
}

function slurmTasksOnThisNode(env: Env): number {
  if (env.SLURM_NTASKS_PER_NODE !== undefined) {
    // "4", or "4(x2)" on some versions: the count comes first either way.
    return positive(
      'SLURM_NTASKS_PER_NODE',
      env.SLURM_NTASKS_PER_NODE.match(/^\d+/)?.[0] ?? env.SLURM_NTASKS_PER_NODE,
    );
  }
  if (env.SLURM_TASKS_PER_NODE !== undefined) {
    const perNode = expandSlurmTasksPerNode(env.SLURM_TASKS_PER_NODE);
    const node = int(env, 'SLURM_NODEID', 0);
    const count = perNode[node];
    if (count === undefined) {
      throw new ValidationError(
        'SLURM_NODEID',
        String(node),
        `a node index below ${perNode.length} (SLURM_TASKS_PER_NODE="${env.SLURM_TASKS_PER_NODE}")`,
      );
    }
    return count;
  }
  throw new ValidationError(
    'SLURM_NTASKS_PER_NODE',
    'unset (and no SLURM_TASKS_PER_NODE)',
    'the tasks per node',
  );
}

/** Expands Slurm's tasks-per-node syntax, e.g. "4(x2),3" -> [4, 4, 3]. */
export function expandSlurmTasksPerNode(spec: string): number[] {
  const out: number[] = [];
  for (const part of spec.split(',')) {
    const m = /^(\d+)(?:\(x(\d+)\))?$/.exec(part.trim());
    if (!m) throw new ValidationError('SLURM_TASKS_PER_NODE', `"${spec}"`, 'a list like "4(x2),3"');
    for (let i = 0; i < Number(m[2] ?? 1); i++) out.push(Number(m[1]));
  }
  return out;
}

/** The first host of a Slurm node list, e.g. "gpu[07-09,12],login1" -> "gpu07". */
export function firstSlurmHost(nodeList: string): string {
  let depth = 0;
  let end = nodeList.length;
  for (let i = 0; i < nodeList.length; i++) {
    const c = nodeList[i];
    if (c === '[') depth++;
    else if (c === ']') depth--;
    else if (c === ',' && depth === 0) {
      end = i;
      break;
    }
  }
  const host = nodeList.slice(0, end).replace(/\[([^\]]*)\]/g, (_, inner: string) => inner.split(/[,-]/)[0]!);
  if (host === '' || /[[\]]/.test(host)) {
    throw new ValidationError('SLURM_STEP_NODELIST', `"${nodeList}"`, 'a Slurm host list like "gpu[07-09]"');
  }
  return host;
}

function readTimeout(env: Env): number | undefined {
  const raw = env.TSEP_STORE_TIMEOUT_S;
  if (raw === undefined || raw === '') return undefined;
  const s = Number(raw);
  if (!(s > 0) || !Number.isFinite(s)) {
    throw new ValidationError('TSEP_STORE_TIMEOUT_S', `"${raw}"`, 'a positive number of seconds');
  }
  return s * 1000;
}

function required(env: Env, name: string, what: string): string {
  const v = env[name];
  if (v === undefined || v === '') throw new ValidationError(name, 'unset', `${what}; ${HOW_TO}`);
  return v;
}

function int(env: Env, name: string, min: number): number {
  const raw = required(env, name, 'an integer');
  const v = Number(raw);
  if (!/^\d+$/.test(raw) || !Number.isSafeInteger(v) || v < min) {
    throw new ValidationError(name, `"${raw}"`, `an integer ≥ ${min}`);
  }
  return v;
}

function positive(name: string, raw: string): number {
  const v = Number(raw);
  if (!/^\d+$/.test(raw) || v < 1) throw new ValidationError(name, `"${raw}"`, 'an integer ≥ 1');
  return v;
}

function port(env: Env, name: string): number {
  const v = int(env, name, 1);
  if (v > 65535) throw new ValidationError(name, String(v), 'a TCP port in [1, 65535]');
  return v;
}
