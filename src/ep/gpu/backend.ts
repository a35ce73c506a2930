// The GPU backend: one process per GPU, NVLink between the GPUs of a host. It composes the normal path
// and the low-latency path (each owns its symmetric buffer), as the buffer's `mode` asks.

import type { Stream } from '../../device/stream.ts';
import { TsepError } from '../../errors.ts';
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
import { LowLatencyPath } from './low-latency.ts';
import { NormalPath } from './normal.ts';
import { GpuRuntime } from './runtime.ts';

export const gpuBackendFactory: EpBackendFactory = {
  name: 'gpu',
  create: (context) => GpuBackend.create(context),
};

class GpuBackend implements EpBackend {
  readonly name = 'gpu';
  private readonly rt: GpuRuntime;
  private readonly normal: NormalPath | undefined;
  private readonly lowLatency: LowLatencyPath | undefined;

  private constructor(
    rt: GpuRuntime,
    normal: NormalPath | undefined,
    lowLatency: LowLatencyPath | undefined,
  ) {
    this.rt = rt;
    this.normal = normal;
    this.lowLatency = lowLatency;
  }

  static async create(context: BackendContext): Promise<GpuBackend> {
    const rt = GpuRuntime.create(context);
    const mode = context.options.mode;
    const normal = mode === 'low-latency' ? undefined : await NormalPath.create(rt);
    const lowLatency = mode === 'normal' ? undefined : await LowLatencyPath.create(rt, context.owner);
    return new GpuBackend(rt, normal, lowLatency);
  }

  private lowLatencyPath(call: string): LowLatencyPath {
    if (!this.lowLatency) {
      throw new TsepError(
        'TSEP_UNSUPPORTED',
        `${call} needs a buffer created with mode 'low-latency' or 'both'.`,
      );
    }
    return this.lowLatency;
  }

  private normalPath(call: string): NormalPath {
    if (!this.normal) {
      throw new TsepError('TSEP_UNSUPPORTED', `${call} needs a buffer created with mode 'normal' or 'both'.`);
    }
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
    await this.normal?.reset();
    this.lowLatency?.clean();
    await this.rt.stream.synchronize();
  }

  phaseTimes(): Promise<Record<string, number> | undefined> {
    return this.rt.phaseTimes();
  }

  setNumSms(n: number): void {
    if (this.normal) this.normal.numSms = n;
  }

  sizeHint(): EpSizeHint {
    return { normalBytes: this.normal?.bytes() ?? 0, lowLatencyBytes: this.lowLatency?.bytes() ?? 0 };
  }

  async destroy(): Promise<void> {
    await this.normal?.destroy();
    await this.lowLatency?.destroy();
    releaseEvents(this.rt.stream);
    this.rt.stream.dispose();
  }
}
