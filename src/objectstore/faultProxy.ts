import { createServer, Socket, type AddressInfo, type Server } from 'node:net';

/**
 * A TCP proxy that injects network faults between a client and a server (the local S3 server,
 * PostgreSQL, anything over TCP), for tests and benchmarks. It knows nothing of the protocol:
 * faults are decided per connection and per byte count, which is how real networks fail.
 *
 * The mode can be changed while connections are open; each connection follows the mode current
 * when its bytes pass. Everything is bounded: at most `maxConnections` at once, a blackholed
 * connection is dropped after `holdMs`, and `close()` destroys every socket and timer.
 */
export type ProxyMode =
  /** Forward everything unchanged. */
  | { kind: 'pass' }
  /** Forward, holding every chunk in either direction for `ms` (order kept, with backpressure). */
  | { kind: 'delay'; ms: number }
  /**
   * Reset connections (TCP RST). Each time another `afterBytes` bytes (default 0: at the first
   * byte) have come back from the server on a connection since this mode was set, the connection
   * is reset there with probability `rate` (default 1); with `afterBytes` 0 it is drawn once. So
   * long-lived (keep-alive) connections meet faults in proportion to the bytes they carry. At most
   * `limit` resets in all (default unlimited).
   */
  | { kind: 'reset'; rate?: number; afterBytes?: number; limit?: number }
  /**
   * Truncate responses: like reset, but the client gets the bytes up to the fault and then a
   * clean close (FIN), as when a server or load balancer gives up mid-response.
   */
  | { kind: 'truncate'; rate?: number; afterBytes?: number; limit?: number }
  /** Accept connections and read what the client sends, but never answer nor reach the server. */
  | { kind: 'blackhole' };

export interface FaultProxyOptions {
  target: { host: string; port: number };
  mode?: ProxyMode;
  /** Listen address; default 127.0.0.1. */
  host?: string;
  /** Listen port; default a free one. */
  port?: number;
  /** Connections open at once; more are refused by the kernel's backlog. Default 512. */
  maxConnections?: number;
  /** A blackholed connection is destroyed after this long; default 10 minutes. */
  holdMs?: number;
}

export interface FaultProxyStats {
  /** Connections accepted in all. */
  connections: number;
  /** Connections open now. */
  active: number;
  resets: number;
  truncations: number;
  blackholed: number;
  /** Bytes client → server and server → client that were forwarded. */
  bytesUp: number;
  bytesDown: number;
}

export interface FaultProxy {
  readonly host: string;
  readonly port: number;
  /** `host:port`, e.g. for a PostgreSQL config or `http://${address}` for an S3 endpoint. */
  readonly address: string;
  readonly stats: Readonly<FaultProxyStats>;
  readonly mode: ProxyMode;
  setMode(mode: ProxyMode): void;
  /** Stops listening and destroys every open connection. Safe to call more than once. */
  close(): Promise<void>;
}

interface Connection {
  client: Socket;
  upstream: Socket | undefined;
  /** Bytes forwarded server → client. */
  down: number;
  /** Byte count at which a reset/truncate mode next draws for this connection; undefined after a mode change. */
  checkAt: number | undefined;
  /** Chunks held back by a delay, forwarded in order. */
  queue: Promise<void>;
  /** Bytes held back by a delay. */
  waiting: number;
  hold: NodeJS.Timeout | undefined;
}

