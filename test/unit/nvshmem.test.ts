// NVSHMEM support without a GPU or NVSHMEM: install discovery, the init-attribute layout, the NVRTC options
// and the link target. The device run itself is bench/tools/nvshmem-spike.ts on the GPU machine.

import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LibraryNotFoundError, ValidationError } from '../../src/errors.ts';
import { cudaIncludeDirs, nvshmemCompileOptions } from '../../src/jit/link.ts';
import { jitTarget } from '../../src/native/cuda.ts';
import {
  emptyUniqueId,
  encodeInitAttr,
  findNvshmem,
  NVSHMEM_INIT_ATTR_BYTES,
  NVSHMEM_UNIQUE_ID_BYTES,
  nvshmemHomeCandidates,
} from '../../src/native/nvshmem.ts';
import { tempDir } from './helpers/temp.ts';

function fakeInstall(): string {
  const home = tempDir('tsep-nvshmem-');
  mkdirSync(join(home, 'lib'));
  mkdirSync(join(home, 'include'));
  for (const f of ['lib/libnvshmem_host.so.3', 'lib/libnvshmem_device.a', 'include/nvshmem.h'])
    writeFileSync(join(home, f), '');
  return home;
}

test('TSEP_NVSHMEM_HOME is the only candidate; otherwise NVSHMEM_HOME comes before the wheel dirs', () => {
  assert.deepEqual(nvshmemHomeCandidates({ TSEP_NVSHMEM_HOME: '/x', NVSHMEM_HOME: '/y' }), ['/x']);
  const c = nvshmemHomeCandidates({ NVSHMEM_HOME: '/y' });
  assert.equal(c[0], '/y');
  assert.ok(c.slice(1).every((p) => p.endsWith('/nvidia/nvshmem')));
});

test('a complete install is found with every path tsep needs', () => {
  const home = fakeInstall();
  const i = findNvshmem({ TSEP_NVSHMEM_HOME: home });
  assert.equal(i.hostLibrary, join(home, 'lib', 'libnvshmem_host.so.3'));
  assert.equal(i.deviceLibrary, join(home, 'lib', 'libnvshmem_device.a'));
  assert.equal(i.includeDir, join(home, 'include'));
});

test('a missing or partial install raises LibraryNotFoundError naming what is missing and the env var', () => {
  const empty = tempDir('tsep-nvshmem-');
  assert.throws(
    () => findNvshmem({ TSEP_NVSHMEM_HOME: empty }),
    (e: unknown) =>
      e instanceof LibraryNotFoundError &&
      e.code === 'TSEP_LIBRARY_NOT_FOUND' &&
      e.searched.length === 1 &&
      e.message.includes('TSEP_NVSHMEM_HOME') &&
      e.message.includes('missing lib/libnvshmem_host.so.3, lib/libnvshmem_device.a, include/nvshmem.h'),
  );
});

test('nvshmemx_init_attr_t and nvshmemx_uniqueid_t are laid out as NVSHMEM 3.4 declares them', () => {
  assert.equal(NVSHMEM_UNIQUE_ID_BYTES, 128);
  assert.equal(NVSHMEM_INIT_ATTR_BYTES, 144);
  const id = emptyUniqueId();
  assert.equal(id.byteLength, 128);
  assert.equal(new DataView(id.buffer).getInt32(0, true), (1 << 16) + 128);

  const attr = encodeInitAttr(0x7f00_1234_5678n, 3, 8);
  const v = new DataView(attr.buffer);
  assert.equal(attr.byteLength, 144);
  assert.equal(v.getInt32(0, true), (1 << 16) + 144); // attr.version
  assert.equal(v.getBigUint64(8, true), 0n); // mpi_comm
  assert.equal(v.getInt32(16, true), (1 << 16) + 128); // args.version
  assert.equal(v.getInt32(24, true), (1 << 16) + 24); // args.uid_args.version
  assert.equal(v.getBigUint64(32, true), 0x7f00_1234_5678n); // args.uid_args.id
  assert.equal(v.getInt32(40, true), 3); // myrank
  assert.equal(v.getInt32(44, true), 8); // nranks
  assert.ok(attr.subarray(48).every((b) => b === 0)); // args.content
  assert.throws(() => encodeInitAttr(0n, 2, 2), ValidationError);
  assert.throws(() => encodeInitAttr(0n, 0, 0), ValidationError);
});

test('NVSHMEM kernels compile as relocatable code with the NVSHMEM and CUDA headers', () => {
  const opts = nvshmemCompileOptions(
    'sm_90a',
    { includeDir: '/n/include' },
    ['/c/include', '/c/include/cccl'],
    {
      B: 2,
      A: true,
    },
  );
  for (const o of [
    '--gpu-architecture=sm_90a',
    '--relocatable-device-code=true',
    '-default-device',
    '-I/n/include',
    '-I/c/include',
    '-I/c/include/cccl',
  ])
    assert.ok(opts.includes(o), o);
  assert.ok(opts.some((o) => o.startsWith('--pre-include=')));
  assert.deepEqual(opts.slice(-2), ['-DA=1', '-DB=2']);
});

test('the CUDA include dirs come from CUDA_HOME, with cccl/ when the toolkit has it', () => {
  const root = tempDir('tsep-cuda-');
  mkdirSync(join(root, 'include', 'cccl'), { recursive: true });
  writeFileSync(join(root, 'include', 'cuda_runtime.h'), '');
  assert.deepEqual(cudaIncludeDirs({ CUDA_HOME: root }), [
    join(root, 'include'),
    join(root, 'include', 'cccl'),
  ]);
});

test('the link target is the arch, with the accelerated-feature bit for "a" targets', () => {
  assert.equal(jitTarget('sm_90'), 90);
  assert.equal(jitTarget('sm_90a'), 0x10000 + 90);
  assert.equal(jitTarget('sm_100a'), 0x10000 + 100);
  assert.throws(() => jitTarget('compute_90'), ValidationError);
});
