// The GPU backend: one process per GPU. It picks the transport (NVLink peer stores between the GPUs of a
// host, or NCCL) and composes the normal path and the low-latency path of that transport (each owns its
// communication memory), as the buffer's `mode` asks.

import type { Stream } from '../../device/stream.ts';
import type { TensorMeta } from '../../device/tensor.ts';
import { TsepError } from '../../errors.ts';
import { chooseTransport, type TransportChoice } from '../transport.ts';
import type {
  BackendContext,
  CombineRequest,
  CombineResult,
  DispatchLayout,
  DispatchRequest,
  DispatchResult,
  EpBackend,
  EpBackendFactory,
  EpSizeHint,
  LowLatencyCombineRequest,
  LowLatencyCombineResult,
  LowLatencyDispatchRequest,
  LowLatencyDispatchResult,
  Tensor,
} from '../types.ts';
import { releaseEvents } from './event.ts';
import { HierNormalPath } from './hier-normal.ts';
import { createLowLatencyMode, type LowLatencyMode } from './ll-mode.ts';
import { LowLatencyPath } from './low-latency.ts';
import { NcclNormalPath } from './nccl-normal.ts';
import { NormalPath } from './normal.ts';
import { joinNvshmem } from './nvshmem-engine.ts';
import { GpuRuntime } from './runtime.ts';
import { probeTransportFacts } from './transport-probe.ts';

/** What the backend needs of a normal-mode implementation (NVLink or NCCL). */
type NormalMode = Pick<
  NormalPath,
  'layout' | 'dispatch' | 'combine' | 'reset' | 'abortTransfers' | 'bytes' | 'destroy' | 'numSms'
>;

export const gpuBackendFactory: EpBackendFactory = {
  name: 'gpu',
  create: (context) => GpuBackend.create(context),
};

class GpuBackend implements EpBackend {
  readonly name = 'gpu';
  private readonly rt: GpuRuntime;
  /** The transport in use and why it was chosen. */
  readonly transport: TransportChoice;
  private readonly normal: NormalMode | undefined;
  private readonly lowLatency: LowLatencyMode | undefined;

  private constructor(
    rt: GpuRuntime,
    transport: TransportChoice,
    normal: NormalMode | undefined,
    lowLatency: LowLatencyMode | undefined,
  ) {
    this.rt = rt;
    this.transport = transport;
    this.normal = normal;
    this.lowLatency = lowLatency;
  }

  static async create(context: BackendContext): Promise<GpuBackend> {
    const rt = GpuRuntime.create(context);
    let transport: TransportChoice;
    try {
      transport = chooseTransport(
        context.options.transport,
        await probeTransportFacts(rt, context.options.transport),
      );
    } catch (e) {
      rt.stream.dispose(); // a refused transport is an ordinary, catchable error: leave nothing behind
      throw e;
    }
    const mode = context.options.mode;
    if (transport.transport === 'nvshmem') {
      // NVSHMEM sizes its symmetric heap when the process joins: room for both modes' buffers at once.
      const need =
        (mode === 'low-latency' ? 0 : HierNormalPath.heapBytes(rt)) +
        (mode === 'normal' ? 0 : LowLatencyPath.heapBytes(rt));
      await joinNvshmem(rt.group, rt.device, need);
    }
    const normalImpl = { nccl: NcclNormalPath, nvshmem: HierNormalPath, nvlink: NormalPath }[
      transport.transport
    ];
    const normal = mode === 'low-latency' ? undefined : await normalImpl.create(rt);
    const lowLatency =
      mode === 'normal' ? undefined : await createLowLatencyMode(rt, transport.transport, context.owner);
    return new GpuBackend(rt, transport, normal, lowLatency);
  }

  private lowLatencyPath(call: string): LowLatencyMode {
    if (!this.lowLatency) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `${call} needs a buffer created with mode 'low-latency' or 'both'.`,
      );
    }
    this.rt.device.makeCurrent(); // the caller may have made another GPU current
    return this.lowLatency;
  }

  private normalPath(call: string): NormalMode {
    if (!this.normal) {
      throw new TsepError('TSEP_UNSUPPORTED', `${call} needs a buffer created with mode 'normal' or 'both'.`);
    }
    this.rt.device.makeCurrent(); // the caller may have made another GPU current
    return this.normal;
  }

  getDispatchLayout(topkIdx: Tensor): DispatchLayout {
    return this.normalPath('getDispatchLayout').layout(topkIdx);
  }

  dispatch(request: DispatchRequest): Promise<DispatchResult> {
    return this.normalPath('dispatch').dispatch(request);
  }

  combine(request: CombineRequest): Promise<CombineResult> {
    return this.normalPath('combine').combine(request);
  }

  lowLatencyDispatch(request: LowLatencyDispatchRequest): LowLatencyDispatchResult {
    return this.lowLatencyPath('lowLatencyDispatch').dispatch(request);
  }

  lowLatencyCombine(request: LowLatencyCombineRequest): LowLatencyCombineResult {
    return this.lowLatencyPath('lowLatencyCombine').combine(request);
  }

  cleanLowLatencyBuffer(): void {
    this.lowLatency?.clean();
  }

  get stream(): Stream {
    return this.rt.stream;
  }

  async reset(): Promise<void> {
    this.rt.device.makeCurrent();
    // Over NCCL both paths' communicators are aborted before either path waits for the stream: a transfer
    // stuck in one would otherwise hold up the other's work and that path's reset would time out.
    this.normal?.abortTransfers();
    this.lowLatency?.abortTransfers();
    await this.normal?.reset();
    await this.lowLatency?.reset();
    await this.rt.stream.synchronize();
  }

  phaseTimes(): Promise<Record<string, number> | undefined> {
    return this.rt.phaseTimes();
  }

  checkTensor(argument: string, t: TensorMeta, strided: boolean): void {
    this.rt.onDevice(argument, t, { strided });
  }

  setNumSms(n: number): void {
    if (this.normal) this.normal.numSms = n;
  }

  sizeHint(): EpSizeHint {
    return { normalBytes: this.normal?.bytes() ?? 0, lowLatencyBytes: this.lowLatency?.bytes() ?? 0 };
  }

  async destroy(): Promise<void> {
    this.rt.device.makeCurrent();
    await this.normal?.destroy();
    await this.lowLatency?.destroy();
    releaseEvents(this.rt.stream);
    this.rt.stream.dispose();
  }
}
