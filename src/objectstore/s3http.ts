import { createHash, createHmac, type Hash, type Hmac } from 'node:crypto';
import { request as httpRequest, type Agent as HttpAgent, type IncomingHttpHeaders, type IncomingMessage, type OutgoingHttpHeaders } from 'node:http';
import { request as httpsRequest, type Agent as HttpsAgent } from 'node:https';
import { isIP } from 'node:net';
import type { SecureContext } from 'node:tls';
import type { Readable } from 'node:stream';
import { SignatureV4 } from '@smithy/signature-v4';
import { GetReader, RELEASE, type GetResult, type ReleasableChunk } from './getReader.js';
import type { SourceData } from '@smithy/types';

/**
 * A thin signed-HTTP path for the S3 requests a copy makes per object (GET, PUT, HEAD, and
 * CopyObject), about half the client CPU of an SDK request: node:http on the store's keep-alive
 * agents, signed with AWS Signature Version 4 here. Errors are thrown in the shape of the SDK's
 * service exceptions (`name` = the S3 error code, `$metadata.httpStatusCode`), so the store maps
 * them to NotFoundError, PreconditionFailedError and retryable StoreErrors exactly as it maps the
 * SDK's. Listing, multipart uploads and deletes stay on the SDK.
 */

export interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface S3HttpOptions {
  /** `http(s)://host[:port][/base]`; undefined: AWS S3 in `region`. */
  endpoint?: string;
  bucket: string;
  region: string;
  forcePathStyle: boolean;
  /** Called per request; must cache (the SDK's credential providers do). */
  credentials: () => Promise<Credentials>;
  httpAgent: HttpAgent;
  httpsAgent: HttpsAgent;
  /** Silence on the socket this long (no byte of the request body taken, no answer, no byte of the answer's body), or an answer's head not whole this long after its first byte: the request fails with a TimeoutError. */
  requestTimeoutMs: number;
  connectionTimeoutMs: number;
  /** The TLS context of the https agent (a private CA), for the own reader's connections too. */
  secureContext?: SecureContext;
  /**
   * Object reads on this module's own sockets (getReader.ts) instead of Node's HTTP client: the
   * same requests, a fraction of the client CPU. Default on; `PACHBACKUP_OBJECT_READS=node` turns
   * it off for every store.
   */
  ownReads?: boolean;
}

export interface S3HttpRequest {
  method: 'GET' | 'PUT' | 'HEAD';
  /** The full object key (the store prefix included), unencoded; '' for the bucket itself (a listing). */
  key: string;
  /** Query parameters, unencoded. */
  query?: Record<string, string>;
  headers?: Record<string, string>;
  body?: Buffer | Readable;
  /** Required with a stream body: it is sent as Content-Length, and a stream that ends short or runs long fails the request. */
  contentLength?: number;
  signal?: AbortSignal;
}

/** A response header-complete; the body is left to the caller for 2xx, drained for errors. */
export type S3HttpResponse = IncomingMessage;

/** Payload hash sent for stream bodies, whose bytes are not known before they are sent. */
const UNSIGNED_PAYLOAD = 'UNSIGNED-PAYLOAD';

function bytesOf(data: SourceData): string | Uint8Array {
  return typeof data === 'string' || data instanceof Uint8Array ? data : ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data);
}

/** node:crypto in the hash interface the SDK's signer takes (SHA-256, or HMAC-SHA-256 with a secret). */
class NodeSha256 {
  readonly #hash: Hash | Hmac;
  constructor(secret?: SourceData) {
    this.#hash = secret === undefined ? createHash('sha256') : createHmac('sha256', bytesOf(secret));
  }
  update(data: SourceData): void {
    this.#hash.update(bytesOf(data));
  }
  async digest(): Promise<Uint8Array> {
    return this.#hash.digest();
  }
}
const EMPTY_SHA256 = createHash('sha256').digest('hex');
/** Keys made only of characters SigV4 leaves unencoded (and '/'). */
const PLAIN_KEY = /^[A-Za-z0-9\-._~/]*$/;
/** Bytes of a stream body buffered for sending before its producer is paused. */
const PUT_BUFFER = 1024 * 1024;
/** Longest error body read to find the S3 error code. */
const MAX_ERROR_BODY = 64 * 1024;

