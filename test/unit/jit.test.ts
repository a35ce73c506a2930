import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { ValidationError } from '../../src/errors.ts';
import { cacheKey, cachePath, readCached, writeCached } from '../../src/jit/cache.ts';
import { archFor } from '../../src/jit/compile.ts';
import { kernelsDir, readKernelSource } from '../../src/jit/sources.ts';
import { tempDir } from './helpers/temp.ts';

const base = {
  source: 'k',
  headers: { 'a.cuh': 'A' },
  options: ['-DX=1'],
  compiler: 'nvrtc 13.0',
  arch: 'sm_90a',
};

test('the cache key changes with every input that changes the cubin', () => {
  const k = cacheKey(base);
  assert.match(k, /^[0-9a-f]{64}$/);
  assert.equal(cacheKey({ ...base }), k, 'deterministic');
  for (const variant of [
    { ...base, source: 'k2' },
    { ...base, headers: { 'a.cuh': 'B' } },
    { ...base, headers: { 'b.cuh': 'A' } },
    { ...base, options: ['-DX=2'] },
    { ...base, compiler: 'nvrtc 13.1' },
    { ...base, arch: 'sm_100' },
  ]) {
    assert.notEqual(cacheKey(variant), k, JSON.stringify(variant));
  }
  // Field boundaries are length-prefixed: moving text between fields changes the key.
  assert.notEqual(
    cacheKey({ ...base, source: 'ab', options: ['c'] }),
    cacheKey({ ...base, source: 'a', options: ['bc'] }),
  );
});

test('the disk cache stores and returns cubins; missing keys return undefined', () => {
  process.env.TSEP_CACHE_DIR = tempDir('tsep-cache-');
  const key = cacheKey(base);
  assert.equal(readCached(key), undefined);
  const cubin = Uint8Array.from({ length: 1000 }, (_, i) => (i * 7) & 0xff);
  writeCached(key, cubin);
  assert.deepEqual(readCached(key), cubin);
  assert.deepEqual(
    readdirSync(process.env.TSEP_CACHE_DIR).filter((f) => f.endsWith('.tmp')),
    [],
    'no temp files left',
  );
});

test('concurrent writers of one key never leave a torn file', async () => {
  const dir = tempDir('tsep-cache-');
  const key = 'f'.repeat(64);
  const payload = 4 << 20;
  const script = `
    const { writeCached } = await import(${JSON.stringify(new URL('../../src/jit/cache.ts', import.meta.url).href)});
    const n = ${payload}; const b = new Uint8Array(n); for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
    for (let r = 0; r < 20; r++) writeCached('${key}', b);`;
  const runs = Array.from(
    { length: 4 },
    () =>
      new Promise<number>((resolve) => {
        const p = spawn(process.execPath, ['--input-type=module', '-e', script], {
          env: { ...process.env, TSEP_CACHE_DIR: dir },
          stdio: 'inherit',
        });
        p.on('exit', (code) => resolve(code ?? -1));
      }),
  );
  // Read while they write: every read sees either nothing or the whole file, and some reads see it.
  let whole = 0;
  const torn: number[] = [];
  const reader = setInterval(() => {
    process.env.TSEP_CACHE_DIR = dir;
    const got = readCached(key);
    if (!got) return;
    if (got.length === payload && got[4099] === ((4099 * 31 + 7) & 0xff)) whole++;
    else torn.push(got.length);
  }, 5);
  const codes = await Promise.all(runs);
  clearInterval(reader);
  assert.deepEqual(codes, [0, 0, 0, 0]);
  assert.deepEqual(torn, [], 'torn reads (their lengths)');
  assert.ok(whole > 0, 'no read overlapped the writes, so nothing was checked');
  process.env.TSEP_CACHE_DIR = dir;
  const final = readFileSync(cachePath(key));
  assert.equal(final.length, payload);
  for (let i = 0; i < payload; i += 4099) assert.equal(final[i], (i * 31 + 7) & 0xff);
});

test('kernel sources are read with their quoted includes, recursively', () => {
  const dir = tempDir('tsep-kernels-');
  mkdirSync(join(dir, 'sub'));
  writeFileSync(join(dir, 'main.cu'), '#include "a.cuh"\n#include <stdint.h>\nint main_k;');
  writeFileSync(join(dir, 'a.cuh'), '#pragma once\n#include "sub/b.cuh"\nint a;');
  writeFileSync(join(dir, 'sub/b.cuh'), '#include "a.cuh"\nint b;');
  const src = readKernelSource('main.cu', dir);
  assert.deepEqual(Object.keys(src.headers).sort(), ['a.cuh', 'sub/b.cuh']);
  assert.match(src.headers['sub/b.cuh']!, /int b;/);
  assert.throws(() => readKernelSource('nope.cu', dir), ValidationError);
  writeFileSync(join(dir, 'bad.cu'), '#include "missing.cuh"\n');
  assert.throws(() => readKernelSource('bad.cu', dir), /missing\.cuh/);
});

test('the package kernels are found and carry their shared header', () => {
  const src = readKernelSource('smoke.cu', kernelsDir());
  assert.ok('common.cuh' in src.headers);
});

test('compile target per compute capability', () => {
  assert.equal(archFor([9, 0]), 'sm_90a');
  assert.equal(archFor([8, 0]), 'sm_80');
  assert.equal(archFor([10, 0]), 'sm_100');
});
