// Which machine a process runs on, for telling ranks on one machine from ranks on others.

import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';

let id: string | undefined;

/**
 * The host name plus this boot's id (as NCCL tells hosts apart): two containers with the same fixed host
 * name on different machines differ, and processes of one machine agree.
 */
export function machineId(): string {
  if (id === undefined) {
    let boot = '';
    try {
      boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      // Not Linux, or no /proc: the host name alone.
    }
    id = boot ? `${hostname()}/${boot}` : hostname();
  }
  return id;
}