/** Error shaped like the SDK's service exceptions, so one classification serves both paths. */
export class S3HttpError extends Error {
  readonly $metadata: { httpStatusCode?: number };
  readonly code: string | undefined;
  /** The bucket's region, when the error's body names it (`<Region>`), as the SDK's errors carry it. */
  readonly Region: string | undefined;
  /** The service's time, when the error's body gives it (RequestTimeTooSkewed), as the SDK's errors carry it. */
  readonly ServerTime: string | undefined;
  /** The error response's headers (`x-amz-bucket-region`, `date`), where they were read, as the SDK's errors carry them. */
  readonly $response: { headers: Record<string, string | undefined> } | undefined;
  constructor(name: string, message: string, status?: number, options?: { cause?: unknown; code?: string; region?: string; serverTime?: string; headers?: Record<string, string | undefined> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = name;
    this.$metadata = status === undefined ? {} : { httpStatusCode: status };
    this.code = options?.code;
    this.Region = options?.region;
    this.ServerTime = options?.serverTime;
    this.$response = options?.headers ? { headers: options.headers } : undefined;
  }
}

export class S3Http {
  readonly #secure: boolean;
  readonly #hostname: string;
  /** The host to connect to: the hostname, an IPv6 address without its brackets. */
  readonly #connectHost: string;
  readonly #port: number | undefined;
  /** The Host header: hostname, with the port when it is not the scheme's default. */
  readonly #host: string;
  /** Everything before the encoded key in the request path: base path, and `/bucket` in path style. */
  readonly #pathPrefix: string;
  readonly #signer: SignatureV4;
  /** Object reads on own sockets, when on. */
  readonly #reader: GetReader | undefined;

