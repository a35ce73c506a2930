// The TCP store's server: an in-memory key-value map that ranks meet at. Blocking reads (GET, WAIT) park
// on the server until their keys exist, so clients never poll. Hosted by `tsep launch` on node 0, or by
// rank 0 when no launcher runs (Slurm, hand-set env).

import { createServer, type Server, type Socket } from 'node:net';
import { RendezvousError } from '../errors.ts';
import { encodeFrame, type Frame, FrameDecoder } from './frame.ts';
import { flag, fromUtf8, i64, Op, readI64, readU32, Status, utf8 } from './store-protocol.ts';

interface Waiter {
  conn: Connection;
  id: number;
  op: typeof Op.GET | typeof Op.WAIT;
  keys: string[];
}

interface Connection {
  socket: Socket;
  waiters: Map<number, Waiter>;
}

interface Answer {
  status: number;
  fields: Uint8Array[];
}

const ok = (fields: Uint8Array[]): Answer => ({ status: Status.OK, fields });

const DECIMAL = /^-?\d+$/;
const EMPTY = new Uint8Array(0);

/** Options for {@link StoreServer.listen}. */
export interface StoreServerOptions {
  /** Interface to bind; default loopback. Use '0.0.0.0' when ranks on other hosts must reach it. */
  host?: string;
  /** Port to bind; 0 (default) picks a free one, readable from `port` afterwards. */
  port?: number;
}

/** A running store server. Create with {@link StoreServer.listen}; stop with {@link StoreServer.close}. */
export class StoreServer {
  readonly host: string;
  readonly port: number;
  private readonly server: Server;
  private readonly values = new Map<string, Uint8Array>();
  private readonly watchers = new Map<string, Set<Waiter>>();
  private readonly connections = new Set<Connection>();
  private readonly idleWaiters = new Set<() => void>();
  private unrefed = false;

  private constructor(server: Server, host: string, port: number) {
    this.server = server;
    this.host = host;
    this.port = port;
    server.on('connection', (socket) => this.accept(socket));
  }

