// Backend selection: the one place that decides which backend serves an EpBuffer.

import { cpuBackendFactory } from '../cpu/backend.ts';
import { TsepError } from '../errors.ts';
import type { BackendKind, EpBackendFactory } from './types.ts';

export async function selectBackend(requested: BackendKind): Promise<EpBackendFactory> {
  if (requested === 'cpu') return cpuBackendFactory;
  // GPU BACKEND GOES HERE: once it exists, return it for 'gpu', and for 'auto' when a GPU is present.
  if (requested === 'gpu') {
    throw new TsepError(
      'TSEP_NO_GPU',
      "The GPU backend is not available in this build of tsep; use backend: 'cpu' or 'auto' (which falls back to the CPU backend).",
    );
  }
  return cpuBackendFactory;
}
