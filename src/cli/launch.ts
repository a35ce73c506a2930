// `tsep launch`: the command-line face of dist/launcher.ts.

import type { Command } from 'commander';
import { launch } from '../dist/launcher.ts';
import { countArg, integerArg, secondsArg } from './arg-parsers.ts';

interface LaunchFlags {
  nprocPerNode: number;
  nnodes: number;
  nodeRank: number;
  masterAddr?: string;
  masterPort?: number;
  timeout?: number;
}

/** Adds the `launch` subcommand to `program`. */
export function registerLaunch(program: Command): void {
  program
    .command('launch')
    .description(
      'Start N ranks of a command on this node with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, ' +
        'MASTER_ADDR and MASTER_PORT set (as torchrun does), host the TCP store on node 0, prefix each ' +
        'output line with its rank, and stop every rank when one fails.',
    )
    .requiredOption('-n, --nproc-per-node <count>', 'ranks to start on this node', countArg)
    .option('--nnodes <count>', 'nodes in the job', countArg, 1)
    .option(
      '--node-rank <index>',
      "this node's index, 0 to nnodes-1 (node 0 hosts the store)",
      integerArg(0, 1 << 20),
      0,
    )
    .option('--master-addr <host>', 'address of node 0 that every rank dials (default 127.0.0.1)')
    .option(
      '--master-port <port>',
      'TCP port of the store (default: a free port; required with --nnodes > 1)',
      integerArg(1, 65535),
    )
    .option('--timeout <seconds>', 'stop the whole job after this many seconds (exit code 124)', secondsArg)
    .argument('<command>', 'program each rank runs (put `--` before it)')
    .argument('[args...]', 'its arguments')
    .addHelpText('after', '\nExample:\n  tsep launch -n 4 -- node train.ts --steps 100')
    .action(async (command: string, args: string[], flags: LaunchFlags) => {
      const result = await launch({
        nprocPerNode: flags.nprocPerNode,
        nnodes: flags.nnodes,
        nodeRank: flags.nodeRank,
        ...(flags.masterAddr !== undefined ? { masterAddr: flags.masterAddr } : {}),
        ...(flags.masterPort !== undefined ? { masterPort: flags.masterPort } : {}),
        ...(flags.timeout !== undefined ? { timeoutS: flags.timeout } : {}),
        command,
        args,
      });
      process.exitCode = result.exitCode;
    });
}
