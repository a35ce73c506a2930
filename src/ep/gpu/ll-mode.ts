// The low-latency mode behind one interface whatever the transport: the NVLink path (peer stores between
// the GPUs of one host, low-latency.ts; with 'nvshmem', the same kernels reach other hosts through NVSHMEM)
// or the NCCL path (collectives, any topology, nccl-low-latency.ts).
// The backend, the GPU tests and the benchmark create it here.

import type {
  ChosenTransport,
  HandleOwner,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
} from '../types.ts';
import type { LlGrids } from './ll-call.ts';
import { LowLatencyPath } from './low-latency.ts';
import { NcclLowLatencyPath } from './nccl-low-latency.ts';
import type { GpuRuntime } from './runtime.ts';

/** What the backend, tests and benchmarks use of a low-latency path. */
export interface LowLatencyMode {
  readonly rt: GpuRuntime;
  /** Launch shapes; benchmarks may change them between calls. */
  readonly tuning: LlGrids;
  dispatch(req: LowLatencyDispatchRequest): LowLatencyDispatchResult;
  combine(req: LowLatencyCombineRequest): LowLatencyCombineResult;
  /** Enqueued, collective: clears the state a timeout left (NVLink); says to reset() over NCCL. */
  clean(): void;
  /** Collective: makes the path usable after a timeout (the backend waits for the stream afterwards). */
  reset(): Promise<void>;
  /** Ends any transfer still waiting for a peer (NCCL: aborts the communicator; reset() joins a new one). */
  abortTransfers(): void;
  /** Collective, for benchmarks: a spin of `spinNs`, then the ranks line up on the device. */
  gate(spinNs?: number): void;
  /** Fills every output allocated so far with `byte` (stream-ordered): tests poison outputs. */
  fillOutputs(byte: number): void;
  /** The reported timeout, as an EpTimeoutError's message; undefined if none. */
  deviceError(): string | undefined;
  /** Communication memory of this rank. */
  bytes(): number;
  /** Output rings allocated so far. */
  outputBytes(): number;
  destroy(): Promise<void>;
}

/** Collective: the low-latency path of `transport` for the runtime's buffer shape. */
export function createLowLatencyMode(
  rt: GpuRuntime,
  transport: ChosenTransport,
  owner?: HandleOwner,
): Promise<LowLatencyMode> {
  if (transport === 'nccl') return NcclLowLatencyPath.create(rt, owner);
  return LowLatencyPath.create(rt, owner, transport === 'nvshmem');
}
