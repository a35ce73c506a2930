// The EP contract shared by the public EpBuffer and every backend (CPU and GPU): options,
// call arguments, results, handles, events, and the backend interface. Shapes use R = ranks,
// E = experts, E_l = E / R local experts, T = tokens of this rank, K = top-k, H = hidden,
// S = ceil(H / 128) FP8 scales per row, W = ceil(S / 4) UE8M0 words per row.

import type { DeviceTensor } from '../device/device-tensor.ts';
import type { Stream } from '../device/stream.ts';
import type { HostTensor, TensorMeta } from '../device/tensor.ts';
import type { Group } from '../dist/group.ts';

/**
 * The tensor type the EP API takes and returns: host memory for the CPU backend, device memory for the
 * GPU backend. Narrow a result with `instanceof HostTensor` / `instanceof DeviceTensor`; a DeviceTensor's
 * `toHost()` copies it to a HostTensor.
 */
export type Tensor = HostTensor | DeviceTensor;

export type EpMode = 'normal' | 'low-latency' | 'both';
export type BackendKind = 'cpu' | 'gpu' | 'auto';
export type BackendName = 'cpu' | 'gpu';
/**
 * How the GPU backend moves data: NVLink peer stores, NCCL transfers, NVLink inside hosts with NVSHMEM
 * between them, or the best available ('auto').
 */
export type TransportKind = 'auto' | 'nvlink' | 'nccl' | 'nvshmem';
/** The transport a GPU buffer ended up with. */
export type ChosenTransport = Exclude<TransportKind, 'auto'>;

export interface EpBufferOptions {
  /** Hidden size H of every row; a positive multiple of 16 (rows are whole 16-byte vectors). */
  hidden: number;
  /** Most tokens any rank passes to one call (T ≤ this); the same on every rank. */
  maxTokensPerRank: number;
  /** Total experts E, a multiple of the number of ranks; rank r owns [r·E/R, (r+1)·E/R). */
  numExperts: number;
  /** Most top-k slots per token (K ≤ this), at most 32. */
  numTopk: number;
  /** Which call families the buffer serves; default 'normal'. */
  mode?: EpMode;
  /** FP8 payloads are expected: the default of `lowLatencyDispatch`'s `fp8`. Default false. */
  fp8?: boolean;
  /** 'auto' (default) takes the GPU backend when a GPU is present, else the CPU backend. */
  backend?: BackendKind;
  /**
   * GPU backend: 'nvlink' (peer stores between the GPUs of one host), 'nccl' (NCCL collectives, any
   * topology, both modes) or 'auto' (default: NVLink when every rank is on one host and every pair of their
   * GPUs has peer access, else NCCL), or 'nvshmem' (NVLink between the GPUs of a host, NVSHMEM between
   * hosts, each token crossing once per destination host; both modes; docs/multi-host.md). The CPU
   * backend ignores it.
   */
  transport?: TransportKind;
  /**
   * Ranks per host (default: LOCAL_WORLD_SIZE, the ranks the launcher started on this machine). A smaller
   * divisor of it splits one machine into virtual hosts, e.g. 4 GPUs as 2 hosts × 2: traffic between them
   * then takes the multi-host route (transport 'nvshmem' or 'nccl').
   */
  ranksPerHost?: number;
}

export interface ResolvedEpBufferOptions {
  readonly hidden: number;
  readonly maxTokensPerRank: number;
  readonly numExperts: number;
  readonly numTopk: number;
  readonly mode: EpMode;
  readonly fp8: boolean;
  readonly backend: BackendKind;
  readonly transport: TransportKind;
  readonly ranksPerHost: number;
}

/**
 * Completion of a call's work. On the CPU backend, outputs returned by a synchronous call are filled
 * only once `wait()` resolves; on the GPU backend stream order provides the same guarantee.
 */
export interface EpEvent {
  /** True once the work is complete (successfully or not). Never blocks. */
  query(): boolean;
  /** Resolves when the work is complete; rejects with the work's error if it failed. */
  wait(): Promise<void>;
}

