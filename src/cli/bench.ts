// `tsep bench`: runs one of the bench/ scripts under the launcher, one rank per GPU.

import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Argument, type Command } from 'commander';
import { Device } from '../device/context.ts';
import { launch } from '../dist/launcher.ts';
import { countArg, secondsArg } from './arg-parsers.ts';

/** The benchmarks `tsep bench` knows, each the script bench/<name>.ts. */
export const BENCHES = ['nccl', 'normal', 'low-latency', 'soak'] as const;
export type BenchName = (typeof BENCHES)[number];

const BENCH_DIR = fileURLToPath(new URL('../../bench/', import.meta.url));

/** Options of {@link runBench}; the CLI flags map onto these. */
export interface RunBenchOptions {
  name: BenchName;
  /** Ranks (one per GPU); default: every visible GPU. */
  ranks?: number;
  /** JSON result file (passed to the script as TSEP_BENCH_OUT); default: the script's own choice. */
  out?: string;
  /** Stop the run after this many seconds. */
  timeoutS?: number;
  /** Arguments for the script. */
  args?: readonly string[];
  /** Where the bench scripts live; default: this checkout's bench/. */
  benchDir?: string;
  /** Counts visible GPUs; default Device.count(). Throws when there is no usable driver. */
  gpuCount?: () => number;
  /** Where messages go; default process.stderr. */
  say?: (text: string) => void;
  /** Where a script's usage goes (`-- --help`); default process.stdout. */
  print?: (text: string) => void;
}

/**
 * Runs bench/<name>.ts with `args` under `tsep launch`, one rank per GPU, and resolves to the exit code for
 * the `tsep` process. Says why and returns 1 when the script is missing, no GPU is visible, or more ranks
 * are asked for than there are GPUs. With `--help` (or `-h`) among `args` it prints the script's usage (its
 * header comment) instead, GPUs or not.
 */
export async function runBench(options: RunBenchOptions): Promise<number> {
  const say = options.say ?? ((text: string) => void process.stderr.write(`tsep bench: ${text}\n`));
  const dir = options.benchDir ?? BENCH_DIR;
  const script = resolve(dir, `${options.name}.ts`);
  if (!existsSync(script)) {
    const have = existsSync(dir)
      ? readdirSync(dir)
          .filter((f) => f.endsWith('.ts') && BENCHES.includes(f.slice(0, -3) as BenchName))
          .map((f) => f.slice(0, -3))
      : [];
    say(
      `the '${options.name}' benchmark does not exist yet: there is no ${script}. ` +
        (have.length > 0
          ? `Benchmarks present: ${have.join(', ')}.`
          : 'The bench/ scripts ship with a source checkout of tsep, not with the npm package.'),
    );
    return 1;
  }

  if (options.args?.some((a) => a === '--help' || a === '-h')) {
    (options.print ?? ((text: string) => void process.stdout.write(text)))(scriptUsage(script));
    return 0;
  }

  let gpus: number;
  try {
    gpus = (options.gpuCount ?? Device.count)();
  } catch (e) {
    say(
      `benchmarks need GPUs, and none is usable here: ${(e as Error).message.split('\n')[0]!.replace(/\s*Searched:$/, '')} ` +
        '(`tsep doctor` shows what was looked for).',
    );
    return 1;
  }
  if (gpus < 1) {
    say(
      'benchmarks need GPUs, and no GPU is visible (cuDeviceGetCount returned 0; check CUDA_VISIBLE_DEVICES).',
    );
    return 1;
  }
  const ranks = options.ranks ?? gpus;
  if (ranks > gpus) {
    say(`-n ${ranks} asks for ${ranks} ranks, one per GPU, but only ${gpus} GPU(s) are visible.`);
    return 1;
  }

  say(
    `running bench/${options.name}.ts on ${ranks} rank(s)${options.ranks === undefined ? ' (every visible GPU)' : ''}`,
  );
  const env: NodeJS.ProcessEnv = { ...process.env };
  if (options.out !== undefined) env.TSEP_BENCH_OUT = resolve(options.out);
  const result = await launch({
    nprocPerNode: ranks,
    command: process.execPath,
    args: [script, ...(options.args ?? [])],
    env,
    ...(options.timeoutS !== undefined ? { timeoutS: options.timeoutS } : {}),
  });
  return result.exitCode;
}

/** A bench script's header comment (its usage and what it measures), without the comment markers. */
function scriptUsage(script: string): string {
  const lines: string[] = [];
  for (const line of readFileSync(script, 'utf8').split('\n')) {
    if (!line.startsWith('//')) break;
    lines.push(line.replace(/^\/\/ ?/, ''));
  }
  return `${lines.join('\n')}\n`;
}

interface BenchFlags {
  nproc?: number;
  out?: string;
  timeout?: number;
}

/** Adds the `bench` subcommand to `program`. */
export function registerBench(program: Command): void {
  program
    .command('bench')
    .summary('run a benchmark (nccl, normal, low-latency, soak) under tsep launch, one rank per GPU')
    .description(
      'Run a benchmark from bench/ under `tsep launch`, one rank per GPU: nccl (NCCL all-to-all bandwidth), ' +
        'normal (normal-mode dispatch/combine), low-latency (low-latency dispatch/combine), soak (alternating ' +
        'round trips checked against the CPU reference). Rank 0 prints a table; the JSON result goes to ' +
        "--out, else $OUT/<name>.json, else bench/out/<name>.json. `-- --help` prints a benchmark's own options.",
    )
    .addArgument(new Argument('<name>', 'which benchmark').choices(BENCHES))
    .argument('[args...]', "the benchmark's own arguments (after `--` they pass through untouched)")
    .option('-n, --nproc <ranks>', 'ranks to run, one per GPU (default: every visible GPU)', countArg)
    .option('--out <file>', 'write the JSON result to this file')
    .option('--timeout <seconds>', 'stop the run after this many seconds (exit code 124)', secondsArg)
    // Flags tsep bench does not know (e.g. --iters 50) go to the script; `--` passes even -n/--out/--timeout.
    .allowUnknownOption()
    .addHelpText(
      'after',
      '\nExamples:\n  tsep bench nccl\n  tsep bench nccl -n 2 --out nccl-2.json --sizes 64,256 --iters 50\n' +
        "  tsep bench normal -- --help    (the benchmark's own options; needs no GPU)",
    )
    .action(async (name: BenchName, args: string[], flags: BenchFlags) => {
      process.exitCode = await runBench({
        name,
        args,
        ...(flags.nproc !== undefined ? { ranks: flags.nproc } : {}),
        ...(flags.out !== undefined ? { out: flags.out } : {}),
        ...(flags.timeout !== undefined ? { timeoutS: flags.timeout } : {}),
      });
    });
}
