// `tsep doctor`: what tsep finds on this machine (Node, koffi, driver, NVRTC, NCCL, NVSHMEM, GPUs, peer
// access) and what it will use. Exits 0 on a machine without a GPU: that is a valid setup (the CPU backend).

import type { Command } from 'commander';
import { Device } from '../device/context.ts';
import { chooseTransport, type TransportChoice } from '../ep/transport.ts';
import { cacheDir } from '../jit/cache.ts';
import { archFor } from '../jit/compile.ts';
import { driverPath } from '../native/cuda.ts';
import { koffiVersion } from '../native/loader.ts';
import { ncclPath, ncclVersion } from '../native/nccl.ts';
import { nvrtcPath, nvrtcVersion } from '../native/nvrtc.ts';
import { nvshmemInstall, nvshmemVersion } from '../native/nvshmem.ts';

interface Probe<T> {
  ok: boolean;
  value?: T;
  error?: string;
}

function probe<T>(f: () => T): Probe<T> {
  try {
    return { ok: true, value: f() };
  } catch (e) {
    return { ok: false, error: (e as Error).message };
  }
}

export interface DoctorReport {
  node: string;
  koffi: string;
  driver: Probe<{ path: string; version: string }>;
  nvrtc: Probe<{ path: string; version: string }>;
  nccl: Probe<{ path: string; version: string }>;
  /** The NVSHMEM install transport 'nvshmem' would use (multi-host). */
  nvshmem: Probe<{ path: string; version: string }>;
  gpus: { ordinal: number; name: string; sms: number; cc: string; arch: string; memoryGiB: number }[];
  peerAccess: boolean[][];
  cacheDir: string;
  backend: string;
  /** What `transport: 'auto'` would pick for one rank per visible GPU on this host. */
  transport?: TransportChoice;
}

export function collectDoctorReport(): DoctorReport {
  const driver = probe(() => {
    const [maj, min] = Device.driverVersion();
    return { path: driverPath(), version: `CUDA ${maj}.${min}` };
  });
  const gpus: DoctorReport['gpus'] = [];
  const peerAccess: boolean[][] = [];
  if (driver.ok) {
    const n = probe(() => Device.count());
    for (let i = 0; i < (n.value ?? 0); i++) {
      const d = Device.get(i).info;
      gpus.push({
        ordinal: i,
        name: d.name,
        sms: d.smCount,
        cc: d.computeCapability.join('.'),
        arch: archFor(d.computeCapability),
        memoryGiB: Math.round((d.totalMemory / 2 ** 30) * 10) / 10,
      });
    }
    for (let i = 0; i < gpus.length; i++) {
      peerAccess.push(gpus.map((_, j) => Device.get(i).canAccessPeer(j)));
    }
  }
  return {
    node: process.version,
    koffi: koffiVersion(),
    driver,
    nvrtc: probe(() => ({ path: nvrtcPath(), version: nvrtcVersion().join('.') })),
    nccl: probe(() => ({ path: ncclPath(), version: ncclVersion().join('.') })),
    nvshmem: probe(() => {
      const home = nvshmemInstall().home;
      // Loading the host library needs the CUDA driver; without one the install is still reported.
      const v = probe(() => nvshmemVersion().join('.'));
      return { path: home, version: v.ok ? v.value! : 'found (not loadable here)' };
    }),
    gpus,
    peerAccess,
    cacheDir: cacheDir(),
    backend: gpus.length > 0 ? 'gpu' : 'cpu (no GPU found)',
    ...(gpus.length > 0
      ? {
          transport: chooseTransport('auto', {
            ranks: gpus.length,
            localRanks: gpus.length,
            peerAccess: peerAccess.every((row) => row.every(Boolean)),
          }),
        }
      : {}),
  };
}

function line(name: string, p: Probe<{ path: string; version: string }>): string {
  if (p.ok) return `${name.padEnd(8)} ${p.value!.version}  (${p.value!.path})\n`;
  const first = p.error!.split('\n')[0];
  const rest = p.error!.split('\n').slice(1, 6).join('\n');
  return `${name.padEnd(8)} not found: ${first}\n${rest ? `${rest}\n         ...\n` : ''}`;
}

export function formatDoctorReport(r: DoctorReport): string {
  let s = `node     ${r.node}\nkoffi    ${r.koffi}\n`;
  s += line('driver', r.driver) + line('nvrtc', r.nvrtc) + line('nccl', r.nccl) + line('nvshmem', r.nvshmem);
  if (r.gpus.length === 0) {
    s +=
      'gpus     none: no CUDA driver or no visible GPU (looked for libcuda.so.1 as listed above and CUDA_VISIBLE_DEVICES)\n';
  }
  for (const g of r.gpus) {
    s += `gpu ${g.ordinal}    ${g.name}, ${g.sms} SMs, compute ${g.cc} (${g.arch}), ${g.memoryGiB} GiB\n`;
  }
  if (r.gpus.length > 1) {
    s += 'peer     access matrix (row can reach column):\n';
    s += `         ${r.gpus.map((g) => String(g.ordinal).padStart(3)).join('')}\n`;
    r.peerAccess.forEach((row, i) => {
      s += `         ${String(i).padStart(3)}${row
        .map((ok) => (ok ? '  Y' : '  -'))
        .join('')
        .slice(3)}\n`;
    });
  }
  s += `cache    ${r.cacheDir}\nbackend  ${r.backend}\n`;
  if (r.transport)
    s += `transport ${r.transport.transport} for one rank per GPU here: ${r.transport.reason}\n`;
  return s;
}

export function registerDoctor(program: Command): void {
  program
    .command('doctor')
    .description('report Node, koffi, CUDA driver, NVRTC, NCCL, NVSHMEM, GPUs and the peer-access matrix')
    .option('--json', 'print the report as JSON')
    .action((opts: { json?: boolean }) => {
      const report = collectDoctorReport();
      process.stdout.write(opts.json ? `${JSON.stringify(report, null, 2)}\n` : formatDoctorReport(report));
    });
}