/** Called to run the receive phase of a low-latency call made with `returnRecvHook: true`. */
export type RecvHook = () => void | Promise<void>;

/** Identity of the buffer that made a handle; a handle is only accepted by its own buffer. */
export interface HandleOwner {
  readonly label: string;
  /** Whether the buffer has been destroyed (its handles then refer to freed memory). */
  readonly destroyed?: boolean;
}

export interface DispatchLayout {
  /** [R] i32: this rank's tokens with at least one expert on rank r. */
  readonly numTokensPerRank: Tensor;
  /** [E] i32: this rank's tokens choosing expert e. */
  readonly numTokensPerExpert: Tensor;
  /** [T, R] bool: token t goes to rank r. */
  readonly isTokenInRank: Tensor;
}

/**
 * What combine and cached dispatches replay. Backends may return subtypes carrying more state; the
 * owner check guarantees a backend only ever receives its own handles back.
 */
export interface DispatchHandle {
  readonly kind: 'dispatch';
  readonly owner: HandleOwner;
  /** T: rows of this rank's x at dispatch (the rows combine returns). */
  readonly numTokens: number;
  /** Rows of recvX: the exact received count, or worstCaseTokens. */
  readonly numRecvRows: number;
  /** 0 for an exact-size dispatch. */
  readonly worstCaseTokens: number;
  readonly expertAlignment: number;
  /** Aligned received rows per local expert [E_l]; empty for a worst-case dispatch (no host sync). */
  readonly numRecvTokensPerExpert: readonly number[];
  /** [T, R] bool: where this rank's tokens went. */
  readonly isTokenInRank: Tensor;
  /** [R, R] i32: [i][j] = Σ_{i' ≤ i} tokens rank i' sent to rank j (inclusive over sources). */
  readonly rankPrefixMatrix: Tensor;
  /** [numRecvRows] i32: each received row's token index in its source batch; -1 on unused rows. */
  readonly recvSrcIdx: Tensor;
  /**
   * Frees the device memory the handle itself allocated (GPU backend; the layout's tensors stay the
   * caller's). The handle must not be used afterwards. No-op on the CPU backend.
   */
  dispose(): void;
}

export interface LowLatencyHandle {
  readonly kind: 'low-latency';
  readonly owner: HandleOwner;
  /** T: rows of this rank's x at dispatch. */
  readonly numTokens: number;
  /** [E_l, R·T_max] i32: each received row's token index in its source batch. */
  readonly packedRecvSrcInfo: Tensor;
  /** [E_l, R] i64: (begin << 32) | count of the block local expert e received from rank s. */
  readonly packedRecvLayoutRange: Tensor;
  /** Nothing to free today (low-latency outputs live in the buffer's rings); kept for symmetry. */
  dispose(): void;
}

// ------------------------------------------------------------------------------------------ normal mode

export interface DispatchArgs {
  /** [T, H] bf16, or fp8_e4m3 with `scales`; row-major. */
  x: Tensor;
  /** With fp8 x: [T, S] f32 or [T, W] i32 (UE8M0 packed), any strides. */
  scales?: Tensor;
  /** [T, K] i32 or i64, -1 = no expert. Required for a fresh dispatch unless `layout` is given. */
  topkIdx?: Tensor;
  /** [T, K] f32; needs `topkIdx`. */
  topkWeights?: Tensor;
  /** From getDispatchLayout; computed from `topkIdx` when omitted. */
  layout?: DispatchLayout;
  /** Per-expert counts in numRecvTokensPerExpert are rounded up to this; default 1. */
  expertAlignment?: number;
  /** Replay a previous dispatch's routing (cached dispatch): no topkIdx, topkWeights or layout then. */
  handle?: DispatchHandle;
  /** > 0: no host sync, outputs get this many rows (≥ R·maxTokensPerRank). */
  worstCaseTokens?: number;
  /** Work starts after this event. */
  previousEvent?: EpEvent;
}

