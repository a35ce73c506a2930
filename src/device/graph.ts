// CUDA graphs: capture the work a function enqueues on a stream, instantiate it once, replay it cheaply.
// New inputs are given either by writing into the captured buffers before a replay, or by capturing
// again with other pointers and `update`-ing the executable graph in place (same topology).

import { DisposedError, TsepError } from '../errors.ts';
import { check, cu, raw } from '../native/cuda.ts';
import { captureClosed, captureOpened, type Stream } from './stream.ts';

const CAPTURE_MODE_RELAXED = 2;
const NO_FAILURE = Symbol('no failure');

function beginCapture(stream: Stream): void {
  cu('cuStreamBeginCapture_v2', stream.handle, CAPTURE_MODE_RELAXED);
  captureOpened();
}

// Always ends the capture, even when the enqueueing code failed, so the stream is usable again.
function endCapture(stream: Stream, failure: unknown): bigint {
  const graph = new BigUint64Array(1);
  const status = raw('cuStreamEndCapture')(stream.handle, graph) as number;
  captureClosed();
  if (failure !== NO_FAILURE) {
    if (graph[0]) cu('cuGraphDestroy', graph[0]);
    throw failure;
  }
  check('cuStreamEndCapture', status);
  return graph[0]!;
}

function capture(stream: Stream, enqueue: () => void): bigint {
  beginCapture(stream);
  let failure: unknown = NO_FAILURE;
  try {
    enqueue();
  } catch (e) {
    failure = e;
  }
  return endCapture(stream, failure);
}

function instantiate(graph: bigint): bigint {
  const exec = new BigUint64Array(1);
  cu('cuGraphInstantiateWithFlags', exec, graph, 0n);
  return exec[0]!;
}

export class Graph {
  private exec: bigint;
  private graph: bigint;

  private constructor(graph: bigint) {
    this.graph = graph;
    this.exec = instantiate(graph);
  }

  /** Captures everything `enqueue` puts on `stream` (it must not synchronize) and instantiates it. */
  static capture(stream: Stream, enqueue: () => void): Graph {
    return new Graph(capture(stream, enqueue));
  }

  /**
   * Like `capture`, for an async `enqueue` (e.g. an EP call that awaits a warm kernel cache). Nothing else
   * may enqueue on `stream` until the returned Promise settles.
   */
  static async captureAsync(stream: Stream, enqueue: () => Promise<void>): Promise<Graph> {
    beginCapture(stream);
    let failure: unknown = NO_FAILURE;
    try {
      await enqueue();
    } catch (e) {
      failure = e;
    }
    return new Graph(endCapture(stream, failure));
  }

  /** Replays the graph on `stream`. */
  launch(stream: Stream): void {
    if (this.exec === 0n) throw new DisposedError('Graph');
    cu('cuGraphLaunch', this.exec, stream.handle);
  }

  /**
   * Captures `enqueue` again (same kernels, new arguments such as other input pointers) and updates the
   * executable graph in place. Throws if the new capture's topology differs.
   */
  update(stream: Stream, enqueue: () => void): void {
    if (this.exec === 0n) throw new DisposedError('Graph');
    const g = capture(stream, enqueue);
    const info = new Uint8Array(32);
    const status = raw('cuGraphExecUpdate_v2')(this.exec, g, info) as number;
    if (status !== 0) {
      cu('cuGraphDestroy', g);
      throw new TsepError(
        'TSEP_CUDA_ERROR',
        `Graph update failed (status ${status}, result ${info[0]}): the new capture must enqueue the same kernels in the same order; capture a new Graph instead.`,
      );
    }
    cu('cuGraphDestroy', this.graph);
    this.graph = g;
  }

  dispose(): void {
    if (this.exec !== 0n) cu('cuGraphExecDestroy', this.exec);
    if (this.graph !== 0n) cu('cuGraphDestroy', this.graph);
    this.exec = 0n;
    this.graph = 0n;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
