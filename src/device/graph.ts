// CUDA graphs: capture the work a function enqueues on a stream, instantiate it once, replay it cheaply.
// New inputs are given either by writing into the captured buffers before a replay, or by capturing
// again with other pointers and `update`-ing the executable graph in place (same topology).

import { DisposedError, TsepError } from '../errors.ts';
import { check, cu, raw } from '../native/cuda.ts';
import type { Stream } from './stream.ts';

const CAPTURE_MODE_RELAXED = 2;

function capture(stream: Stream, enqueue: () => void): bigint {
  cu('cuStreamBeginCapture_v2', stream.handle, CAPTURE_MODE_RELAXED);
  const graph = new BigUint64Array(1);
  let failure: unknown;
  try {
    enqueue();
  } catch (e) {
    failure = e;
  }
  // Always end the capture, even if `enqueue` threw, so the stream is usable again.
  const status = raw('cuStreamEndCapture')(stream.handle, graph) as number;
  if (failure !== undefined) {
    if (graph[0]) cu('cuGraphDestroy', graph[0]);
    throw failure;
  }
  check('cuStreamEndCapture', status);
  return graph[0]!;
}

export class Graph {
  private exec: bigint;
  private graph: bigint;

  private constructor(graph: bigint, exec: bigint) {
    this.graph = graph;
    this.exec = exec;
  }

  /** Captures everything `enqueue` puts on `stream` (it must not synchronize) and instantiates it. */
  static capture(stream: Stream, enqueue: () => void): Graph {
    const g = capture(stream, enqueue);
    const exec = new BigUint64Array(1);
    cu('cuGraphInstantiateWithFlags', exec, g, 0n);
    return new Graph(g, exec[0]!);
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
