// The small process `tsep launch` puts between itself and each rank's command, because Node cannot ask
// the kernel to kill a child when its parent dies (no prctl(PR_SET_PDEATHSIG)). It:
//  - starts the command in a new process group (so the group holds the rank and everything it spawns),
//  - forwards SIGINT/SIGTERM/SIGHUP from the launcher to that group,
//  - watches fd 3, a socket whose other end only the launcher holds: when it closes, the launcher is gone
//    (even by SIGKILL), so the group gets SIGTERM and, after the grace period, SIGKILL,
//  - when the command exits, SIGKILLs what is left of its group and reports the status on fd 3.
// Usage (launcher only): node rank-wrapper.ts <graceMs> <command> [args...]
// fd 3 messages, one JSON object per line: {"pid":N} once started, then {"code":C,"signal":S}, with an
// "error" field (and code 127) when the command could not start.

import { spawn } from 'node:child_process';
import { Socket } from 'node:net';
import { constants } from 'node:os';

const [graceArg, command, ...args] = process.argv.slice(2);
const graceMs = Number(graceArg);

const control = new Socket({ fd: 3, readable: true, writable: true });
control.on('error', () => {});

function report(message: object): void {
  if (!control.destroyed) control.write(`${JSON.stringify(message)}\n`);
}

function finish(code: number): void {
  if (control.destroyed) process.exit(code);
  control.end(() => process.exit(code));
}

const child = spawn(command!, args, { stdio: ['ignore', 'inherit', 'inherit'], detached: true });
let running = child.pid !== undefined;

function signalGroup(signal: NodeJS.Signals): void {
  try {
    process.kill(-child.pid!, signal);
  } catch {
    // ESRCH: the group is already empty.
  }
}

for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(signal, () => {
    if (running) signalGroup(signal);
  });
}

child.on('spawn', () => report({ pid: child.pid }));
child.on('error', (err) => {
  running = false;
  report({ code: 127, signal: null, error: err.message });
  finish(127);
});
child.on('exit', (code, signal) => {
  running = false;
  signalGroup('SIGKILL');
  report({ code, signal });
  finish(code ?? 128 + (signal ? constants.signals[signal] : 0));
});

control.on('close', () => {
  if (!running) return;
  signalGroup('SIGTERM');
  setTimeout(() => signalGroup('SIGKILL'), graceMs);
});
control.resume();
