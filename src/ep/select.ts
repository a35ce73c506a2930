// Backend selection: the one place that decides which backend serves an EpBuffer.

import { cpuBackendFactory } from '../cpu/backend.ts';
import { Device } from '../device/context.ts';
import type { Group } from '../dist/group.ts';
import { LocalGroup } from '../dist/local-group.ts';
import { TsepError } from '../errors.ts';
import { gpuBackendFactory } from './gpu/backend.ts';
import type { BackendKind, EpBackendFactory } from './types.ts';

/** Why the GPU backend cannot serve this group, or undefined when it can. */
export function gpuUnavailableReason(group: Group): string | undefined {
  if (group instanceof LocalGroup) {
    return 'the group simulates its ranks inside one process (LocalGroup); the GPU backend needs one process per GPU (tsep launch)';
  }
  try {
    if (Device.count() === 0) return 'no GPU is visible';
  } catch (e) {
    return (e as Error).message.split('\n')[0];
  }
  return undefined;
}

export async function selectBackend(requested: BackendKind, group: Group): Promise<EpBackendFactory> {
  if (requested === 'cpu') return cpuBackendFactory;
  const reason = gpuUnavailableReason(group);
  if (requested === 'gpu' && reason !== undefined) {
    throw new TsepError(
      'TSEP_NO_GPU',
      `The GPU backend cannot be used: ${reason}. Use backend: 'cpu' or 'auto'.`,
    );
  }
  return reason === undefined ? gpuBackendFactory : cpuBackendFactory;
}
