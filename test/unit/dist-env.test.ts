// Parsing the process-group environment: torchrun's names, Slurm's, and the errors when neither fits.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { expandSlurmTasksPerNode, firstSlurmHost, readDistEnv } from '../../src/dist/env.ts';
import { ValidationError } from '../../src/errors.ts';

const torchrun = {
  RANK: '5',
  WORLD_SIZE: '8',
  LOCAL_RANK: '1',
  LOCAL_WORLD_SIZE: '4',
  MASTER_ADDR: 'node0',
  MASTER_PORT: '29500',
};

function rejects(env: Record<string, string>, variable: string, pattern?: RegExp): void {
  assert.throws(
    () => readDistEnv(env),
    (e: unknown) =>
      e instanceof ValidationError &&
      e.argument === variable &&
      (pattern === undefined || pattern.test(e.message)),
  );
}

test('torchrun names', () => {
  assert.deepEqual(readDistEnv(torchrun), {
    rank: 5,
    worldSize: 8,
    localRank: 1,
    localWorldSize: 4,
    masterAddr: 'node0',
    masterPort: 29500,
    source: 'torchrun',
    storeHosted: false,
    storeTimeoutMs: undefined,
  });
});

test('TSEP_STORE_HOSTED and TSEP_STORE_TIMEOUT_S', () => {
  const env = readDistEnv({ ...torchrun, TSEP_STORE_HOSTED: '1', TSEP_STORE_TIMEOUT_S: '2.5' });
  assert.equal(env.storeHosted, true);
  assert.equal(env.storeTimeoutMs, 2500);
  rejects({ ...torchrun, TSEP_STORE_TIMEOUT_S: '-1' }, 'TSEP_STORE_TIMEOUT_S');
  rejects({ ...torchrun, TSEP_STORE_TIMEOUT_S: 'soon' }, 'TSEP_STORE_TIMEOUT_S');
});

test('torchrun names take precedence over Slurm', () => {
  assert.equal(readDistEnv({ ...torchrun, SLURM_PROCID: '0' }).source, 'torchrun');
});

test('missing or malformed torchrun variables are named', () => {
  const { LOCAL_RANK: _, ...noLocalRank } = torchrun;
  rejects(noLocalRank, 'LOCAL_RANK', /unset/);
  const { MASTER_ADDR: __, ...noAddr } = torchrun;
  rejects(noAddr, 'MASTER_ADDR', /tsep launch/);
  rejects({ ...torchrun, RANK: 'two' }, 'RANK');
  rejects({ ...torchrun, RANK: '8' }, 'RANK', /below the world size 8/);
  rejects({ ...torchrun, LOCAL_RANK: '4' }, 'LOCAL_RANK');
  rejects({ ...torchrun, LOCAL_WORLD_SIZE: '9' }, 'LOCAL_WORLD_SIZE');
  rejects({ ...torchrun, WORLD_SIZE: '0' }, 'WORLD_SIZE');
  rejects({ ...torchrun, MASTER_PORT: '70000' }, 'MASTER_PORT');
});

test('no process-group environment at all', () => {
  rejects({}, 'environment', /torchrun or srun/);
});

test('Slurm names, with MASTER_ADDR from the node list and MASTER_PORT from the job id', () => {
  const env = readDistEnv({
    SLURM_PROCID: '6',
    SLURM_NTASKS: '8',
    SLURM_LOCALID: '2',
    SLURM_NTASKS_PER_NODE: '4',
    SLURM_STEP_NODELIST: 'gpu[07-08],login1',
    SLURM_JOB_ID: '123456',
  });
  assert.deepEqual(env, {
    rank: 6,
    worldSize: 8,
    localRank: 2,
    localWorldSize: 4,
    masterAddr: 'gpu07',
    masterPort: 20000 + (123456 % 20000),
    source: 'slurm',
    storeHosted: false,
    storeTimeoutMs: undefined,
  });
});

test('Slurm: explicit MASTER_ADDR/PORT win; SLURM_TASKS_PER_NODE gives the local size per node', () => {
  const env = readDistEnv({
    SLURM_PROCID: '8',
    SLURM_NTASKS: '9',
    SLURM_LOCALID: '0',
    SLURM_TASKS_PER_NODE: '4(x2),1',
    SLURM_NODEID: '2',
    MASTER_ADDR: '10.0.0.1',
    MASTER_PORT: '1234',
  });
  assert.equal(env.localWorldSize, 1);
  assert.equal(env.masterAddr, '10.0.0.1');
  assert.equal(env.masterPort, 1234);
});

test('Slurm errors name the variable', () => {
  const base = { SLURM_PROCID: '0', SLURM_NTASKS: '2', SLURM_LOCALID: '0', SLURM_NTASKS_PER_NODE: '2' };
  rejects({ ...base, MASTER_PORT: '1' }, 'MASTER_ADDR');
  rejects({ ...base, MASTER_ADDR: 'h' }, 'MASTER_PORT', /SLURM_JOB_ID/);
  const { SLURM_NTASKS_PER_NODE: _, ...noPerNode } = base;
  rejects({ ...noPerNode, MASTER_ADDR: 'h', MASTER_PORT: '1' }, 'SLURM_NTASKS_PER_NODE');
  rejects({ ...base, SLURM_LOCALID: '2', MASTER_ADDR: 'h', MASTER_PORT: '1' }, 'SLURM_LOCALID');
});

test('Slurm host lists and tasks-per-node lists', () => {
  assert.equal(firstSlurmHost('node1'), 'node1');
  assert.equal(firstSlurmHost('gpu[07-09,12],login1'), 'gpu07');
  assert.equal(firstSlurmHost('rack[2,4]-n[010-011]'), 'rack2-n010');
  assert.equal(firstSlurmHost('a1,b[1-2]'), 'a1');
  assert.throws(() => firstSlurmHost('bad[1-2'), ValidationError);
  assert.deepEqual(expandSlurmTasksPerNode('4(x2),3'), [4, 4, 3]);
  assert.deepEqual(expandSlurmTasksPerNode('2'), [2]);
  assert.throws(() => expandSlurmTasksPerNode('2(x)'), ValidationError);
});
