import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LibraryNotFoundError } from '../../src/errors.ts';
import { CUDA_DRIVER, candidatePaths, loadLibrary, NCCL, NVRTC } from '../../src/native/loader.ts';
import { tempDir } from './helpers/temp.ts';

test('an env override is the only candidate', () => {
  const paths = candidatePaths(NVRTC, { TSEP_NVRTC_LIB: '/opt/x/libnvrtc.so.13' });
  assert.deepEqual(paths, ['/opt/x/libnvrtc.so.13']);
});

test('search order: sonames, CUDA_HOME, /usr/local/cuda, system dirs', () => {
  const paths = candidatePaths(NVRTC, { CUDA_HOME: '/my/cuda' });
  assert.equal(paths[0], 'libnvrtc.so.13');
  const home = paths.indexOf('/my/cuda/lib64/libnvrtc.so.13');
  const local = paths.indexOf('/usr/local/cuda/lib64/libnvrtc.so.13');
  const sys = paths.indexOf('/usr/lib/x86_64-linux-gnu/libnvrtc.so.13');
  assert.ok(home > 0 && local > home && sys > local, `order ${home} ${local} ${sys}`);
  assert.ok(candidatePaths(NCCL, {}).includes('/usr/lib/x86_64-linux-gnu/libnccl.so.2'));
  assert.ok(candidatePaths(CUDA_DRIVER, {}).includes('/usr/local/nvidia/lib64/libcuda.so.1'));
});

test('a library that cannot load raises LibraryNotFoundError listing every place searched', () => {
  const dir = tempDir('tsep-lib-');
  const fake = join(dir, 'libfake.so');
  writeFileSync(fake, 'not an ELF file');
  const spec = {
    name: 'libfake',
    envVar: 'TSEP_FAKE_LIB',
    sonames: ['libtsep-does-not-exist.so.9'],
    cudaSubdirs: ['lib64'],
    wheelPackages: [],
    extraDirs: [dir],
  };
  assert.throws(
    () => loadLibrary(spec),
    (e: unknown) =>
      e instanceof LibraryNotFoundError &&
      e.code === 'TSEP_LIBRARY_NOT_FOUND' &&
      e.searched.includes('libtsep-does-not-exist.so.9') &&
      e.searched.includes('/usr/local/cuda/lib64/libtsep-does-not-exist.so.9') &&
      /TSEP_FAKE_LIB/.test(e.message),
  );
  process.env.TSEP_FAKE_LIB = fake;
  try {
    assert.throws(
      () => loadLibrary(spec),
      (e: unknown) =>
        e instanceof LibraryNotFoundError && e.searched.length === 1 && e.message.includes(fake),
    );
  } finally {
    delete process.env.TSEP_FAKE_LIB;
  }
});
