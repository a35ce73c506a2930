// The reference oracle: plain functions that compute, from every rank's inputs, the exact outputs of
// each EP call. The CPU backend runs them on gathered inputs; GPU tests compare against them.
// docs/semantics.md states the conventions they fix.

export {
  type Combined,
  type CombineExpertSide,
  type CombineTarget,
  combineForRank,
  referenceCombine,
} from './ref-combine.ts';
export {
  alignUp,
  type DispatchConfig,
  type DispatchReceived,
  type DispatchSource,
  dispatchToRank,
  rankPrefixMatrix,
  referenceDispatch,
} from './ref-dispatch.ts';
export { type Layout, referenceLayout } from './ref-layout.ts';
export {
  allocLowLatencyReceived,
  fillLowLatencyCombine,
  fillLowLatencyDispatch,
  type LowLatencyConfig,
  type LowLatencyExpertSide,
  type LowLatencyReceived,
  type LowLatencySource,
  type LowLatencyTarget,
  referenceLowLatencyCombine,
  referenceLowLatencyDispatch,
} from './ref-low-latency.ts';
