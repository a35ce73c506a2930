#!/usr/bin/env node
// The `tsep` command. Each subcommand lives in its own module and registers itself here.

import { Command } from 'commander';
import { TsepError } from '../errors.ts';
import { registerBench } from './bench.ts';
import { registerDemo } from './demo.ts';
import { registerDoctor } from './doctor.ts';
import { registerLaunch } from './launch.ts';

const program = new Command('tsep')
  .description('Mixture-of-Experts expert-parallel dispatch and combine for Node.js')
  .showHelpAfterError();

registerBench(program);
registerDemo(program);
registerDoctor(program);
registerLaunch(program);

try {
  await program.parseAsync(process.argv);
} catch (e) {
  // Library errors carry a message written for the user; print it without a stack unless debugging.
  if (e instanceof TsepError && process.env.TSEP_DEBUG !== '1') {
    process.stderr.write(`tsep: ${e.message}\n`);
    process.exitCode = 1;
  } else {
    throw e;
  }
}