  /** Binds and starts serving. Rejects with RendezvousError when the address cannot be bound. */
  static listen(options: StoreServerOptions = {}): Promise<StoreServer> {
    const host = options.host ?? '127.0.0.1';
    const port = options.port ?? 0;
    const server = createServer({ noDelay: true });
    return new Promise((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        reject(
          new RendezvousError(
            `Could not host the TCP store on ${host}:${port}: ${err.code ?? err.message}. ` +
              (err.code === 'EADDRINUSE'
                ? 'Another process holds that port; pick a free MASTER_PORT (or let `tsep launch` choose one).'
                : 'Check the address.'),
          ),
        );
      });
      server.listen({ host, port, exclusive: true }, () => {
        const address = server.address();
        const bound = typeof address === 'object' && address ? address.port : port;
        resolve(new StoreServer(server, host, bound));
      });
    });
  }

  /** Number of keys currently stored (collectives delete theirs, so a quiet store should be near empty). */
  get keyCount(): number {
    return this.values.size;
  }

  /** Number of clients connected now. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * Lets the process exit while the server (and its connections) are still open. A rank that hosts the
   * store uses this so a script that forgets `destroy()` does not hang; see StoreGroup.destroy.
   */
  unref(): this {
    this.unrefed = true;
    this.server.unref();
    for (const conn of this.connections) conn.socket.unref();
    return this;
  }

  /**
   * Resolves true once no client is connected, or false after `timeoutMs`. Used to keep a hosting rank
   * alive until the others have left, so their last reads do not lose the server mid-collective.
   */
  whenIdle(timeoutMs: number): Promise<boolean> {
    if (this.connections.size === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.idleWaiters.delete(done);
        resolve(false);
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        resolve(true);
      };
      this.idleWaiters.add(done);
    });
  }

  /** Stops listening and drops every connection; parked requests are abandoned. */
  async close(): Promise<void> {
    for (const conn of this.connections) conn.socket.destroy();
    this.connections.clear();
    for (const done of this.idleWaiters) done(); // nobody is left: their timers must not keep us alive
    this.idleWaiters.clear();
    this.watchers.clear();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: Socket): void {
    const conn: Connection = { socket, waiters: new Map() };
    const decoder = new FrameDecoder();
    this.connections.add(conn);
    if (this.unrefed) socket.unref();
    socket.setKeepAlive(true, 30_000);
    socket.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = decoder.push(chunk);
        for (const frame of frames) this.handle(conn, frame);
      } catch {
        // Not our protocol, or a broken peer: dropping it is the only safe answer.
        socket.destroy();
      }
    });
    // A vanished client's parked requests must not pin keys' watcher lists forever.
    socket.on('close', () => {
      for (const waiter of conn.waiters.values()) this.unpark(waiter);
      this.connections.delete(conn);
      if (this.connections.size === 0) {
        for (const done of this.idleWaiters) done();
        this.idleWaiters.clear();
      }
    });
    socket.on('error', () => {});
  }

  private handle(conn: Connection, frame: Frame): void {
    const answer = this.execute(conn, frame);
    if (answer) reply(conn, answer.status, frame.id, answer.fields);
  }

  /** Runs one request; returns its response, or undefined when it parked (or needs none). */
  private execute(conn: Connection, { tag, id, fields }: Frame): Answer | undefined {
    const key = (i: number): string => fromUtf8(field(fields, i));
    switch (tag) {
      case Op.SET:
        this.write(key(0), field(fields, 1).slice());
        return ok([]);
      case Op.GET:
        return this.parkOrAnswer({ conn, id, op: Op.GET, keys: [key(0)] });
      case Op.ADD: {
        const name = key(0);
        const current = this.values.get(name);
        const text = current ? fromUtf8(current) : '0';
        if (!DECIMAL.test(text)) return { status: Status.NOT_INTEGER, fields: [] };
        const next = BigInt(text) + readI64(field(fields, 1));
        this.write(name, utf8(next.toString()));
        return ok([i64(next)]);
      }
      case Op.WAIT:
        return this.parkOrAnswer({ conn, id, op: Op.WAIT, keys: fields.map(fromUtf8) });
      case Op.CHECK:
        return ok([Uint8Array.from(fields, (k) => (this.values.has(fromUtf8(k)) ? 1 : 0))]);
      case Op.DELETE:
        return ok([flag(this.values.delete(key(0)))]);
      case Op.CAS: {
        const name = key(0);
        const current = this.values.get(name);
        const hasExpected = field(fields, 1)[0] === 1;
        const matches = hasExpected
          ? current !== undefined && Buffer.from(current).equals(field(fields, 2))
          : current === undefined;
        if (matches) this.write(name, field(fields, 3).slice());
        const now = this.values.get(name);
        return ok([flag(matches), flag(now !== undefined), now ?? EMPTY]);
      }
      case Op.CANCEL: {
        const waiter = conn.waiters.get(readU32(field(fields, 0)));
        if (waiter) this.unpark(waiter);
        return undefined;
      }
      default:
        throw new RangeError(`unknown store operation ${tag}`);
    }
  }

  private write(key: string, value: Uint8Array): void {
    this.values.set(key, value);
    const waiting = this.watchers.get(key);
    if (!waiting) return;
    for (const waiter of [...waiting]) {
      if (waiter.keys.every((k) => this.values.has(k))) {
        this.unpark(waiter);
        const answer = this.answerOf(waiter);
        reply(waiter.conn, answer.status, waiter.id, answer.fields);
      }
    }
  }

  private parkOrAnswer(waiter: Waiter): Answer | undefined {
    if (waiter.keys.every((k) => this.values.has(k))) return this.answerOf(waiter);
    waiter.conn.waiters.set(waiter.id, waiter);
    for (const k of waiter.keys) {
      const set = this.watchers.get(k) ?? new Set();
      set.add(waiter);
      this.watchers.set(k, set);
    }
    return undefined;
  }

  private unpark(waiter: Waiter): void {
    waiter.conn.waiters.delete(waiter.id);
    for (const k of waiter.keys) {
      const set = this.watchers.get(k);
      set?.delete(waiter);
      if (set?.size === 0) this.watchers.delete(k);
    }
  }

  private answerOf(waiter: Waiter): Answer {
    return ok(waiter.op === Op.GET ? [this.values.get(waiter.keys[0]!)!] : []);
  }
}

function field(fields: readonly Uint8Array[], i: number): Uint8Array {
  const f = fields[i];
  if (!f) throw new RangeError(`store request is missing field ${i}`);
  return f;
}

function reply(conn: Connection, status: number, id: number, fields: readonly Uint8Array[]): void {
  if (!conn.socket.destroyed) conn.socket.write(encodeFrame(status, id, fields));
}

/**
 * The interface a store host should bind so that ranks dialing `masterAddr` reach it: the address itself
 * when it is loopback (nothing else can dial it anyway), otherwise every interface, because a host name
 * may resolve to any of this machine's addresses.
 */
export function storeBindAddress(masterAddr: string): string {
  if (masterAddr === 'localhost' || masterAddr === '::1' || masterAddr.startsWith('127.')) return masterAddr;
  return masterAddr.includes(':') ? '::' : '0.0.0.0';
}