  constructor(readonly options: S3HttpOptions) {
    const url = new URL(options.endpoint ?? `https://s3.${options.region}.amazonaws.com`);
    this.#secure = url.protocol === 'https:';
    const basePath = url.pathname.replace(/\/+$/, '');
    // Virtual-host style only where the bucket is a valid DNS label (with TLS, one without dots), as the SDK does.
    // (An endpoint given as an IP address, v4 or v6, is always path style, as the SDK does.)
    const bare = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const virtualHost = !options.forcePathStyle && /^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/.test(options.bucket) && isIP(bare) === 0;
    this.#hostname = virtualHost ? `${options.bucket}.${url.hostname}` : url.hostname;
    this.#connectHost = virtualHost ? this.#hostname : bare;
    this.#port = url.port ? Number(url.port) : undefined;
    this.#host = url.port ? `${this.#hostname}:${url.port}` : this.#hostname;
    this.#pathPrefix = virtualHost ? basePath : `${basePath}/${uriEncode(options.bucket)}`;
    this.#reader =
      options.ownReads !== false
        ? new GetReader({
            hostname: this.#connectHost,
            port: this.#port ?? (this.#secure ? 443 : 80),
            connectionTimeoutMs: options.connectionTimeoutMs,
            requestTimeoutMs: options.requestTimeoutMs,
            ...(this.#secure ? { tls: options.secureContext ? { secureContext: options.secureContext } : {} } : {}),
          })
        : undefined;
    this.#signer = new SignatureV4({ service: 's3', region: options.region, credentials: options.credentials, sha256: NodeSha256, uriEscapePath: false, applyChecksum: false });
  }

  /** The encoded request path of `key`: every segment URI-encoded per SigV4, '/' kept. */
  pathOf(key: string): string {
    if (key === '') return this.#pathPrefix || '/';
    // Chunk keys need no encoding: skip the per-segment work for them.
    return `${this.#pathPrefix}/${PLAIN_KEY.test(key) ? key : key.split('/').map(uriEncode).join('/')}`;
  }

  /**
   * Sends one request and resolves with its response once the headers arrived and the status is
   * 2xx (304 included for conditional reads); any other status rejects with an S3HttpError that
   * carries the S3 error code, after the error body was read (so the socket is reused).
   */
  async send(req: S3HttpRequest): Promise<S3HttpResponse> {
    const { path, headers, length } = await this.#prepare(req);
    return this.#exchange(req, path, headers, length);
  }

  /**
   * Reads object `key` (the store prefix included): its body, once a 2xx response arrived; errors
   * as `send`. The read goes through the own reader (getReader.ts) when it is on, and only a
   * response that reader leaves (a chunked or close-delimited 200, an interim answer) is asked
   * again through `send`'s path.
   */
  async getObject(key: string, signal?: AbortSignal): Promise<Readable> {
    const req: S3HttpRequest = { method: 'GET', key, ...(signal ? { signal } : {}) };
    const { path, headers, length } = await this.#prepare(req);
    if (this.#reader) {
      let read: GetResult;
      try {
        read = await this.#reader.get(requestHead('GET', path, headers), `GET ${key}`, signal);
      } catch (err) {
        if (signal?.aborted) throw abortError(signal);
        const { name, message, code, status } = err as Error & { code?: string; status?: number };
        throw new S3HttpError(name, message, status, { cause: err, ...(code ? { code } : {}) });
      }
      if (read && 'body' in read) return read.body;
      if (read) throw errorFromResponse(req, read.status, read.statusMessage, read.text);
    }
    return this.#exchange(req, path, headers, length);
  }

  /** Closes idle connections of the own reader (Node's agents close theirs themselves). */
  close(): void {
    this.#reader?.close();
  }

  /** The signed request: encoded path with its query, headers, body length. */
  async #prepare(req: S3HttpRequest): Promise<{ path: string; headers: OutgoingHttpHeaders; length: number | undefined }> {
    const path = this.pathOf(req.key);
    const payloadHash = req.body === undefined ? EMPTY_SHA256 : Buffer.isBuffer(req.body) ? createHash('sha256').update(req.body).digest('hex') : UNSIGNED_PAYLOAD;
    const unsigned: Record<string, string> = { host: this.#host, 'x-amz-content-sha256': payloadHash };
    if (req.headers) for (const name in req.headers) unsigned[name.toLowerCase()] = String(req.headers[name]);
    // SigV4 by the SDK's own signer: the path is already encoded per segment (S3 signs it as sent).
    const signed = await this.#signer.sign({ method: req.method, protocol: this.#secure ? 'https:' : 'http:', hostname: this.#hostname, path, query: req.query ?? {}, headers: unsigned });
    const headers: OutgoingHttpHeaders = { ...signed.headers };
    const query = req.query
      ? Object.keys(req.query)
          .sort()
          .map((name) => `${uriEncode(name)}=${uriEncode(req.query![name]!)}`)
          .join('&')
      : '';
    const length = Buffer.isBuffer(req.body) ? req.body.length : req.contentLength;
    if (length !== undefined) headers['content-length'] = length;
    else if (req.body !== undefined) throw new S3HttpError('MissingContentLength', `${req.method} ${req.key}: a stream body needs a known length`);
    return { path: query ? `${path}?${query}` : path, headers, length };
  }

  #exchange(req: S3HttpRequest, path: string, headers: OutgoingHttpHeaders, length: number | undefined): Promise<S3HttpResponse> {
    const { signal } = req;
    return new Promise<S3HttpResponse>((resolve, reject) => {
      if (signal?.aborted) {
        reject(abortError(signal));
        return;
      }
      let settled = false;
      /** The response, once its head arrived. */
      let response: IncomingMessage | undefined;
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        outgoing.destroy();
        reject(err);
      };
      const options = {
        method: req.method,
        hostname: this.#connectHost,
        ...(this.#port ? { port: this.#port } : {}),
        path,
        headers,
        agent: this.#secure ? this.options.httpsAgent : this.options.httpAgent,
      };
      const outgoing = (this.#secure ? httpsRequest : httpRequest)(options, (res) => {
        if (settled) {
          res.destroy();
          return;
        }
        settled = true;
        response = res;
        const status = res.statusCode ?? 0;
        if (status >= 200 && status < 300) {
          resolve(res);
          return;
        }
        // A refusal may come before a stream body was sent whole: stop sending it once the error is read.
        const stop = (): void => void (outgoing.writableFinished ? undefined : outgoing.destroy());
        readSmallBody(res).then(
          (body) => {
            stop();
            reject(errorFromResponse(req, status, res.statusMessage, body, res.headers));
          },
          (err: Error) => {
            stop();
            reject(new S3HttpError(err.name, `${req.method} ${req.key}: HTTP ${status}, and the error body broke: ${err.message}`, status, { cause: err }));
          },
        );
      });
      // The request timeout bounds silence on the socket, as the SDK's does: no byte of the request
      // body taken (a stalled source, a server that stopped reading), no response to a request sent
      // whole (a server that accepts and never answers), no byte of a response body. A body that
      // takes longer than that to send or receive, bytes flowing all along, is no timeout.
      const timeoutMs = this.options.requestTimeoutMs;
      outgoing.setTimeout(timeoutMs, () => {
        const why = response ? `no bytes of the response body for ${timeoutMs} ms` : outgoing.writableFinished ? `no response within ${timeoutMs} ms` : `the socket took no byte of the request body for ${timeoutMs} ms`;
        const err = new S3HttpError('TimeoutError', `${req.method} ${req.key}: ${why}`, undefined, { code: 'ETIMEDOUT' });
        if (response) response.destroy(err);
        else fail(err);
      });
      // Silence alone would let a server that trickles its headers, a byte now and then, hold the
      // request for ever (Node takes 16 KiB of them): an answer begun has its head whole within the timeout.
      let headTimer: NodeJS.Timeout | undefined;
      outgoing.once('socket', (socket) => {
        const onFirstByte = (): void => {
          if (settled) return;
          headTimer = setTimeout(
            () => fail(new S3HttpError('TimeoutError', `${req.method} ${req.key}: the answer's status and headers did not come whole within ${timeoutMs} ms of its first byte`, undefined, { code: 'ETIMEDOUT' })),
            timeoutMs,
          );
        };
        socket.once('data', onFirstByte);
        const done = (): void => {
          socket.off('data', onFirstByte);
          clearTimeout(headTimer);
        };
        outgoing.once('response', done);
        outgoing.once('close', done);
      });
      outgoing.once('socket', (socket) => {
        if (!socket.connecting) return;
        const connectTimer = setTimeout(
          () => fail(new S3HttpError('TimeoutError', `${req.method} ${req.key}: could not connect within ${this.options.connectionTimeoutMs} ms`, undefined, { code: 'ETIMEDOUT' })),
          this.options.connectionTimeoutMs,
        );
        const clear = (): void => clearTimeout(connectTimer);
        socket.once('connect', clear);
        outgoing.once('close', clear);
      });
      outgoing.on('error', (err: NodeJS.ErrnoException) => {
        if (signal?.aborted) fail(abortError(signal));
        else fail(new S3HttpError(err.code === 'ETIMEDOUT' ? 'TimeoutError' : err.name, `${req.method} ${req.key}: ${err.message}`, undefined, { cause: err, ...(err.code ? { code: err.code } : {}) }));
      });
      if (signal) {
        // Before the headers the request fails; after them, the response body breaks with the abort.
        const onAbort = (): void => (settled ? void outgoing.destroy(abortError(signal)) : fail(abortError(signal)));
        signal.addEventListener('abort', onAbort, { once: true });
        outgoing.once('close', () => signal.removeEventListener('abort', onAbort));
      }
      const body = req.body;
      if (body === undefined) outgoing.end();
      else if (Buffer.isBuffer(body)) outgoing.end(body);
      else sendStream(body, outgoing, length ?? 0, (err) => fail(new S3HttpError('RequestBodyError', `${req.method} ${req.key}: ${err.message}`, undefined, { cause: err })));
    });
  }
}

