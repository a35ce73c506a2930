// tsep's public API: re-exports only.

export { Device, type DeviceInfo } from './device/context.ts';
export { DeviceTensor } from './device/device-tensor.ts';
export {
  bf16ArrayToF32,
  bf16ToF32,
  DTYPES,
  type DType,
  dequantizeFp8,
  dtypeSize,
  FP8_BLOCK,
  FP8_E4M3_MAX,
  type Fp8Quantized,
  type Fp8QuantOptions,
  f32ArrayToBf16,
  f32ToBf16,
  f32ToFp8E4m3,
  fp8E4m3ToF32,
  fp8ScaleCount,
  packUe8m0,
  quantizeFp8,
  ue8m0WordCount,
  unpackUe8m0,
} from './device/dtypes.ts';
export { Graph } from './device/graph.ts';
export { DeviceBuffer, HostBuffer } from './device/memory.ts';
export { Event, Stream } from './device/stream.ts';
export { HostTensor, type HostTensorOptions, type TensorMeta } from './device/tensor.ts';
export type { Group } from './dist/group.ts';
export { type InitProcessGroupOptions, initProcessGroup } from './dist/init.ts';
export { type LaunchOptions, type LaunchResult, launch } from './dist/launcher.ts';
export { LocalGroup } from './dist/local-group.ts';
export { NcclCommunicator, type ReduceOp } from './dist/nccl-comm.ts';
export { StoreClient, type StoreOpOptions, StoreServer } from './dist/store.ts';
export { StoreGroup, type StoreGroupOptions } from './dist/store-group.ts';
export { SymmetricBuffer, type SymmetricOptions } from './dist/symmetric.ts';
export { EpBuffer } from './ep/buffer.ts';
export type {
  BackendKind,
  BackendName,
  ChosenTransport,
  CombineArgs,
  CombineResult,
  DispatchArgs,
  DispatchHandle,
  DispatchLayout,
  DispatchResult,
  EpBufferOptions,
  EpEvent,
  EpMode,
  EpSizeHint,
  HandleOwner,
  LowLatencyCombineArgs,
  LowLatencyCombineResult,
  LowLatencyDispatchArgs,
  LowLatencyDispatchResult,
  LowLatencyHandle,
  RecvHook,
  ResolvedEpBufferOptions,
  Tensor,
  TransportKind,
} from './ep/types.ts';
export {
  CompileError,
  CudaError,
  DisposedError,
  EpTimeoutError,
  LibraryNotFoundError,
  NcclError,
  NvrtcError,
  NvshmemError,
  RendezvousError,
  TsepError,
  type TsepErrorCode,
  ValidationError,
} from './errors.ts';
