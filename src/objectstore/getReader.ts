import { connect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { Readable } from 'node:stream';

/**
 * Object reads (GET) over HTTP/1.1 (plain or TLS) on sockets this module owns, for the one request
 * a copy makes per object that moves its bytes in. Node's HTTP client copies every body chunk out
 * of the socket's buffer (two 64 KiB allocations per read) and runs its parser over every byte.
 * Here successive socket reads land in one pooled 256 KiB buffer (a slab) until it is nearly full,
 * the body is handed on as views of it, and a consumer that has sent a chunk on (the thin PUT of a
 * streamed copy) releases it; a slab whose chunks are all released goes back to the pool, so a
 * steady copy allocates nothing per read.
 *
 * Only two kinds of response are read here: `200` with a `Content-Length` and no
 * `Transfer-Encoding` (streamed), and an error status with a small body of known length or chunked
 * (read whole and answered as a refusal the caller turns into the same error as on the general
 * path). Anything else (a chunked or close-delimited 200, an interim or partial response, a head
 * that is not plain) is answered `undefined` before a byte of its body is handed out, and the
 * caller sends the request again on Node's HTTP client, which handles every case.
 *
 * Node takes the room for a socket's next read from the value its read callback returns; an
 * exception thrown within that callback, or by a tick or microtask that runs before it returns to
 * Node, drops the value and the next read lands in the room of the last, over bytes already handed
 * on. Such an exception ends a pachbackup process (it installs no `uncaughtException` handler), so
 * no byte read afterwards is used; the callback also closes the socket when it throws itself.
 * Whatever embeds this module must not keep running after an uncaught exception.
 */

/**
 * Bytes of one read buffer (a slab): successive socket reads fill it until less than MIN_READ is
 * left. Reads of up to 64 KiB or more (as much as the socket holds, and room allows) keep the
 * reads, and the writes of a streamed copy, as few as with Node's own 64 KiB reads.
 */
const SLAB_SIZE = 256 * 1024;
/** Least room offered to a socket read. (A TLS read gives one record, 16 KiB at most: RFC 8446 §5.1.) */
const MIN_READ = 64 * 1024;
/** Longest response head read before the response is left to the general path. */
const MAX_HEAD = 32 * 1024;
/** Slabs kept for reuse (16 MiB); more are dropped to the garbage collector. */
const MAX_FREE = 64;
/** Longest error body read here; a longer one is left to the general path. */
const MAX_ERROR_BODY = 64 * 1024;
/** Idle keep-alive sockets kept. */
const MAX_IDLE = 64;
/** An idle socket unused this long is closed (servers close theirs after about a minute). */
const IDLE_MS = 15_000;

/**
 * Set on a chunk of a body read here: called once the caller no longer needs the chunk's bytes
 * (a socket write of it completed), it ends the chunk's hold on its slab, which goes back to the
 * pool when no chunk holds it. A consumer that keeps chunks, or does not know this, never calls
 * it; the slab is then collected with them.
 */
export const RELEASE = Symbol('pachbackup.releaseChunk');
export type ReleasableChunk = Buffer & { [RELEASE]?: () => void };

export interface GetReaderOptions {
  hostname: string;
  port: number;
  connectionTimeoutMs: number;
  /** No bytes for this long, before or within the body, fails the read. */
  requestTimeoutMs: number;
  /** HTTPS: TLS options (`{}` for Node's defaults, as its HTTPS agent uses); undefined for plain HTTP. */
  tls?: ConnectionOptions;
}

/** What a read gave: a body to stream, a refusal (an error status and its body's text), or undefined for a response left to the general path. */
export type GetResult = { body: Readable } | { status: number; statusMessage: string; text: string } | undefined;

/** Thrown for a failure of the exchange itself (connection, timeout); shaped by the caller. */
export class GetReadError extends Error {
  constructor(
    message: string,
    readonly code: string,
    /** The HTTP status, when the failure came within an error response. */
    readonly status?: number,
  ) {
    super(message);
    this.name = code === 'ETIMEDOUT' ? 'TimeoutError' : 'Error';
  }
}

class BufferPool {
  readonly #free: Buffer[] = [];
  take(): Buffer {
    return this.#free.pop() ?? Buffer.allocUnsafeSlow(SLAB_SIZE);
  }
  give(buffer: Buffer): void {
    if (this.#free.length < MAX_FREE) this.#free.push(buffer);
  }
}

/**
 * One pool buffer that a connection's reads fill one after another. Every body chunk handed out
 * as a view of it is counted; the buffer goes back to the pool once the connection has moved on
 * to another slab and every chunk was released. A chunk a consumer keeps is never released, and
 * its slab is then left to the garbage collector with it. (A consumer that keeps every chunk thus
 * holds at most 4/3 of the bytes: a slab is left when less than MIN_READ, a quarter, is free.)
 */
class Slab {
  /** Bytes of the buffer the reads have filled. */
  used = 0;
  #held = 0;
  #retired = false;
  constructor(
    readonly buffer: Buffer,
    readonly pool: BufferPool,
  ) {}

  /** Counts one more chunk viewing this slab; returns its release, which counts only once. */
  hold(): () => void {
    this.#held++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (--this.#held === 0 && this.#retired) this.pool.give(this.buffer);
    };
  }

  /** The connection reads no more into it. */
  retire(): void {
    if (this.#retired) return;
    this.#retired = true;
    if (this.#held === 0) this.pool.give(this.buffer);
  }
}

/** What a connection's reads go to: the exchange in progress, or nothing while idle. */
interface ReadTarget {
  /** `length` bytes read into `buffer` (a view of `slab` from where the read began). Returns false to stop reading until resumed. */
  onBytes(buffer: Buffer, length: number, slab: Slab): boolean;
  /** The connection closed, or was idle too long (`timedOut`). */
  onEnd(err: Error | undefined, timedOut?: boolean): void;
}

/** One keep-alive socket, its reads dispatched to the exchange that owns it. */
class Connection {
  readonly socket: Socket;
  target: ReadTarget | undefined;
  idleTimer: NodeJS.Timeout | undefined;
  /** Whether an exchange completed on it (a failure before any response byte may be a stale keep-alive socket). */
  used = false;
  /** Told when the socket has closed (the pool drops it from its idle list). */
  onClosed: (() => void) | undefined;
  #error: Error | undefined;

  /** Serves no more exchanges: nothing further is dispatched, and the socket closes. */
  drop(): void {
    this.target = undefined;
    this.socket.destroy();
  }

  /** The slab the socket reads into now. */
  #slab: Slab;

  constructor(pool: BufferPool, options: GetReaderOptions) {
    this.#slab = new Slab(pool.take(), pool);
    const onread = {
      // Called for the room of each next read: the rest of the slab, or a fresh slab when little is left.
      buffer: () => {
        if (this.#slab.buffer.length - this.#slab.used < MIN_READ) {
          this.#slab.retire();
          this.#slab = new Slab(pool.take(), pool);
        }
        return this.#slab.buffer.subarray(this.#slab.used);
      },
      callback: (length: number, buffer: Uint8Array) => {
        const slab = this.#slab;
        slab.used += length;
        const target = this.target;
        if (!target) {
          // Bytes while idle: nothing was asked, so the connection is out of step. Close it.
          this.socket.destroy();
          return false;
        }
        try {
          return target.onBytes(buffer as Buffer, length, slab);
        } catch (err) {
          // A consumer's listener threw within the push: Node then asks no next room, and the socket
          // would read into the view just handed out. Close it before the error goes on.
          this.socket.destroy();
          throw err;
        }
      },
    };
    const { hostname: host, port, tls } = options;
    // TLS: the host name checked against the certificate and sent for SNI, unless the endpoint is an address.
    // (Node's TLS sockets take `onread` as its plain ones do; its type declarations omit it.)
    const secure: (ConnectionOptions & { onread: typeof onread }) | undefined = tls && { ...tls, host, port, ...(isIP(host) ? {} : { servername: host }), onread };
    this.socket = secure ? tlsConnect(secure).setNoDelay(true) : connect({ host, port, noDelay: true, onread });
    // Every failure comes to 'close'; the error, if any, is told then.
    this.socket.on('error', (err) => (this.#error ??= err));
    this.socket.on('timeout', () => this.target?.onEnd(undefined, true));
    this.socket.once('end', () => this.socket.destroy());
    this.socket.once('close', () => {
      clearTimeout(this.idleTimer);
      this.#slab.retire();
      this.onClosed?.();
      const target = this.target;
      this.target = undefined;
      target?.onEnd(this.#error);
    });
  }
}

/** A pool of keep-alive connections to one host, and the buffers their reads land in. */
export class GetReader {
  readonly #buffers = new BufferPool();
  readonly #idle: Connection[] = [];

  constructor(readonly options: GetReaderOptions) {}

  /**
   * Sends `head` (a whole GET request: request line, headers, blank line) and resolves with the
   * body once a `200` response with a `Content-Length` arrived, with the refusal once an error
   * status and its (small) body arrived, or with undefined when the response is of another kind
   * (see the module's comment). Rejects when the exchange fails.
   */
  async get(head: string, what: string, signal?: AbortSignal): Promise<GetResult> {
    const reused = this.#takeIdle();
    try {
      return await this.#exchange(reused ?? new Connection(this.#buffers, this.options), head, what, signal);
    } catch (err) {
      // A kept-alive socket the server had closed fails before any byte of the answer: once more on a new one.
      if (reused && err instanceof StaleConnection) return this.#exchange(new Connection(this.#buffers, this.options), head, what, signal);
      throw err instanceof StaleConnection ? err.failure : err;
    }
  }

  /** Closes the idle connections (those in use close when their bodies end). */
  close(): void {
    for (const conn of this.#idle.splice(0)) {
      clearTimeout(conn.idleTimer);
      conn.socket.destroy();
    }
  }

  #takeIdle(): Connection | undefined {
    for (let conn = this.#idle.pop(); conn; conn = this.#idle.pop()) {
      clearTimeout(conn.idleTimer);
      conn.onClosed = undefined;
      if (!conn.socket.destroyed) {
        conn.socket.ref();
        return conn;
      }
    }
    return undefined;
  }

  /** A body read to its end on a keep-alive response: the connection waits for the next request. */
  #release(conn: Connection): void {
    conn.target = undefined;
    conn.used = true;
    conn.socket.setTimeout(0);
    if (conn.socket.destroyed || this.#idle.length >= MAX_IDLE) {
      conn.drop();
      return;
    }
    conn.socket.unref();
    // Reading on while idle: bytes out of turn, or the server closing, close it at once. (Reading may
    // have stopped within the body's last read: a TLS read hands on several records, and one that
    // the consumer could not take stops the socket while the rest still arrive.)
    conn.socket.resume();
    conn.onClosed = () => {
      const at = this.#idle.indexOf(conn);
      if (at >= 0) this.#idle.splice(at, 1);
    };
    conn.idleTimer = setTimeout(() => conn.socket.destroy(), IDLE_MS);
    conn.idleTimer.unref();
    this.#idle.push(conn);
  }

  #exchange(conn: Connection, head: string, what: string, signal: AbortSignal | undefined): Promise<GetResult> {
    const { socket } = conn;
    const { requestTimeoutMs, connectionTimeoutMs } = this.options;
    return new Promise<GetResult>((resolve, reject) => {
      /** Head bytes gathered (copied) across reads until the blank line. */
      let pending: Buffer | undefined;
      let body: GetBody | undefined;
      /** An error response's body, gathered (copied) to its Content-Length. */
      let refusal: { head: ParsedHead; bytes: Buffer } | undefined;
      let settled = false;
      let connectTimer: NodeJS.Timeout | undefined;
      const settle = (): void => {
        settled = true;
        clearTimeout(connectTimer);
      };
      // An abort fails the request, or breaks the body, until the body has ended.
      const unlisten = (): void => signal?.removeEventListener('abort', onAbort);
      /** The exchange failed: before the head, the promise rejects; within the body, the body breaks. */
      const fail = (err: Error): void => {
        conn.drop();
        if (body) body.broken(err);
        else if (!settled) {
          settle();
          unlisten();
          reject(err);
        }
      };
      /** The response is not one this path reads: undefined, and the caller asks again on the general path. */
      const leave = (): void => {
        conn.drop();
        if (!settled) {
          settle();
          unlisten();
          resolve(undefined);
        }
      };
      const onAbort = (): void => fail(abortError(signal!));
      if (signal?.aborted) {
        fail(abortError(signal));
        return;
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      // No bytes for the request timeout (waiting for the head, or within the body) fails the read.
      socket.setTimeout(requestTimeoutMs);
      if (socket.connecting) {
        connectTimer = setTimeout(() => fail(new GetReadError(`${what}: could not connect within ${connectionTimeoutMs} ms`, 'ETIMEDOUT')), connectionTimeoutMs);
        socket.once('connect', () => clearTimeout(connectTimer));
      }
      /** Bytes of an error response's body (copied); once all are in, the refusal is the answer. */
      const gather = (bytes: Buffer): boolean => {
        const r = refusal!;
        r.bytes = Buffer.concat([r.bytes, bytes]);
        const length = r.head.length;
        const whole = length === undefined ? dechunk(r.bytes) : r.bytes.length >= length ? { text: r.bytes.subarray(0, length), used: length } : undefined;
        if (whole === null || r.bytes.length > MAX_ERROR_BODY + MAX_HEAD) {
          leave();
          return false;
        }
        if (!whole) return true;
        settle();
        unlisten();
        // Bytes past the body: the connection is out of step and closes.
        if (r.head.keepAlive && whole.used === r.bytes.length) this.#release(conn);
        else conn.drop();
        resolve({ status: r.head.status, statusMessage: r.head.statusMessage, text: whole.text.toString('utf8') });
        return true;
      };
      const target: ReadTarget = {
        // Head and error bytes are copied out; only body chunks view (and hold) the slab.
        onBytes: (buffer, length, slab) => {
          if (body) return body.accept(buffer, length, 0, slab);
          if (refusal) return gather(buffer.subarray(0, length));
          let bytes = buffer.subarray(0, length);
          const inSlab = pending === undefined;
          if (pending) bytes = pending = Buffer.concat([pending, bytes]);
          const end = bytes.indexOf('\r\n\r\n');
          if (end < 0) {
            if (bytes.length > MAX_HEAD) leave();
            else pending ??= Buffer.from(bytes);
            return true;
          }
          const parsed = parseHead(bytes.subarray(0, end).toString('latin1'));
          const rest = bytes.subarray(end + 4);
          if (parsed && parsed.status !== 200 && (parsed.length ?? 0) <= MAX_ERROR_BODY) {
            refusal = { head: parsed, bytes: Buffer.alloc(0) };
            return gather(rest);
          }
          // Another response, or more than the body (the connection out of step): left to the general path.
          if (!parsed || parsed.status !== 200 || parsed.length === undefined || rest.length > parsed.length) {
            leave();
            return false;
          }
          const bodyLength = parsed.length;
          settle();
          body = new GetBody(bodyLength, what, conn, () => (parsed.keepAlive ? this.#release(conn) : conn.drop()), unlisten);
          resolve({ body });
          // The body's first bytes: in the slab after the head, or in the head's gathered copy.
          return inSlab ? body.accept(buffer, rest.length, end + 4, slab) : body.accept(rest, rest.length, 0, undefined);
        },
        onEnd: (err, timedOut) => {
          if (refusal) {
            // An error response cut short keeps its status, so a 404 is still "not found".
            const { status } = refusal.head;
            const why = timedOut ? `no bytes for ${requestTimeoutMs} ms` : (err?.message ?? 'the connection closed');
            fail(new GetReadError(`${what}: HTTP ${status}, and the error body broke: ${why}`, timedOut ? 'ETIMEDOUT' : ((err as NodeJS.ErrnoException | undefined)?.code ?? 'ECONNRESET'), status));
          } else if (timedOut) fail(new GetReadError(body ? `${what}: no bytes of the response body for ${requestTimeoutMs} ms` : `${what}: no response within ${requestTimeoutMs} ms`, 'ETIMEDOUT'));
          else if (!body && !settled && conn.used && pending === undefined) {
            settle();
            unlisten();
            reject(new StaleConnection(what, err));
          } else fail(new GetReadError(`${what}: ${err?.message ?? 'the connection closed'}`, (err as NodeJS.ErrnoException | undefined)?.code ?? 'ECONNRESET'));
        },
      };
      conn.target = target;
      socket.write(head, 'latin1');
    });
  }
}

/** A keep-alive socket that failed before any byte of the answer (the server had closed it). */
class StaleConnection extends Error {
  readonly failure: GetReadError;
  constructor(what: string, cause: Error | undefined) {
    super('stale keep-alive connection');
    this.failure = new GetReadError(`${what}: ${cause?.message ?? 'the connection closed'}`, 'ECONNRESET');
  }
}

/** The body of a response: views of the socket's read buffers, `length` bytes in all. */
class GetBody extends Readable {
  #remaining: number;
  #done = false;
  constructor(
    readonly length: number,
    readonly what: string,
    readonly conn: Connection,
    /** The whole body was received on a connection that may serve another request. */
    readonly onComplete: () => void,
    /** The body ended, broke or was left: once. */
    readonly onDone: () => void,
  ) {
    super();
    this.#remaining = length;
  }

  /**
   * Bytes `[start, start + length)` of `buffer`, read from the socket: a view of `slab`, which each
   * chunk handed on holds until released, or (no slab) bytes copied out already. Returns false to
   * stop reading until the consumer asks for more.
   */
  accept(buffer: Buffer, length: number, start: number, slab: Slab | undefined): boolean {
    if (this.#done) return false;
    const taken = Math.min(length, this.#remaining);
    this.#remaining -= taken;
    let more = true;
    if (taken > 0) {
      const chunk: ReleasableChunk = buffer.subarray(start, start + taken);
      if (slab) chunk[RELEASE] = slab.hold();
      more = this.push(chunk);
    }
    if (length > taken) {
      // More than Content-Length: the connection is out of step. The body is what was announced; the connection closes.
      this.conn.drop();
      this.#end(false);
      return false;
    }
    if (this.#remaining === 0) {
      this.#end(true);
      return true;
    }
    return more;
  }

  #end(reuse: boolean): void {
    this.#done = true;
    this.onDone();
    this.push(null);
    if (reuse) this.onComplete();
  }

  /** The connection failed within the body. */
  broken(err: Error): void {
    if (this.#done) return;
    this.#done = true;
    this.onDone();
    const received = this.length - this.#remaining;
    if (err.name === 'AbortError') this.destroy(err);
    else this.destroy(new GetReadError(`${err.message} after ${received} of the body's ${this.length} bytes`, (err as GetReadError).code ?? 'ECONNRESET'));
  }

  override _read(): void {
    if (!this.#done) this.conn.socket.resume();
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    if (!this.#done) {
      // Left before its end: the rest of the body is still on its way, so the connection cannot serve another request.
      this.#done = true;
      this.onDone();
      this.conn.drop();
    }
    callback(err);
  }
}

interface ParsedHead {
  status: number;
  statusMessage: string;
  /** Content-Length; undefined for a chunked body (an error response only). */
  length: number | undefined;
  keepAlive: boolean;
}

/**
 * The head of a response this path reads, or undefined: `200` with a single `Content-Length` and
 * no `Transfer-Encoding`, or an error status (400 and above) with a `Content-Length` or a chunked body.
 */
function parseHead(text: string): ParsedHead | undefined {
  const lines = text.split('\r\n');
  const status = /^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/.exec(lines[0]!);
  const code = Number(status?.[2]);
  if (!status || (code !== 200 && (code < 400 || code > 599))) return undefined;
  let length: number | undefined;
  let keepAlive = status[1] === '1';
  let chunked = false;
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!;
    const colon = line.indexOf(':');
    // A field name is a token right up to its colon (RFC 9112 §5.1: no folded lines, no space before the colon).
    if (colon <= 0 || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(line.slice(0, colon))) return undefined;
    const name = line.slice(0, colon).toLowerCase();
    const value = line.slice(colon + 1).trim();
    if (name === 'content-length') {
      if (!/^\d{1,15}$/.test(value) || (length !== undefined && length !== Number(value))) return undefined;
      length = Number(value);
    } else if (name === 'transfer-encoding') {
      if (code === 200 || value.toLowerCase() !== 'chunked') return undefined;
      chunked = true;
    }
    else if (name === 'connection') {
      const tokens = value.toLowerCase().split(',').map((t) => t.trim());
      if (tokens.includes('close')) keepAlive = false;
      else if (tokens.includes('keep-alive')) keepAlive = true;
    }
  }
  // Both, or neither: the body's end is unclear (RFC 9112 §6.3); left to the general path.
  if (chunked === (length !== undefined)) return undefined;
  return { status: code, statusMessage: status[3] ?? '', length, keepAlive };
}

/**
 * A chunked body (RFC 9112 §7.1) decoded: its bytes and how many bytes of `raw` it took (the
 * trailers included), undefined while incomplete, null when malformed.
 */
export function dechunk(raw: Buffer): { text: Buffer; used: number } | undefined | null {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const eol = raw.indexOf('\r\n', at);
    if (eol < 0) return raw.length - at > 1024 ? null : undefined;
    const sizeField = /^([0-9a-fA-F]{1,8})(?:[ \t]*;.*)?$/.exec(raw.subarray(at, eol).toString('latin1'));
    if (!sizeField) return null;
    const size = parseInt(sizeField[1]!, 16);
    at = eol + 2;
    if (size === 0) {
      // Trailer lines up to an empty line.
      for (;;) {
        const end = raw.indexOf('\r\n', at);
        if (end < 0) return undefined;
        const empty = end === at;
        at = end + 2;
        if (empty) return { text: Buffer.concat(parts), used: at };
      }
    }
    if (raw.length < at + size + 2) return undefined;
    if (raw[at + size] !== 0x0d || raw[at + size + 1] !== 0x0a) return null;
    parts.push(raw.subarray(at, at + size));
    at += size + 2;
  }
}

function abortError(signal: AbortSignal): Error {
  const reason = signal.reason as unknown;
  const err = new Error(`the request was aborted${reason instanceof Error ? `: ${reason.message}` : ''}`, { cause: reason });
  err.name = 'AbortError';
  return err;
}
