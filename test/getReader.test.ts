/**
 * Object reads on the store's own sockets (src/objectstore/getReader.ts): a hand-written HTTP/1.1
 * response reader, so these tests drive it with a server that writes raw bytes, response heads
 * split anywhere, bodies in odd pieces, connections closed at every point, and check every byte
 * that comes out. The copy path's buffer reuse (a read buffer given back once its PUT write
 * completed) is checked by copying many objects at once into a server that reads slowly and
 * hashes what it receives. Real S3 servers (s3rver, Ceph) run these reads in every other S3 test.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer as createTlsServer } from 'node:tls';
import { promisify } from 'node:util';
import { type Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, describe, test } from 'node:test';
import { Secret } from '../src/config/secret.js';
import { dechunk, GetReader } from '../src/objectstore/getReader.js';
import { S3ObjectStore } from '../src/objectstore/s3.js';
import { NotFoundError, StoreError } from '../src/objectstore/store.js';

interface RawRequest {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: Buffer;
  /** Requests on this connection before this one. */
  index: number;
  socket: Socket;
}

/** A server that parses requests (Content-Length bodies only) and lets the test write each answer byte by byte. */
async function rawServer(answer: (req: RawRequest) => void | Promise<void>, options: { slowReads?: boolean; tls?: { key: Buffer; cert: Buffer }; host?: string } = {}): Promise<{ port: number; endpoint: string; requests: RawRequest[]; connections: number; close(): Promise<void> }> {
  const state = { requests: [] as RawRequest[], connections: 0 };
  const sockets = new Set<Socket>();
  const onConnection = (socket: Socket): void => {
    state.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    let buffered = Buffer.alloc(0);
    let index = 0;
    let busy = false;
    const next = async (): Promise<void> => {
      if (busy) return;
      const end = buffered.indexOf('\r\n\r\n');
      if (end < 0) return;
      const lines = buffered.subarray(0, end).toString('latin1').split('\r\n');
      const [method, path] = lines[0]!.split(' ') as [string, string];
      const headers: Record<string, string> = {};
      for (const line of lines.slice(1)) headers[line.slice(0, line.indexOf(':')).toLowerCase()] = line.slice(line.indexOf(':') + 1).trim();
      const length = Number(headers['content-length'] ?? 0);
      if (buffered.length < end + 4 + length) return;
      const body = buffered.subarray(end + 4, end + 4 + length);
      buffered = buffered.subarray(end + 4 + length);
      const req = { method, path, headers, body, index: index++, socket };
      state.requests.push(req);
      busy = true;
      await answer(req);
      busy = false;
      await next();
    };
    socket.on('data', (chunk: Buffer) => {
      if (options.slowReads && Math.random() < 0.3) {
        socket.pause();
        setTimeout(() => socket.resume(), 3);
      }
      buffered = Buffer.concat([buffered, chunk]);
      void next();
    });
  };
  const server: Server = options.tls ? createTlsServer(options.tls, onConnection) : createServer(onConnection);
  const host = options.host ?? '127.0.0.1';
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    endpoint: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    get requests() {
      return state.requests;
    },
    get connections() {
      return state.connections;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

const tick = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Writes `bytes` in pieces of random sizes (1 byte up to `max`), with pauses, as a slow network would. */
async function dribble(socket: Socket, bytes: Buffer, max = 70_000): Promise<void> {
  for (let at = 0; at < bytes.length; ) {
    const n = Math.min(bytes.length - at, 1 + Math.floor(Math.random() * max));
    if (!socket.write(bytes.subarray(at, at + n))) await new Promise((resolve) => socket.once('drain', resolve));
    at += n;
    if (Math.random() < 0.1) await tick(1);
  }
}

function ok(body: Buffer, extra = ''): Buffer {
  return Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\nETag: "x"\r\n${extra}\r\n`, 'latin1'), body]);
}

async function readAll(body: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks);
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** GETs `path` and asserts that the answer is a body to stream. */
async function bodyOf(get: GetReader, path: string, signal?: AbortSignal): Promise<Readable> {
  const result = await get.get(head(path), `GET ${path}`, signal);
  assert.ok(result && 'body' in result, `GET ${path}: a body`);
  return result.body;
}

/** The SHA-256 of a body read by a consumer slower than the network: every `every`th chunk waits a little. */
async function slowSha(body: NodeJS.ReadableStream, highWaterMark: number, every: number): Promise<string> {
  const hash = createHash('sha256');
  let writes = 0;
  await pipeline(
    body,
    new Writable({
      highWaterMark,
      write(chunk: Buffer, _enc, done) {
        hash.update(chunk);
        if (++writes % every === 0) setTimeout(done, 1);
        else done();
      },
    }),
  );
  return hash.digest('hex');
}
const reader = (port: number, requestTimeoutMs = 10_000) => new GetReader({ hostname: '127.0.0.1', port, connectionTimeoutMs: 5_000, requestTimeoutMs });
const head = (path: string) => `GET ${path} HTTP/1.1\r\nHost: test\r\n\r\n`;

function store(endpoint: string, requestTimeoutSeconds = 30, forcePathStyle = true, bucket = 'b'): S3ObjectStore {
  return new S3ObjectStore({
    bucket,
    prefix: '',
    endpoint,
    region: 'us-east-1',
    forcePathStyle,
    accessKeyId: new Secret('AKIDTEST', 'test'),
    secretAccessKey: new Secret(`secret-${randomBytes(8).toString('hex')}`, 'test'),
    checksums: 'when_required',
    requestTimeoutSeconds,
  });
}

describe('object reads on own sockets', () => {
  const servers: { close(): Promise<void> }[] = [];
  after(async () => {
    for (const s of servers) await s.close();
  });

  test('bodies arrive byte for byte however the response is split, and one connection serves request after request', async () => {
    const objects = [0, 1, 100, 65_536, 65_537, 3 * 1024 * 1024 + 7].map((size) => randomBytes(size));
    const server = await rawServer(async (req) => {
      const body = objects[Number(req.path.slice(1))]!;
      // The head alone, then byte by byte, or everything in random pieces.
      const bytes = ok(body);
      if (req.index % 2 === 0) await dribble(req.socket, bytes, 5);
      else await dribble(req.socket, bytes);
    });
    servers.push(server);
    const get = reader(server.port);
    for (let round = 0; round < 2; round++) {
      for (const [i, object] of objects.entries()) {
        const result = await bodyOf(get, `/${i}`);
        const got = await readAll(result);
        assert.equal(got.length, object.length, `object ${i}: length`);
        assert.equal(sha(got), sha(object), `object ${i}: bytes`);
      }
    }
    assert.equal(server.requests.length, objects.length * 2);
    assert.equal(server.connections, 1, 'keep-alive: one connection for every request');
    get.close();
  });

  test('a consumer slower than the network pauses the socket and resumes it, many times, without losing a byte', async () => {
    const object = randomBytes(8 * 1024 * 1024);
    const server = await rawServer((req) => void req.socket.write(ok(object)));
    servers.push(server);
    const get = reader(server.port);
    const result = await bodyOf(get, '/slow');
    // Every 16th chunk waits, so the reader stops and starts again.
    assert.equal(await slowSha(result, 1024, 16), sha(object));
    get.close();
  });

  test('a connection that closes within the body breaks the body with the count of bytes received; the next read uses a new connection', async () => {
    const object = randomBytes(200_000);
    const server = await rawServer(async (req) => {
      if (req.path === '/cut') {
        const bytes = ok(object);
        req.socket.write(bytes.subarray(0, bytes.length - 1000));
        await tick(20);
        req.socket.destroy();
      } else req.socket.write(ok(object));
    });
    servers.push(server);
    const get = reader(server.port);
    const result = await bodyOf(get, '/cut');
    await assert.rejects(readAll(result), (err: Error & { code?: string }) => {
      assert.match(err.message, /after 199000 of the body's 200000 bytes/);
      assert.equal(err.code, 'ECONNRESET');
      return true;
    });
    const again = await bodyOf(get, '/whole');
    assert.equal(sha(await readAll(again)), sha(object));
    assert.equal(server.connections, 2);
    get.close();
  });

  test('a kept-alive connection the server closed while idle is replaced without failing the read', async () => {
    const object = randomBytes(1000);
    const server = await rawServer((req) => {
      req.socket.write(ok(object));
      // After its answer the server closes the connection without saying so (no Connection: close).
      setTimeout(() => req.socket.destroy(), 10);
    });
    servers.push(server);
    const get = reader(server.port);
    for (let i = 0; i < 3; i++) {
      const result = await bodyOf(get, `/${i}`);
      assert.equal(sha(await readAll(result)), sha(object));
      await tick(40);
    }
    assert.equal(server.connections, 3);
    get.close();
  });

  test('Connection: close and HTTP/1.0 answers are read, and their connections are not used again', async () => {
    const object = randomBytes(5000);
    const server = await rawServer((req) => {
      if (req.index > 0) throw new Error('a second request on a connection the server closes');
      const bytes = req.path === '/close' ? ok(object, 'Connection: close\r\n') : Buffer.concat([Buffer.from(`HTTP/1.0 200 OK\r\nContent-Length: ${object.length}\r\n\r\n`), object]);
      req.socket.end(bytes);
    });
    servers.push(server);
    const get = reader(server.port);
    for (const path of ['/close', '/old', '/close']) {
      const result = await bodyOf(get, path);
      assert.equal(sha(await readAll(result)), sha(object));
    }
    assert.equal(server.connections, 3);
    get.close();
  });

  test('bytes past the Content-Length: with the head, the response is left undefined; later, the connection is closed and not used again', async () => {
    const object = randomBytes(3000);
    const server = await rawServer(async (req) => {
      if (req.path === '/same-read') {
        req.socket.write(Buffer.concat([ok(object), Buffer.from('garbage after the body')]));
        return;
      }
      req.socket.write(ok(object));
      await tick(30);
      req.socket.write('garbage after the body');
    });
    servers.push(server);
    const get = reader(server.port);
    assert.equal(await get.get(head('/same-read'), 'GET same-read'), undefined);
    for (let i = 0; i < 2; i++) {
      const result = await bodyOf(get, '/x');
      assert.equal(sha(await readAll(result)), sha(object));
      await tick(60);
    }
    assert.equal(server.connections, 3, 'a connection out of step is not used again');
    get.close();
  });

  test('error statuses are read here, with a Content-Length or chunked; other responses are left undefined, before any body is handed out', async () => {
    const xml = '<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>';
    const chunked = (text: string) => {
      const b = Buffer.from(text);
      return `${(10).toString(16)};ext=1\r\n${b.subarray(0, 10).toString()}\r\n${(b.length - 10).toString(16)}\r\n${b.subarray(10).toString()}\r\n0\r\nX-Trailer: 1\r\n\r\n`;
    };
    const answers: Record<string, string> = {
      '/length': `HTTP/1.1 503 Slow Down\r\nContent-Length: ${Buffer.byteLength(xml)}\r\n\r\n${xml}`,
      '/chunked': `HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n${chunked(xml)}`,
      '/chunked200': `HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n${chunked('0123456789abcdef')}`,
      '/nolength': `HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody`,
      '/partial': `HTTP/1.1 206 Partial Content\r\nContent-Length: 4\r\n\r\nbody`,
      '/continue': `HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody`,
      '/both': `HTTP/1.1 503 x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n${chunked(xml)}`,
      '/spaced': `HTTP/1.1 200 OK\r\nContent-Length : 4\r\n\r\nbody`,
      '/folded': `HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Long: a\r\n b\r\n\r\nbody`,
    };
    const server = await rawServer(async (req) => void (await dribble(req.socket, Buffer.from(answers[req.path]!), 7)));
    servers.push(server);
    const get = reader(server.port);
    for (const path of ['/length', '/chunked', '/length']) {
      const result = await get.get(head(path), path);
      assert.ok(result && 'status' in result, path);
      assert.equal(result.status, 503);
      assert.equal(result.statusMessage, 'Slow Down');
      assert.equal(result.text, xml);
    }
    assert.equal(server.connections, 1, 'an error answered whole leaves the connection usable');
    for (const path of ['/chunked200', '/nolength', '/partial', '/continue', '/both', '/spaced', '/folded']) assert.equal(await get.get(head(path), path), undefined, path);
    get.close();
  });

  test('dechunk: complete, incomplete and malformed chunked bodies', () => {
    assert.deepEqual(dechunk(Buffer.from('3\r\nabc\r\n0\r\n\r\nNEXT')), { text: Buffer.from('abc'), used: 13 });
    assert.equal(dechunk(Buffer.from('3\r\nabc\r\n0\r\n')), undefined);
    assert.equal(dechunk(Buffer.from('3\r\nab')), undefined);
    assert.equal(dechunk(Buffer.from('zz\r\nabc\r\n')), null);
    assert.equal(dechunk(Buffer.from('3\r\nabcd\r\n')), null);
  });

  test('no answer within the request timeout, and a body that stalls, fail as timeouts; an abort fails the read or breaks its body', async () => {
    const server = await rawServer(async (req) => {
      if (req.path === '/stall') req.socket.write(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n'), randomBytes(5000)]));
      // '/silent' and '/abort*' get no answer, or only part of one.
      if (req.path === '/abort-body') req.socket.write('HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nsome');
    });
    servers.push(server);
    const get = reader(server.port, 300);
    await assert.rejects(get.get(head('/silent'), 'GET silent'), (err: Error & { code?: string }) => err.name === 'TimeoutError' && err.code === 'ETIMEDOUT' && /no response within 300 ms/.test(err.message));
    const stalled = await bodyOf(get, '/stall');
    await assert.rejects(readAll(stalled), (err: Error) => /no bytes of the response body for 300 ms after 5000 of the body's 100000 bytes/.test(err.message));
    const slow = reader(server.port, 10_000);
    const controller = new AbortController();
    const pending = slow.get(head('/abort-head'), 'GET abort-head', controller.signal);
    setTimeout(() => controller.abort(new Error('stop')), 20);
    await assert.rejects(pending, (err: Error) => err.name === 'AbortError');
    const late = new AbortController();
    const started = await bodyOf(slow, '/abort-body', late.signal);
    setTimeout(() => late.abort(new Error('stop')), 20);
    await assert.rejects(readAll(started), (err: Error) => err.name === 'AbortError');
    get.close();
    slow.close();
  });

  test('over TLS: bodies byte for byte on one connection, and a certificate that does not name the host fails the read', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'pbt-getreader-tls-'));
    try {
      try {
        await promisify(execFile)('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost']);
      } catch {
        t.skip('the openssl CLI is not installed (apt-get install openssl)');
        return;
      }
      const [key, cert] = await Promise.all([readFile(join(dir, 'key.pem')), readFile(join(dir, 'cert.pem'))]);
      const object = randomBytes(3 * 1024 * 1024 + 11);
      const server = await rawServer(async (req) => void (await dribble(req.socket, ok(object))), { tls: { key, cert } });
      servers.push(server);
      const get = new GetReader({ hostname: 'localhost', port: server.port, connectionTimeoutMs: 5_000, requestTimeoutMs: 10_000, tls: { ca: cert } });
      for (let i = 0; i < 3; i++) {
        const result = await bodyOf(get, '/x');
        assert.equal(sha(await readAll(result)), sha(object));
      }
      assert.equal(server.connections, 1);
      get.close();
      // The certificate names localhost, not 127.0.0.1.
      const wrongName = new GetReader({ hostname: '127.0.0.1', port: server.port, connectionTimeoutMs: 5_000, requestTimeoutMs: 10_000, tls: { ca: cert } });
      await assert.rejects(wrongName.get(head('/x'), 'GET x'), (err: Error & { code?: string }) => err.code === 'ERR_TLS_CERT_ALTNAME_INVALID' && /127\.0\.0\.1/.test(err.message));
      // A consumer slower than the network (a PUT slower than its GET): the TLS socket stops within
      // a read of several records, the last of the body among them. The kept-alive connection must
      // read again, or the next request on it waits for the request timeout.
      const slowGet = new GetReader({ hostname: 'localhost', port: server.port, connectionTimeoutMs: 5_000, requestTimeoutMs: 3_000, tls: { ca: cert } });
      for (let i = 0; i < 4; i++) {
        const result = await bodyOf(slowGet, '/x');
        assert.equal(await slowSha(result, 1, 1), sha(object), `read ${i}`);
      }
      slowGet.close();
      // No CA given: Node's own roots, which do not hold a self-signed certificate.
      const untrusted = new GetReader({ hostname: 'localhost', port: server.port, connectionTimeoutMs: 5_000, requestTimeoutMs: 10_000, tls: {} });
      await assert.rejects(untrusted.get(head('/x'), 'GET x'), (err: Error & { code?: string }) => err.code === 'DEPTH_ZERO_SELF_SIGNED_CERT');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('a consumer that keeps every chunk (a whole-file read) holds about the body, not a 64 KiB buffer per small read', async () => {
    const size = 2 * 1024 * 1024;
    const object = randomBytes(size);
    // A link slower than the reader: the body arrives in 1,460-byte segments.
    const server = await rawServer(async (req) => {
      req.socket.setNoDelay(true);
      req.socket.write(`HTTP/1.1 200 OK\r\nContent-Length: ${size}\r\n\r\n`);
      for (let at = 0; at < size; at += 1460) {
        req.socket.write(object.subarray(at, Math.min(size, at + 1460)));
        if (at % (16 * 1460) === 0) await tick(0);
      }
    });
    servers.push(server);
    const get = reader(server.port);
    const result = await bodyOf(get, '/x');
    const chunks: Buffer[] = [];
    for await (const chunk of result) chunks.push(chunk as Buffer);
    assert.equal(sha(Buffer.concat(chunks)), sha(object));
    const held = [...new Set(chunks.map((c) => c.buffer))].reduce((n, b) => n + b.byteLength, 0);
    assert.ok(held <= 2 * size, `${chunks.length} chunks hold ${held} bytes of buffers for a ${size}-byte body`);
    get.close();
  });

  test('an error response cut short keeps its status: a 404 whose body breaks is still NotFoundError, not a retryable fault', async () => {
    const server = await rawServer(async (req) => {
      req.socket.write('HTTP/1.1 404 Not Found\r\nContent-Length: 200\r\n\r\n<Error><Code>NoSu');
      await tick(20);
      req.socket.destroy();
    });
    servers.push(server);
    await assert.rejects(store(server.endpoint).get('missing'), NotFoundError);
    await assert.rejects(reader(server.port).get(head('/missing'), 'GET missing'), (err: Error & { status?: number }) => err.status === 404 && /HTTP 404, and the error body broke/.test(err.message));
  });

  test('through the store: errors classified as on the general path, a chunked 200 read by the general path, every request once unless left', async () => {
    const object = randomBytes(70_000);
    const server = await rawServer((req) => {
      if (req.path === '/b/missing') req.socket.write('HTTP/1.1 404 Not Found\r\nContent-Length: 60\r\n\r\n<Error><Code>NoSuchKey</Code><Message>none</Message></Error>');
      else if (req.path === '/b/busy') {
        const [a, b] = ['<Error><Code>SlowDown</Code><Message>m</Message>', '</Error>'];
        req.socket.write(`HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n${a.length.toString(16)}\r\n${a}\r\n${b.length.toString(16)}\r\n${b}\r\n0\r\n\r\n`);
      }
      else if (req.path === '/b/chunked') req.socket.write(`HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n${object.length.toString(16)}\r\n${object.toString('latin1')}\r\n0\r\n\r\n`, 'latin1');
      else req.socket.write(ok(object));
    });
    servers.push(server);
    const s = store(server.endpoint);
    await assert.rejects(s.get('missing'), NotFoundError);
    await assert.rejects(s.get('busy'), (err: unknown) => err instanceof StoreError && err.retryable && /SlowDown/.test(err.message));
    assert.equal(server.requests.length, 2, 'an error answered on own sockets is not asked again');
    assert.equal(sha(await readAll(await s.get('chunked'))), sha(object));
    assert.equal(server.requests.filter((r) => r.path === '/b/chunked').length, 2, 'a chunked 200 is asked again on the general path');
    assert.equal(sha(await readAll(await s.get('plain'))), sha(object));
    // Signed as the general path signs: SigV4 with the key id, never the secret.
    assert.match(server.requests.at(-1)!.headers.authorization!, /^AWS4-HMAC-SHA256 Credential=AKIDTEST\//);
  });

  test('an endpoint given as an IPv6 address: reads, writes and stats connect to the address, the Host header keeps its brackets', async (t) => {
    const object = randomBytes(10_000);
    let server;
    try {
      server = await rawServer(
        (req) => {
          if (req.method === 'PUT') req.socket.write('HTTP/1.1 200 OK\r\nETag: "e"\r\nContent-Length: 0\r\n\r\n');
          else if (req.method === 'HEAD') req.socket.write(`HTTP/1.1 200 OK\r\nETag: "e"\r\nContent-Length: ${object.length}\r\n\r\n`);
          else req.socket.write(ok(object));
        },
        { host: '::1' },
      );
    } catch (err) {
      t.skip(`no IPv6 loopback here: ${(err as Error).message}`);
      return;
    }
    servers.push(server);
    const s = store(server.endpoint);
    assert.equal(sha(await readAll(await s.get('k'))), sha(object));
    await s.put('k2', object);
    assert.equal((await s.stat('k'))?.size, object.length);
    // Without path style asked for, an address endpoint still takes the bucket in the path (no `b.[::1]` host).
    assert.equal(sha(await readAll(await store(server.endpoint, 30, false, 'bkt').get('k'))), sha(object));
    assert.deepEqual(
      server.requests.map((r) => `${r.headers.host} ${r.path}`),
      ['/b/k', '/b/k2', '/b/k', '/bkt/k'].map((path) => `[::1]:${server.port} ${path}`),
    );
  });

  test('streamed copies that give read buffers back: many at once, into a server that reads slowly, every object arrives intact', async () => {
    const objects = new Map<string, Buffer>();
    for (let i = 0; i < 24; i++) objects.set(`src/o${i}`, randomBytes(256 * 1024 + Math.floor(Math.random() * 2 * 1024 * 1024)));
    const received = new Map<string, string>();
    const server = await rawServer(async (req) => {
      const key = decodeURIComponent(req.path.slice('/b/'.length));
      if (req.method === 'GET') {
        await dribble(req.socket, ok(objects.get(key)!));
        return;
      }
      received.set(key, sha(req.body));
      req.socket.write(`HTTP/1.1 200 OK\r\nETag: "e"\r\nContent-Length: 0\r\n\r\n`);
    }, { slowReads: true });
    // The server's reads are slow: its socket buffer fills and the client's writes complete late, after further reads.
    servers.push(server);
    const s = store(server.endpoint);
    await Promise.all(
      [...objects.keys()].map(async (key) => {
        const body = await s.get(key);
        await s.put(key.replace('src/', 'dst/'), body, { size: objects.get(key)!.length });
      }),
    );
    for (const [key, bytes] of objects) assert.equal(received.get(key.replace('src/', 'dst/')), sha(bytes), key);
  });
});