/**
 * Writes a stream body of a declared length. A body that runs past the length or ends short fails
 * at once, instead of sending a corrupt request or leaving the server waiting for the rest.
 */
function sendStream(body: Readable, outgoing: NodeJS.WritableStream & { writableLength: number; write(chunk: Buffer, cb?: (err?: Error | null) => void): boolean }, length: number, fail: (err: Error) => void): void {
  let sent = 0;
  const onData = (chunk: Buffer): void => {
    sent += chunk.length;
    if (sent > length) {
      body.off('data', onData);
      fail(new Error(`the body ran past its declared length of ${length} bytes`));
      return;
    }
    // A chunk of an own read gives its buffer back once the socket has taken it (never after a failed write).
    const release = (chunk as ReleasableChunk)[RELEASE];
    const writing = release ? outgoing.write(chunk, (err?: Error | null) => void (err ? undefined : release())) : outgoing.write(chunk);
    // Keep reading while up to PUT_BUFFER bytes wait to be sent, so the download feeding the body
    // does not stop and start with every 64 KiB the socket has not taken yet.
    if (!writing && outgoing.writableLength >= PUT_BUFFER) {
      body.pause();
      outgoing.once('drain', () => body.resume());
    }
  };
  body.on('data', onData);
  body.once('end', () => {
    if (sent !== length) fail(new Error(`the body ended after ${sent} of its declared ${length} bytes`));
    else outgoing.end();
  });
  body.once('error', (err) => fail(err));
  outgoing.once('close', () => {
    body.off('data', onData);
  });
}

