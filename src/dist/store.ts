// The TCP store's client: the key-value rendezvous every rank shares (collectives of the process group,
// NCCL unique ids, IPC handles). One connection carries any number of concurrent requests; every request
// is bounded by a timeout that raises RendezvousError naming the key.

import { connect, type Socket } from 'node:net';
import { DisposedError, RendezvousError, ValidationError } from '../errors.ts';
import { encodeFrame, type Frame, FrameDecoder, MAX_FRAME_BYTES } from './frame.ts';
import { flag, i64, Op, readI64, Status, u32, utf8 } from './store-protocol.ts';

export { StoreServer, type StoreServerOptions, storeBindAddress } from './store-server.ts';

/** Default bound on one store operation (and on connecting). */
export const DEFAULT_STORE_TIMEOUT_MS = 300_000;

/** Per-call override of the client's timeout. */
export interface StoreOpOptions {
  timeoutMs?: number;
}

/** Result of {@link StoreClient.compareAndSet}: whether it swapped, and the value stored afterwards. */
export interface CompareAndSetResult {
  swapped: boolean;
  value: Uint8Array | undefined;
}

interface Pending {
  resolve: (frame: Frame) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  what: string;
  key: string;
}

const EMPTY = new Uint8Array(0);

/** A connection to a {@link StoreServer}. Create with {@link StoreClient.connect}. */
export class StoreClient {
  readonly host: string;
  readonly port: number;
  /** Bound on each operation unless the call overrides it. */
  readonly timeoutMs: number;
  private readonly socket: Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;
  private lost: string | undefined;

