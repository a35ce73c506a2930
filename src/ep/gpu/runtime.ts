// What both GPU paths (normal and low-latency) share: the rank's device, its communication stream, the
// group, the buffer options, kernel loading, and ordering against the caller's events.

import { Device } from '../../device/context.ts';
import { DeviceTensor } from '../../device/device-tensor.ts';
import type { Module } from '../../device/module.ts';
import { Event, Stream } from '../../device/stream.ts';
import type { TensorMeta } from '../../device/tensor.ts';
import { describe } from '../../device/tensor.ts';
import type { Group } from '../../dist/group.ts';
import { ValidationError } from '../../errors.ts';
import { type Define, loadKernelModule } from '../../jit/compile.ts';
import type { BackendContext, EpEvent, HandleOwner, ResolvedEpBufferOptions } from '../types.ts';
import { GpuEvent, type GpuEventOptions } from './event.ts';

export class GpuRuntime {
  readonly group: Group;
  readonly options: ResolvedEpBufferOptions;
  /** Put into every handle this backend makes. */
  readonly owner: HandleOwner;
  readonly device: Device;
  /** High-priority stream every tsep kernel of this buffer runs on. */
  readonly stream: Stream;

  private constructor(context: BackendContext, device: Device) {
    this.group = context.group;
    this.options = context.options;
    this.owner = context.owner;
    this.device = device;
    this.stream = Stream.create(device, { priority: 'high' });
  }

  /** The GPU of this rank: LOCAL_RANK-th visible GPU (modulo the count, so one GPU per process also works). */
  static create(context: BackendContext): GpuRuntime {
    const n = Device.count();
    return new GpuRuntime(context, Device.get(context.group.localRank % n));
  }

  get smCount(): number {
    return this.device.info.smCount;
  }

  kernels(file: string, defines: Record<string, Define> = {}): Promise<Module> {
    return loadKernelModule(this.device, file, defines);
  }

  /** Orders the next work on the communication stream after `previous` (a GpuEvent of any stream). */
  after(previous: EpEvent | undefined): void {
    if (previous === undefined) return;
    if (!(previous instanceof GpuEvent)) {
      throw new ValidationError(
        'previousEvent',
        'an event from another backend',
        'an event returned by a GPU EpBuffer call',
      );
    }
    previous.streamWait(this.stream);
  }

  /**
   * With TSEP_PROFILE=1, timing events between the kernels of the latest call, so `phaseTimes()` can say
   * where a call's device time went. `markStart` opens a call, `mark` closes one of its phases.
   */
  private readonly profiling = process.env.TSEP_PROFILE === '1';
  private marks: { phase: string; event: Event }[] = [];

  markStart(): void {
    if (!this.profiling) return;
    for (const m of this.marks) m.event.dispose();
    this.marks = [];
    this.mark('start');
  }

  mark(phase: string): void {
    if (this.profiling)
      this.marks.push({ phase, event: Event.create(this.device, { timing: true }).record(this.stream) });
  }

  /** Milliseconds of each phase of the latest profiled call (undefined unless TSEP_PROFILE=1); waits for it. */
  async phaseTimes(): Promise<Record<string, number> | undefined> {
    if (!this.profiling || this.marks.length < 2) return undefined;
    await this.marks[this.marks.length - 1]!.event.synchronize();
    const out: Record<string, number> = {};
    for (let i = 1; i < this.marks.length; i++) {
      const { phase, event } = this.marks[i]!;
      out[phase] = (out[phase] ?? 0) + Event.elapsedMs(this.marks[i - 1]!.event, event);
    }
    return out;
  }

  /** An event after everything enqueued so far on the communication stream. */
  record(options?: GpuEventOptions): GpuEvent {
    return new GpuEvent(this.stream, options);
  }

  /**
   * The device tensor behind an argument, checked to be on this rank's GPU and, unless `strided` (only
   * FP8 scales may have any strides), row-major contiguous, as the kernels read it.
   */
  onDevice(argument: string, t: TensorMeta, options: { strided?: boolean } = {}): DeviceTensor {
    if (!(t instanceof DeviceTensor) || t.device.ordinal !== this.device.ordinal) {
      throw new ValidationError(
        argument,
        describe(t),
        `a DeviceTensor on cuda:${this.device.ordinal} (this rank's GPU)`,
      );
    }
    if (!options.strided && !t.isContiguous()) {
      throw new ValidationError(argument, describe(t), 'a row-major contiguous tensor');
    }
    return t;
  }
}