export async function startFaultProxy(options: FaultProxyOptions): Promise<FaultProxy> {
  const host = options.host ?? '127.0.0.1';
  const holdMs = options.holdMs ?? 600_000;
  let mode: ProxyMode = options.mode ?? { kind: 'pass' };
  let closed: Promise<void> | undefined;
  const stats: FaultProxyStats = { connections: 0, active: 0, resets: 0, truncations: 0, blackholed: 0, bytesUp: 0, bytesDown: 0 };
  const open = new Set<Connection>();
  const timers = new Set<NodeJS.Timeout>();

  const later = (ms: number, fn: () => void): NodeJS.Timeout => {
    const timer = setTimeout(() => {
      timers.delete(timer);
      fn();
    }, ms);
    timers.add(timer);
    return timer;
  };

  const drop = (conn: Connection): void => {
    if (!open.delete(conn)) return;
    stats.active--;
    if (conn.hold) clearTimeout(conn.hold);
    conn.client.destroy();
    conn.upstream?.destroy();
  };

  /**
   * Where in `chunk` a reset/truncate mode strikes this connection, or undefined when it passes
   * whole. Draws once per `afterBytes` crossed.
   */
  const faultOffset = (conn: Connection, m: Extract<ProxyMode, { kind: 'reset' | 'truncate' }>, chunk: Buffer): number | undefined => {
    const step = m.afterBytes ?? 0;
    conn.checkAt ??= conn.down + step;
    while (conn.down + chunk.length > conn.checkAt) {
      const used = m.kind === 'reset' ? stats.resets : stats.truncations;
      if ((m.limit === undefined || used < m.limit) && Math.random() < (m.rate ?? 1)) return conn.checkAt - conn.down;
      conn.checkAt = step > 0 ? conn.checkAt + step : Infinity;
    }
    return undefined;
  };

  /** Forwards a server chunk to the client, or resets / truncates the connection when the mode says so. */
  const down = (conn: Connection, chunk: Buffer): void => {
    const m = mode;
    if (m.kind === 'blackhole') return;
    const at = m.kind === 'reset' || m.kind === 'truncate' ? faultOffset(conn, m, chunk) : undefined;
    if (at !== undefined && (m.kind === 'reset' || m.kind === 'truncate')) {
      const head = chunk.subarray(0, Math.max(0, at));
      conn.down += head.length;
      stats.bytesDown += head.length;
      if (open.delete(conn)) stats.active--;
      conn.upstream?.destroy();
      if (m.kind === 'reset') {
        stats.resets++;
        if (head.length === 0) conn.client.resetAndDestroy();
        // The RST must come after the head has arrived: some TCP stacks (gVisor's) turn a reset
        // with data still in flight into a clean close, which would be a truncation instead.
        else conn.client.write(head, () => setTimeout(() => conn.client.resetAndDestroy(), 20).unref());
      } else {
        stats.truncations++;
        conn.client.end(head);
      }
      return;
    }
    conn.down += chunk.length;
    stats.bytesDown += chunk.length;
    conn.client.write(chunk);
  };

  const up = (conn: Connection, chunk: Buffer): void => {
    if (mode.kind === 'blackhole' || !conn.upstream) return;
    stats.bytesUp += chunk.length;
    conn.upstream.write(chunk);
  };

  /**
   * Runs `forward` now, or `ms` after the chunk arrived when the mode is a delay: latency, not a
   * throttle. Chunks keep their order; the source is paused while more than 1 MiB waits.
   */
  const relay = (conn: Connection, source: Socket, chunk: Buffer, forward: () => void): void => {
    const m = mode;
    if (m.kind !== 'delay' || m.ms <= 0) {
      conn.queue = conn.queue.then(forward);
      return;
    }
    const due = Date.now() + m.ms;
    conn.waiting += chunk.length;
    if (conn.waiting > 1024 * 1024) source.pause();
    conn.queue = conn.queue.then(
      () =>
        new Promise<void>((resolve) => {
          later(Math.max(0, due - Date.now()), () => {
            conn.waiting -= chunk.length;
            if (open.has(conn)) {
              forward();
              if (conn.waiting <= 1024 * 1024) source.resume();
            }
            resolve();
          });
        }),
    );
  };

  const server: Server = createServer({ allowHalfOpen: false }, (client) => {
    if (closed) {
      client.destroy();
      return;
    }
    stats.connections++;
    stats.active++;
    const conn: Connection = { client, upstream: undefined, down: 0, checkAt: undefined, queue: Promise.resolve(), waiting: 0, hold: undefined };
    open.add(conn);
    client.on('error', () => drop(conn));
    client.on('close', () => drop(conn));
    if (mode.kind === 'blackhole') {
      stats.blackholed++;
      // Read and discard, so the client's writes succeed and it waits for an answer that never comes.
      client.on('data', () => undefined);
      conn.hold = later(holdMs, () => drop(conn));
      return;
    }
    const upstream = new Socket();
    conn.upstream = upstream;
    upstream.on('error', () => drop(conn));
    upstream.on('close', () => {
      // Let queued chunks reach the client before closing its side.
      void conn.queue.then(() => {
        if (open.delete(conn)) {
          stats.active--;
          conn.client.end();
        }
      });
    });
    upstream.on('data', (chunk: Buffer) => relay(conn, upstream, chunk, () => open.has(conn) && down(conn, chunk)));
    client.on('data', (chunk: Buffer) => relay(conn, client, chunk, () => open.has(conn) && up(conn, chunk)));
    client.on('end', () => void conn.queue.then(() => upstream.end()));
    upstream.connect(options.target.port, options.target.host);
  });
  server.maxConnections = options.maxConnections ?? 512;

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  // A proxy a test forgot to close must not keep the process alive.
  server.unref();
  const port = (server.address() as AddressInfo).port;

  return {
    host,
    port,
    address: `${host}:${port}`,
    stats,
    get mode() {
      return mode;
    },
    setMode(next: ProxyMode) {
      mode = next;
      for (const conn of open) conn.checkAt = undefined;
    },
    close() {
      closed ??= new Promise<void>((resolve) => {
        for (const timer of timers) clearTimeout(timer);
        timers.clear();
        for (const conn of [...open]) drop(conn);
        server.close(() => resolve());
      });
      return closed;
    },
  };
}
