// Byte layout of the low-latency symmetric buffer (one per rank, the same on every rank). The kernels get
// every offset as a -D define from here, so this file is the only place the layout is written down;
// docs/low-latency.md explains it with the standard shape's numbers.
//
//   [0, 4096)        control: signals and acks peers write into us, and our own device-side state
//   dispatch area    2 halves × R sources × (routing [T_max][K_max] i32 + T_max messages)
//   combine area     2 halves × T_max tokens × K_max slots × H bf16
//   combine outbox   (transport 'nvshmem' only) R owners × T_max × K_max × H bf16: rows for owners on other
//                    hosts are staged here, then put into the owner's combine area by NVSHMEM

const align = (n: number, a: number): number => Math.ceil(n / a) * a;

/** Indices of the u32 words of the device-side state (written by this rank's kernels only). */
export const LL_STATE = {
  dispatchSendEpoch: 0,
  dispatchRecvEpoch: 1,
  combineSendEpoch: 2,
  combineRecvEpoch: 3,
  /** 4..7: last-block arrival counters of the four kernels. */
  arrive: 4,
  abort: 8,
  claim: 9,
  barrierEpoch: 10,
} as const;

/** Words of the timeout record the kernels write into the host-mapped signal page. */
export const LL_RECORD = {
  flag: 0,
  rank: 1,
  kernel: 2,
  phase: 3,
  peer: 4,
  expected: 5,
  seen: 6,
  block: 7,
  words: 8,
} as const;

/** The payload type of a low-latency dispatch. */
export type LlPayload = 'fp8' | 'bf16';

export interface LlShape {
  numRanks: number;
  localExperts: number;
  hidden: number;
  maxTokensPerRank: number;
  /** K_max: slots per token in routing rows and combine slots. */
  numTopk: number;
}

export interface LlLayout extends LlShape {
  /** Bytes of one dispatch message: max(bf16 row, fp8 row + f32 scales), 16-aligned. */
  msgBytes: number;
  /** Bytes of one source's routing table, [T_max][K_max] i32, 128-aligned. */
  routeBytes: number;
  /** Bytes per source in one dispatch half: routing + T_max messages. */
  srcBytes: number;
  dispatchHalfBytes: number;
  combineHalfBytes: number;
  offState: number;
  /** u64 [2][R]: (T << 32) | (epoch + 1) from each source, per half. */
  offDispatchSignal: number;
  /** u32 [R]: receiver r has finished reading dispatch call (value - 1). */
  offDispatchAck: number;
  /** u32 [2][R]: epoch + 1 from each expert rank, per half. */
  offCombineSignal: number;
  /** u32 [R]: owner r has finished reading combine call (value - 1). */
  offCombineAck: number;
  /** u32 [R]: monotonic barrier counters (clean). */
  offBarrier: number;
  offDispatch: number;
  offCombine: number;
  /** The combine outbox (0 without one). */
  offOutbox: number;
  totalBytes: number;
}

/** Most ranks of a low-latency buffer: one NVLink host, or (with the outbox) across hosts. */
export function llMaxRanks(acrossHosts: boolean): number {
  return acrossHosts ? 16 : 8;
}

/**
 * `outbox`: room to stage the combine rows for owners on other hosts (transport 'nvshmem'). The control
 * block's signal and ack arrays hold 16 ranks.
 */
export function llLayout(shape: LlShape, options: { outbox?: boolean } = {}): LlLayout {
  const { numRanks: R, hidden: H, maxTokensPerRank: T, numTopk: K } = shape;
  const most = llMaxRanks(options.outbox ?? false);
  if (R > most) {
    throw new RangeError(
      `low-latency layout: ${R} ranks, at most ${most} (${options.outbox ? 'across hosts' : 'one NVLink host'})`,
    );
  }
  const scales = Math.ceil(H / 128);
  const msgBytes = align(Math.max(2 * H, H + 4 * scales), 16);
  const routeBytes = align(T * K * 4, 128);
  const srcBytes = routeBytes + T * msgBytes;
  const dispatchHalfBytes = R * srcBytes;
  const combineHalfBytes = T * K * 2 * H;
  const offDispatch = 4096;
  const offCombine = align(offDispatch + 2 * dispatchHalfBytes, 4096);
  const offOutbox = options.outbox ? align(offCombine + 2 * combineHalfBytes, 4096) : 0;
  const end = options.outbox ? offOutbox + R * combineHalfBytes : offCombine + 2 * combineHalfBytes;
  const totalBytes = align(end, 2 << 20);
  return {
    ...shape,
    msgBytes,
    routeBytes,
    srcBytes,
    dispatchHalfBytes,
    combineHalfBytes,
    offState: 0,
    offDispatchSignal: 256,
    offDispatchAck: 512,
    offCombineSignal: 640,
    offCombineAck: 768,
    offBarrier: 896,
    offDispatch,
    offCombine,
    offOutbox,
    totalBytes,
  };
}

/** The shape every low-latency kernel specializes on, as -D defines (kernels/ll_core.cuh). */
export function llShapeDefines(s: LlShape): Record<string, number> {
  return {
    LL_R: s.numRanks,
    LL_EL: s.localExperts,
    LL_H: s.hidden,
    LL_TMAX: s.maxTokensPerRank,
    LL_KMAX: s.numTopk,
  };
}

/** The layout as the kernels' -D defines (plus the buffer constants they specialize on). */
export function llDefines(l: LlLayout): Record<string, number> {
  return {
    ...llShapeDefines(l),
    LL_MSG: l.msgBytes,
    LL_ROUTE: l.routeBytes,
    LL_SRC: l.srcBytes,
    LL_DHALF: l.dispatchHalfBytes,
    LL_CHALF: l.combineHalfBytes,
    LL_OFF_STATE: l.offState,
    LL_OFF_DSIG: l.offDispatchSignal,
    LL_OFF_DACK: l.offDispatchAck,
    LL_OFF_CSIG: l.offCombineSignal,
    LL_OFF_CACK: l.offCombineAck,
    LL_OFF_BAR: l.offBarrier,
    LL_OFF_DAREA: l.offDispatch,
    LL_OFF_CAREA: l.offCombine,
    ...(l.offOutbox ? { LL_OFF_COUT: l.offOutbox } : {}),
  };
}
