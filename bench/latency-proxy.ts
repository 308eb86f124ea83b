/**
 * A TCP proxy that makes a loopback S3 endpoint behave like one across a network link: every
 * chunk of bytes from the client to the server is held for `delayMs` before it is forwarded, and
 * every new connection waits `delayMs` before it is connected upstream (the handshake's round
 * trip). Each request therefore costs at least one `delayMs` round trip more, a new connection two;
 * bandwidth is not limited. Order within a connection is kept.
 *
 * Standalone: node dist/bench/latency-proxy.js --target 127.0.0.1:7480 --delay-ms 20 [--port 0]
 */
import { createServer, connect, type Socket } from 'node:net';
import { pathToFileURL } from 'node:url';
import { parseFlags } from './common.js';

export interface LatencyProxy {
  /** `http://127.0.0.1:<port>` */
  endpoint: string;
  port: number;
  stats: { connections: number; chunks: number; bytes: number };
  stop(): Promise<void>;
}

/** Bytes held per direction before the sending side is paused (backpressure). */
const MAX_QUEUED_BYTES = 4 * 1024 * 1024;

export async function startLatencyProxy(options: { targetHost: string; targetPort: number; delayMs: number; port?: number }): Promise<LatencyProxy> {
  const stats = { connections: 0, chunks: 0, bytes: 0 };
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    stats.connections++;
    sockets.add(client);
    client.setNoDelay(true);
    client.pause();
    const held: Array<{ chunk: Buffer; arrived: number }> = [];
    // Bytes sent before the upstream exists are kept and delayed like the rest.
    const early = (chunk: Buffer): void => void held.push({ chunk, arrived: performance.now() });
    client.on('data', early);
    client.resume();
    setTimeout(() => {
      if (client.destroyed) return;
      const upstream = connect(options.targetPort, options.targetHost);
      sockets.add(upstream);
      upstream.setNoDelay(true);
      const closeBoth = (): void => {
        client.destroy();
        upstream.destroy();
        sockets.delete(client);
        sockets.delete(upstream);
      };
      client.on('error', closeBoth);
      upstream.on('error', closeBoth);
      client.on('close', closeBoth);
      upstream.on('close', closeBoth);
      client.off('data', early);
      delayedPipe(client, upstream, options.delayMs, held, stats);
      upstream.pipe(client);
    }, options.delayMs);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    port,
    stats,
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Forwards `from` to `to`, each chunk `delayMs` after it arrived, in order, with backpressure. */
function delayedPipe(from: Socket, to: Socket, delayMs: number, early: Array<{ chunk: Buffer; arrived: number }>, stats: LatencyProxy['stats']): void {
  const queue: Array<{ due: number; chunk: Buffer }> = [];
  let queued = 0;
  let timer: NodeJS.Timeout | undefined;
  let ended = false;
  let blocked = false;
  const release = (): void => {
    timer = undefined;
    const now = performance.now();
    while (queue.length > 0 && queue[0]!.due <= now + 0.5) {
      const { chunk } = queue.shift()!;
      queued -= chunk.length;
      if (!to.write(chunk) && !blocked) {
        blocked = true;
        to.once('drain', () => {
          blocked = false;
          if (queued < MAX_QUEUED_BYTES) from.resume();
        });
      }
    }
    if (queue.length > 0) timer = setTimeout(release, Math.max(0, queue[0]!.due - performance.now()));
    else if (ended) to.end();
    if (queued < MAX_QUEUED_BYTES && !blocked && from.isPaused()) from.resume();
  };
  const accept = (chunk: Buffer, arrived: number): void => {
    stats.chunks++;
    stats.bytes += chunk.length;
    queue.push({ due: arrived + delayMs, chunk });
    queued += chunk.length;
    if (queued >= MAX_QUEUED_BYTES) from.pause();
    timer ??= setTimeout(release, Math.max(0, queue[0]!.due - performance.now()));
  };
  for (const { chunk, arrived } of early) accept(chunk, arrived);
  from.on('data', (chunk: Buffer) => accept(chunk, performance.now()));
  from.on('end', () => {
    ended = true;
    if (queue.length === 0 && timer === undefined) to.end();
  });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const flags = parseFlags('latency-proxy: a TCP proxy adding latency, for benchmarks', {
    target: { default: '127.0.0.1:7480', help: 'host:port to forward to' },
    'delay-ms': { default: '20', help: 'delay added to every client→server chunk and to every new connection' },
    port: { default: '0', help: 'port to listen on (127.0.0.1); 0 picks a free one' },
  });
  const [host, port] = flags.target.split(':');
  const proxy = await startLatencyProxy({ targetHost: host ?? '127.0.0.1', targetPort: Number(port), delayMs: Number(flags['delay-ms']), port: Number(flags.port) });
  process.stdout.write(`${proxy.endpoint} → ${flags.target}, +${flags['delay-ms']} ms per client→server chunk and per connection\n`);
  process.on('SIGINT', () => void proxy.stop().then(() => process.exit(0)));
}