export interface DispatchResult {
  /** [N, H], x's dtype; N = handle.numRecvRows. Rows ordered by source rank, then source token index. */
  readonly recvX: Tensor;
  /** [N, S] f32 or [N, W] i32, row-major; with fp8 x only. */
  readonly recvScales?: Tensor;
  /** [N, K] (topkIdx's dtype): local expert ids, -1 for experts elsewhere; fresh dispatch with topkIdx only. */
  readonly recvTopkIdx?: Tensor;
  /** [N, K] f32: zero where recvTopkIdx is -1; fresh dispatch with topkWeights only. */
  readonly recvTopkWeights?: Tensor;
  /** Aligned rows per local expert [E_l]; empty for a worst-case dispatch. */
  readonly numRecvTokensPerExpert: readonly number[];
  readonly handle: DispatchHandle;
  readonly event: EpEvent;
}

export interface CombineArgs {
  /** [handle.numRecvRows, H] bf16, rows in dispatch order. */
  x: Tensor;
  handle: DispatchHandle;
  /** [handle.numRecvRows, K] f32: summed back per token into combinedTopkWeights. */
  topkWeights?: Tensor;
  /** One or two [T, H] bf16 tensors added before the single rounding. */
  bias?: Tensor | readonly Tensor[];
  previousEvent?: EpEvent;
}

export interface CombineResult {
  /** [T, H] bf16: per token, the unweighted sum of the rows its ranks sent back, plus bias. */
  readonly combinedX: Tensor;
  /** [T, K] f32; with topkWeights only. */
  readonly combinedTopkWeights?: Tensor;
  readonly event: EpEvent;
}

// ------------------------------------------------------------------------------------- low-latency mode

export interface LowLatencyDispatchArgs {
  /** [T, H] bf16 row-major, T ≤ maxTokensPerRank. */
  x: Tensor;
  /** [T, K] i32 or i64, -1 = no expert. */
  topkIdx: Tensor;
  /** Must equal the buffer's (DeepEP passes it on every call); optional here. */
  maxTokensPerRank?: number;
  /** Must equal the buffer's; optional here. */
  numExperts?: number;
  /** Quantize to FP8 e4m3 per 128 channels (needs hidden % 128 == 0); default: the buffer's `fp8`. */
  fp8?: boolean;
  /** Round scales up to powers of two (FP8 only). */
  roundScale?: boolean;
  /** Return scales as packed UE8M0 bytes (FP8 only; implies roundScale). */
  ue8m0?: boolean;
  /** Only send now; the returned hook runs the receive phase. */
  returnRecvHook?: boolean;
}

export interface LowLatencyDispatchResult {
  /** [E_l, R·T_max, H] fp8_e4m3 or bf16; rows past recvCount[e] are unspecified. */
  readonly recvX: Tensor;
  /** FP8 only: [E_l, R·T_max, S] f32 or [E_l, R·T_max, W] i32, column-major in the last two dims. */
  readonly recvScales?: Tensor;
  /** [E_l] i32: valid rows per local expert. */
  readonly recvCount: Tensor;
  readonly handle: LowLatencyHandle;
  readonly event: EpEvent;
  readonly hook?: RecvHook;
}

export interface LowLatencyCombineArgs {
  /** [E_l, R·T_max, H] bf16 in the dispatch layout. */
  x: Tensor;
  /** This rank's original [T, K] routing (i32 or i64). */
  topkIdx: Tensor;
  /** [T, K] f32. */
  topkWeights: Tensor;
  handle: LowLatencyHandle;
  returnRecvHook?: boolean;
}

export interface LowLatencyCombineResult {
  /** [T, H] bf16: Σ_k w[t,k]·y over the token's valid experts. */
  readonly combinedX: Tensor;
  readonly event: EpEvent;
  readonly hook?: RecvHook;
}

/** Communication memory per rank that each mode needs at the buffer's capacity (0 if not enabled). */
export interface EpSizeHint {
  readonly normalBytes: number;
  readonly lowLatencyBytes: number;
}

// ---------------------------------------------------------------------------------------------- backend
// EpBuffer validates every argument (src/ep/validate.ts) and resolves defaults before it calls a
// backend, so backends receive well-formed requests only.

