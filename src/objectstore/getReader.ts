import { connect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { Readable } from 'node:stream';

/**
 * Object reads (GET) over HTTP/1.1 (plain or TLS) on sockets this module owns, for the one request a copy
 * makes per object that moves its bytes in. Node's HTTP client copies every body chunk out of the
 * socket's buffer (two 64 KiB allocations per read) and runs its parser over every byte; here each
 * socket read lands in a buffer taken from a pool, the body is handed on as a view of it, and a
 * consumer that has sent the chunk on (the thin PUT of a streamed copy) gives the buffer back, so
 * a steady copy allocates nothing per read.
 *
 * Only the response this path was built for is read here: `200` with a `Content-Length` and no
 * `Transfer-Encoding`. Anything else (an error status, a chunked or close-delimited body, an
 * interim response) is answered `undefined` before a byte of its body is handed out, and the caller
 * sends the request again on Node's HTTP client, which handles every case; an error therefore
 * reaches the user exactly as on the general path.
 */

/** Bytes per socket read on plain HTTP (as Node's own). */
const READ_SIZE = 64 * 1024;
/** Bytes per read on TLS: one record's plaintext at most (RFC 8446 §5.1), which is what each read gives. */
const TLS_READ_SIZE = 16 * 1024;
/** Longest response head read before the response is left to the general path. */
const MAX_HEAD = 32 * 1024;
/** Buffers kept for reuse (16 MiB); more are dropped to the garbage collector. */
const MAX_FREE = 256;
/** Longest error body read here; a longer one is left to the general path. */
const MAX_ERROR_BODY = 64 * 1024;
/** Idle keep-alive sockets kept. */
const MAX_IDLE = 64;
/** An idle socket unused this long is closed (servers close theirs after about a minute). */
const IDLE_MS = 15_000;

/**
 * Set on a chunk of a body read here: called once the caller no longer needs the chunk's bytes
 * (a socket write of it completed), it returns the chunk's buffer for the next socket read. A
 * consumer that keeps chunks, or does not know this, never calls it; the buffer is then collected.
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
  constructor(readonly size: number) {}
  take(): Buffer {
    return this.#free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }
  give(buffer: Buffer): void {
    if (this.#free.length < MAX_FREE) this.#free.push(buffer);
  }
}

/** What a connection's reads go to: the exchange in progress, or nothing while idle. */
interface ReadTarget {
  /** Bytes read into `buffer` (a pool buffer). Returns false to stop reading until resumed. */
  onBytes(buffer: Buffer, length: number): boolean;
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

  constructor(
    readonly pool: BufferPool,
    options: GetReaderOptions,
  ) {
    const onread = {
      // Called for the buffer of each next read: the one just read may be on its way out in a chunk.
      buffer: () => pool.take(),
      callback: (length: number, buffer: Uint8Array) => {
        const target = this.target;
        if (!target) {
          // Bytes while idle: nothing was asked, so the connection is out of step. Close it.
          this.socket.destroy();
          return false;
        }
        return target.onBytes(buffer as Buffer, length);
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
      this.onClosed?.();
      const target = this.target;
      this.target = undefined;
      target?.onEnd(this.#error);
    });
  }
}

/** A pool of keep-alive connections to one host, and the buffers their reads land in. */
export class GetReader {
  readonly #buffers: BufferPool;
  readonly #idle: Connection[] = [];

  constructor(readonly options: GetReaderOptions) {
    this.#buffers = new BufferPool(options.tls ? TLS_READ_SIZE : READ_SIZE);
  }

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
      conn.socket.destroy();
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
        conn.target = undefined;
        socket.destroy();
        if (body) body.broken(err);
        else if (!settled) {
          settle();
          unlisten();
          reject(err);
        }
      };
      /** The response is not one this path reads: undefined, and the caller asks again on the general path. */
      const leave = (): void => {
        conn.target = undefined;
        socket.destroy();
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
        else {
          conn.target = undefined;
          socket.destroy();
        }
        resolve({ status: r.head.status, statusMessage: r.head.statusMessage, text: whole.text.toString('utf8') });
        return true;
      };
      const target: ReadTarget = {
        onBytes: (buffer, length) => {
          if (body) return body.accept(buffer, length);
          if (refusal) {
            const more = gather(buffer.subarray(0, length));
            conn.pool.give(buffer);
            return more;
          }
          let bytes = buffer.subarray(0, length);
          let ownsBuffer = pending === undefined;
          if (pending) bytes = pending = Buffer.concat([pending, bytes]);
          const end = bytes.indexOf('\r\n\r\n');
          if (end < 0) {
            if (bytes.length > MAX_HEAD) leave();
            else pending ??= Buffer.from(bytes);
            conn.pool.give(buffer);
            return true;
          }
          const parsed = parseHead(bytes.subarray(0, end).toString('latin1'));
          const rest = bytes.subarray(end + 4);
          if (parsed && parsed.status !== 200 && (parsed.length ?? 0) <= MAX_ERROR_BODY) {
            refusal = { head: parsed, bytes: Buffer.alloc(0) };
            const more = gather(rest);
            conn.pool.give(buffer);
            return more;
          }
          // Another response, or more than the body (the connection out of step): left to the general path.
          if (!parsed || parsed.status !== 200 || parsed.length === undefined || rest.length > parsed.length) {
            leave();
            return false;
          }
          const bodyLength = parsed.length;
          settle();
          body = new GetBody(bodyLength, what, conn, () => (parsed.keepAlive ? this.#release(conn) : socket.destroy()), unlisten);
          resolve({ body });
          if (!ownsBuffer) {
            conn.pool.give(buffer);
            return body.accept(rest, rest.length, 0, false);
          }
          return body.accept(buffer, rest.length, end + 4, true);
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
            reject(new StaleConnection(err));
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
  constructor(cause: Error | undefined) {
    super('stale keep-alive connection');
    this.failure = new GetReadError(cause?.message ?? 'the connection closed', 'ECONNRESET');
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
   * Bytes `[start, start + length)` of `buffer`, read from the socket. With `releasable`, the
   * buffer is a pool buffer that the chunk may give back. Returns false to stop reading until the
   * consumer asks for more.
   */
  accept(buffer: Buffer, length: number, start = 0, releasable = true): boolean {
    if (this.#done) return false;
    if (length > this.#remaining) {
      // More than Content-Length: the connection is out of step. The body is what was announced; the connection closes.
      const chunk = buffer.subarray(start, start + this.#remaining);
      this.#remaining = 0;
      this.conn.target = undefined;
      this.conn.socket.destroy();
      if (chunk.length > 0) this.push(chunk);
      this.#end(false);
      return false;
    }
    this.#remaining -= length;
    let more = true;
    if (length > 0) {
      let chunk: ReleasableChunk = buffer.subarray(start, start + length);
      if (releasable && length < buffer.length / 2) {
        // A short read (a slow link, the tail of a body) is copied out, and its buffer goes straight
        // back: a consumer that keeps chunks (a whole-file read) must not hold a pool buffer per read.
        chunk = Buffer.from(chunk);
        this.conn.pool.give(buffer);
      } else if (releasable) {
        const pool = this.conn.pool;
        let given = false;
        chunk[RELEASE] = () => {
          if (given) return;
          given = true;
          pool.give(buffer);
        };
      }
      more = this.push(chunk);
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
      this.conn.target = undefined;
      this.conn.socket.destroy();
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
