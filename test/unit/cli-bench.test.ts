// `tsep bench` before it launches anything: the usage of a script, and the refusals that need no GPU.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BENCHES, runBench } from '../../src/cli/bench.ts';
import { tempDir } from './helpers/temp.ts';

/** runBench with its messages captured and no GPU visible. */
async function run(options: Omit<Parameters<typeof runBench>[0], 'say' | 'print'>, gpus = 0) {
  const said: string[] = [];
  const printed: string[] = [];
  const code = await runBench({
    gpuCount: () => gpus,
    ...options,
    say: (t) => said.push(t),
    print: (t) => printed.push(t),
  });
  return { code, said: said.join('\n'), printed: printed.join('') };
}

describe('tsep bench', () => {
  it('-- --help prints each benchmark script’s header (its options) and exits 0 without GPUs', async () => {
    for (const name of BENCHES) {
      const r = await run({ name, args: ['--help'] });
      assert.equal(r.code, 0, name);
      assert.match(r.printed, new RegExp(`tsep bench ${name} \\[-n R\\]`), name);
      assert.doesNotMatch(r.printed, /^\/\//m, `${name}: comment markers stripped`);
      assert.equal(r.said, '', name);
    }
  });

  it('refuses, saying why, without GPUs, with more ranks than GPUs, or without the script', async () => {
    const none = await run({ name: 'normal', args: ['--iters', '5'] });
    assert.equal(none.code, 1);
    assert.match(none.said, /benchmarks need GPUs, and no GPU is visible/);
    const tooMany = await run({ name: 'low-latency', ranks: 4 }, 2);
    assert.equal(tooMany.code, 1);
    assert.match(tooMany.said, /-n 4 asks for 4 ranks, one per GPU, but only 2 GPU\(s\) are visible/);
    const missing = await run({ name: 'soak', benchDir: tempDir('tsep-bench-') });
    assert.equal(missing.code, 1);
    assert.match(missing.said, /the 'soak' benchmark does not exist yet: there is no .*soak\.ts/);
  });
});