  private constructor(socket: Socket, host: string, port: number, timeoutMs: number) {
    this.socket = socket;
    this.host = host;
    this.port = port;
    this.timeoutMs = timeoutMs;
    const decoder = new FrameDecoder();
    socket.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = decoder.push(chunk);
      } catch (err) {
        socket.destroy(err as Error);
        return;
      }
      for (const frame of frames) this.settle(frame);
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      this.lost = err.code ?? err.message;
    });
    socket.on('close', () => this.failAll());
    // An idle connection must not keep the process alive; see request().
    socket.unref();
  }

  /**
   * Connects to the store at host:port, retrying while nobody listens yet (the host may start after
   * this rank), for at most `timeoutMs` (default 300 s), which also becomes the per-operation default.
   */
  static async connect(host: string, port: number, options: StoreOpOptions = {}): Promise<StoreClient> {
    const timeoutMs = checkTimeout(options.timeoutMs ?? DEFAULT_STORE_TIMEOUT_MS);
    const deadline = Date.now() + timeoutMs;
    let delay = 20;
    for (;;) {
      let reason: string;
      try {
        const socket = await tryConnect(host, port, deadline - Date.now());
        return new StoreClient(socket, host, port, timeoutMs);
      } catch (err) {
        reason = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
      }
      if (Date.now() + delay >= deadline) {
        throw new RendezvousError(
          `Could not connect to the TCP store at ${host}:${port} within ${seconds(timeoutMs)} (last error: ` +
            `${reason}). Check MASTER_ADDR/MASTER_PORT and that the launcher (or rank 0) is running.`,
        );
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 500);
    }
  }

  /** Stores `value` under `key`, replacing any previous value, and wakes everyone waiting for it. */
  async set(key: string, value: Uint8Array | string, options?: StoreOpOptions): Promise<void> {
    await this.request(Op.SET, [utf8(key), bytes(value)], 'set', key, options);
  }

  /** Returns the value of `key`, waiting until some rank sets it (at most the timeout). */
  async get(key: string, options?: StoreOpOptions): Promise<Uint8Array> {
    const frame = await this.request(Op.GET, [utf8(key)], 'get', key, options);
    return frame.fields[0]!;
  }

  /**
   * Atomically adds `delta` to the integer stored under `key` (a missing key counts as 0) and returns
   * the new value. The value is kept as decimal text, so `get` reads it back as e.g. "3".
   */
  async add(key: string, delta = 1, options?: StoreOpOptions): Promise<number> {
    if (!Number.isSafeInteger(delta)) {
      throw new ValidationError('delta', String(delta), 'a safe integer');
    }
    const frame = await this.request(Op.ADD, [utf8(key), i64(BigInt(delta))], 'add', key, options);
    if (frame.tag === Status.NOT_INTEGER) {
      throw new ValidationError(
        `store key "${key}"`,
        'a value that is not a decimal integer',
        'a key that only add() writes',
      );
    }
    return Number(readI64(frame.fields[0]!));
  }

  /** Resolves once every key in `keys` exists (at most the timeout). */
  async wait(keys: readonly string[], options?: StoreOpOptions): Promise<void> {
    if (keys.length === 0) return;
    await this.request(Op.WAIT, keys.map(utf8), 'wait', keys.join(', '), options);
  }

  /** Returns, for each key, whether it exists now; never waits. */
  async check(keys: readonly string[], options?: StoreOpOptions): Promise<boolean[]> {
    if (keys.length === 0) return [];
    const frame = await this.request(Op.CHECK, keys.map(utf8), 'check', keys.join(', '), options);
    return Array.from(frame.fields[0]!, (b) => b === 1);
  }

  /** Removes `key`; resolves whether it existed. */
  async delete(key: string, options?: StoreOpOptions): Promise<boolean> {
    const frame = await this.request(Op.DELETE, [utf8(key)], 'delete', key, options);
    return frame.fields[0]![0] === 1;
  }

  /**
   * Atomically sets `key` to `desired` if its value equals `expected`; `expected` undefined means "only
   * if the key does not exist". Returns whether it swapped and the value stored afterwards.
   */
  async compareAndSet(
    key: string,
    expected: Uint8Array | string | undefined,
    desired: Uint8Array | string,
    options?: StoreOpOptions,
  ): Promise<CompareAndSetResult> {
    const fields = [
      utf8(key),
      flag(expected !== undefined),
      expected === undefined ? EMPTY : bytes(expected),
      bytes(desired),
    ];
    const frame = await this.request(Op.CAS, fields, 'compareAndSet', key, options);
    const [swapped, hasValue, value] = frame.fields;
    return { swapped: swapped![0] === 1, value: hasValue![0] === 1 ? value! : undefined };
  }

  /** Closes the connection. Pending operations fail; later ones throw DisposedError. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.socket.destroyed) return;
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.ref();
      this.socket.end();
    });
  }

  private request(
    op: number,
    fields: Uint8Array[],
    what: string,
    key: string,
    options: StoreOpOptions | undefined,
  ): Promise<Frame> {
    if (this.closed) throw new DisposedError(`StoreClient(${this.host}:${this.port})`);
    if (this.socket.destroyed) throw this.lostError(what, key);
    const timeoutMs = checkTimeout(options?.timeoutMs ?? this.timeoutMs);
    let size = 0;
    for (const f of fields) size += f.byteLength + 4;
    if (size > MAX_FRAME_BYTES - 64) {
      throw new ValidationError(
        `store ${what} of key "${key}"`,
        `${size} bytes`,
        `at most ${MAX_FRAME_BYTES - 64}`,
      );
    }
    const id = this.nextId;
    this.nextId = this.nextId === 0xffffffff ? 1 : this.nextId + 1;
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.forget(id);
        // A parked GET/WAIT would otherwise stay registered on the server for the life of the connection.
        if ((op === Op.GET || op === Op.WAIT) && !this.socket.destroyed) {
          this.socket.write(encodeFrame(Op.CANCEL, 0, [u32(id)]));
        }
        reject(
          new RendezvousError(
            `Store ${what} of key "${key}" timed out after ${seconds(timeoutMs)} (store at ` +
              `${this.host}:${this.port}). The rank that should provide it may have failed or be slow; ` +
              'raise the timeout (TSEP_STORE_TIMEOUT_S) if it is only slow.',
            { key },
          ),
        );
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, what, key });
      // Keep the process alive exactly while some request is outstanding.
      if (this.pending.size === 1) this.socket.ref();
      this.socket.write(encodeFrame(op, id, fields));
    });
  }

  private settle(frame: Frame): void {
    const p = this.pending.get(frame.id);
    if (!p) return; // answered after it timed out
    this.forget(frame.id);
    p.resolve(frame);
  }

  private forget(id: number): void {
    const p = this.pending.get(id);
    if (!p) return;
    clearTimeout(p.timer);
    this.pending.delete(id);
    if (this.pending.size === 0) this.socket.unref();
  }

  private failAll(): void {
    for (const [id, p] of [...this.pending]) {
      this.forget(id);
      p.reject(
        this.closed
          ? new DisposedError(`StoreClient(${this.host}:${this.port})`)
          : this.lostError(p.what, p.key),
      );
    }
  }

  private lostError(what: string, key: string): RendezvousError {
    return new RendezvousError(
      `Lost the connection to the TCP store at ${this.host}:${this.port} during ${what} of key "${key}"` +
        `${this.lost ? ` (${this.lost})` : ''}. The store host (launcher or rank 0) has probably exited.`,
      { key },
    );
  }
}

function tryConnect(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port, noDelay: true });
    const timer = setTimeout(
      () => socket.destroy(Object.assign(new Error('connect timed out'), { code: 'ETIMEDOUT' })),
      Math.max(timeoutMs, 1),
    );
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.setKeepAlive(true, 30_000);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

function bytes(value: Uint8Array | string): Uint8Array {
  return typeof value === 'string' ? utf8(value) : value;
}

// setTimeout cannot wait longer than 2^31-1 ms (about 24.8 days).
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

function checkTimeout(ms: number): number {
  if (!(ms > 0 && ms <= MAX_TIMEOUT_MS)) {
    throw new ValidationError('timeoutMs', String(ms), `a number of milliseconds in (0, ${MAX_TIMEOUT_MS}]`);
  }
  return ms;
}

function seconds(ms: number): string {
  return `${Number((ms / 1000).toFixed(3))} s`;
}