export type DispatchRequest =
  | {
      readonly kind: 'fresh';
      readonly x: Tensor;
      readonly scales?: Tensor;
      readonly topkIdx?: Tensor;
      readonly topkWeights?: Tensor;
      readonly layout: DispatchLayout;
      readonly expertAlignment: number;
      readonly worstCaseTokens: number;
      readonly previousEvent?: EpEvent;
    }
  | {
      readonly kind: 'cached';
      readonly x: Tensor;
      readonly scales?: Tensor;
      readonly handle: DispatchHandle;
      readonly previousEvent?: EpEvent;
    };

export interface CombineRequest {
  readonly x: Tensor;
  readonly handle: DispatchHandle;
  readonly topkWeights?: Tensor;
  /** Zero, one or two tensors. */
  readonly bias: readonly Tensor[];
  readonly previousEvent?: EpEvent;
}

export interface LowLatencyDispatchRequest {
  readonly x: Tensor;
  readonly topkIdx: Tensor;
  readonly fp8: boolean;
  /** True whenever ue8m0 is. */
  readonly roundScale: boolean;
  readonly ue8m0: boolean;
  readonly returnRecvHook: boolean;
}

export interface LowLatencyCombineRequest {
  readonly x: Tensor;
  readonly topkIdx: Tensor;
  readonly topkWeights: Tensor;
  readonly handle: LowLatencyHandle;
  readonly returnRecvHook: boolean;
}

export interface BackendContext {
  readonly group: Group;
  readonly options: ResolvedEpBufferOptions;
  /** Put into every handle the backend makes. */
  readonly owner: HandleOwner;
}

/** The buffer's calls that move data between ranks. */
export type EpDataCall = 'dispatch' | 'combine' | 'lowLatencyDispatch' | 'lowLatencyCombine';

/**
 * What a backend does for one buffer. A data call that throws synchronously has not started its
 * communication (the buffer then calls `refuseCall`); failures after that reject its promise or event.
 */
export interface EpBackend {
  readonly name: BackendName;
  getDispatchLayout(topkIdx: Tensor): DispatchLayout;
  dispatch(request: DispatchRequest): Promise<DispatchResult>;
  combine(request: CombineRequest): Promise<CombineResult>;
  lowLatencyDispatch(request: LowLatencyDispatchRequest): LowLatencyDispatchResult;
  lowLatencyCombine(request: LowLatencyCombineRequest): LowLatencyCombineResult;
  cleanLowLatencyBuffer(): void;
  sizeHint(): EpSizeHint;
  /** GPU backends: the transport in use and why it was chosen. */
  readonly transport?: { readonly transport: ChosenTransport; readonly reason: string };
  /** GPU backends: the stream the buffer's kernels run on (for events, timing and graph capture). */
  readonly stream?: Stream;
  /**
   * GPU backends: throws ValidationError unless the backend can use `t` as `argument` (a DeviceTensor on
   * this rank's GPU, row-major unless `strided`). Validation calls it before anything is enqueued.
   */
  checkTensor?(argument: string, t: TensorMeta, strided: boolean): void;
  /** GPU backends: the SMs of a normal-mode call (setNumSms on EpBuffer says how each path uses them). */
  setNumSms?(n: number): void;
  /** Collective: brings the buffer back to a usable state after a timeout (GPU backends). */
  reset?(): Promise<void>;
  /** GPU backends with TSEP_PROFILE=1: device milliseconds of each kernel of the latest call. */
  phaseTimes?(): Promise<Record<string, number> | undefined>;
  /**
   * This rank's `call` threw before its exchange was issued (its arguments failed validation, in the buffer
   * or in the backend's synchronous part). The CPU backend still takes part in the call's exchange with a
   * failure marker, so its peers fail at once and later calls stay paired; on the GPU the peers' device
   * waits time out instead (EpTimeoutError).
   */
  refuseCall?(call: EpDataCall, error: unknown): void;
  /** Waits for work in flight, then releases what the backend holds. */
  destroy(): Promise<void>;
}

export interface EpBackendFactory {
  readonly name: BackendName;
  create(context: BackendContext): Promise<EpBackend>;
}