/** Reads a response body (an error, a CopyObject result, a listing page) as text, keeping at most `limit` bytes. */
export async function readSmallBody(res: IncomingMessage, limit = MAX_ERROR_BODY): Promise<string> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of res as AsyncIterable<Buffer>) {
    if (size < limit) chunks.push(chunk);
    size += chunk.length;
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** The text of an XML element's content: entities and character references decoded. */
export function xmlText(raw: string): string {
  if (!raw.includes('&')) return raw;
  return raw.replace(/&(amp|lt|gt|quot|apos|#x[0-9a-fA-F]+|#[0-9]+);/g, (_, entity: string) => {
    switch (entity) {
      case 'amp':
        return '&';
      case 'lt':
        return '<';
      case 'gt':
        return '>';
      case 'quot':
        return '"';
      case 'apos':
        return "'";
      default:
        return String.fromCodePoint(entity[1] === 'x' ? parseInt(entity.slice(2), 16) : parseInt(entity.slice(1), 10));
    }
  });
}

/** One page of a ListObjectsV2 response. */
export interface ListPage {
  objects: { key: string; size: number; etag?: string }[];
  nextToken: string | undefined;
  /** IsTruncated: more keys follow (then nextToken must be given). */
  truncated: boolean;
}

/** Parses a ListObjectsV2 result (no encoding-type), as the SDK would. */
export function parseListPage(xml: string): ListPage {
  const objects: ListPage['objects'] = [];
  const contents = /<Contents>([\s\S]*?)<\/Contents>/g;
  for (let m = contents.exec(xml); m; m = contents.exec(xml)) {
    const item = m[1]!;
    const key = /<Key>([\s\S]*?)<\/Key>/.exec(item)?.[1];
    if (key === undefined) continue;
    const size = /<Size>(\d+)<\/Size>/.exec(item)?.[1];
    const etag = /<ETag>([\s\S]*?)<\/ETag>/.exec(item)?.[1];
    objects.push({ key: xmlText(key), size: size === undefined ? 0 : Number(size), ...(etag ? { etag: xmlText(etag) } : {}) });
  }
  const truncated = /<IsTruncated>\s*true\s*<\/IsTruncated>/.test(xml);
  const token = /<NextContinuationToken>([\s\S]*?)<\/NextContinuationToken>/.exec(xml)?.[1];
  return { objects, nextToken: truncated && token ? xmlText(token) : undefined, truncated };
}

function errorFromResponse(req: S3HttpRequest, status: number, statusMessage: string | undefined, body: string, headers?: IncomingHttpHeaders): S3HttpError {
  const code = /<Code>([^<]*)<\/Code>/.exec(body)?.[1] ?? defaultCode(status);
  const message = /<Message>([^<]*)<\/Message>/.exec(body)?.[1] ?? statusMessage ?? '';
  // A request signed for another region: the service names the bucket's.
  const region = /<Region>([^<]*)<\/Region>/.exec(body)?.[1];
  const serverTime = /<ServerTime>([^<]*)<\/ServerTime>/.exec(body)?.[1];
  // Only the headers an error is read for (clock skew, a bucket in another region).
  const single = headers && Object.fromEntries((['date', 'x-amz-bucket-region'] as const).flatMap((name) => (typeof headers[name] === 'string' ? [[name, headers[name]]] : [])));
  return new S3HttpError(code, `${req.method} ${req.key}: ${code}${message ? `: ${message}` : ''}`, status, { ...(region ? { region } : {}), ...(serverTime ? { serverTime } : {}), ...(single ? { headers: single } : {}) });
}

/** HEAD responses carry no body; name their errors as the SDK does. */
function defaultCode(status: number): string {
  switch (status) {
    case 403:
      return 'Forbidden';
    case 301:
      return 'PermanentRedirect';
    case 404:
      return 'NotFound';
    case 412:
      return 'PreconditionFailed';
    case 503:
      return 'ServiceUnavailable';
    default:
      return `Http${status}`;
  }
}

function abortError(signal: AbortSignal): S3HttpError {
  const reason = signal.reason as unknown;
  return new S3HttpError('AbortError', `the request was aborted${reason instanceof Error ? `: ${reason.message}` : ''}`, undefined, { cause: reason });
}

/** A request's head as sent on the wire: request line, headers, blank line. */
function requestHead(method: string, path: string, headers: OutgoingHttpHeaders): string {
  let head = `${method} ${path} HTTP/1.1\r\n`;
  for (const name in headers) {
    const value = String(headers[name]);
    // Signed values never hold control characters; a credential with a line break would otherwise split the request.
    if (/[\x00-\x08\x0a-\x1f\x7f]/.test(value) || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) {
      throw new S3HttpError('InvalidHeader', `${method}: header ${name.replace(/[^\x20-\x7e]/g, '?')} holds a character HTTP does not allow there`);
    }
    head += `${name}: ${value}\r\n`;
  }
  return `${head}\r\n`;
}

/** URI-encodes one path segment as SigV4 requires: everything but A–Z a–z 0–9 - . _ ~. */
export function uriEncode(segment: string): string {
  return encodeURIComponent(segment).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}
