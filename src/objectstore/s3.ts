import { createHash } from 'node:crypto';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import { Readable } from 'node:stream';
import { createSecureContext, rootCertificates, type SecureContext } from 'node:tls';
import type { S3Client, S3ClientConfig } from '@aws-sdk/client-s3';
import type { Secret } from '../config/secret.js';
import { parseListPage, readSmallBody, S3Http, S3HttpError, xmlText, type ListPage } from './s3http.js';
import { ACCESS_DENIED, ChecksumMismatchError, md5OfEtag, NOT_FOUND, NotFoundError, PreconditionFailedError, sourceChanged, StoreError, type ObjectInfo, type ObjectStore, type PutOptions } from './store.js';

export interface S3StoreOptions {
  bucket: string;
  prefix: string;
  endpoint?: string;
  region: string;
  forcePathStyle: boolean;
  accessKeyId?: Secret;
  secretAccessKey?: Secret;
  checksums: 'when_supported' | 'when_required';
  requestTimeoutSeconds: number;
  /** Sockets kept per store; the copy concurrency should not exceed it. */
  maxSockets?: number;
  /** The config section the store comes from (`repository`, `cluster.objectStore`), for hints in errors. */
  configKey?: string;
  /** PEM of CA certificates trusted for an https endpoint besides Node's bundled roots (a private CA). */
  ca?: string;
  /** Tests only: the largest object copied with one CopyObject (default 5 GiB, S3's limit), and the part size above it. */
  copyObjectLimit?: number;
  copyPartSize?: number;
}

/** Parts of a streamed upload; memory per upload is partSize × queueSize. */
const PART_SIZE = 8 * 1024 * 1024;
const SINGLE_PUT_LIMIT = 16 * 1024 * 1024;
/** S3 refuses CopyObject above 5 GiB; larger objects are copied in parts with UploadPartCopy. */
const COPY_OBJECT_LIMIT = 5 * 1024 ** 3;
const COPY_PART_SIZE = 512 * 1024 ** 2;
const CONNECTION_TIMEOUT_MS = 10_000;
/** A ListObjectsV2 page of 1,000 keys is a few hundred KiB; anything far larger is not a listing. */
const LIST_PAGE_LIMIT = 64 * 1024 ** 2;

type Sdk = typeof import('@aws-sdk/client-s3');
let sdkModule: Promise<Sdk> | undefined;
/**
 * The AWS SDK is loaded on first use: the per-object requests go through the thin path, and the
 * SDK's import costs a quarter of a second of start-up that commands which never need it (help,
 * most of a copy) would otherwise pay.
 */
function loadSdk(): Promise<Sdk> {
  sdkModule ??= import('@aws-sdk/client-s3');
  return sdkModule;
}

export class S3ObjectStore implements ObjectStore {
  readonly description: string;
  readonly #clientConfig: S3ClientConfig;
  #sdk: Promise<{ sdk: Sdk; client: S3Client }> | undefined;
  readonly bucket: string;
  readonly prefix: string;
  /**
   * The thin signed-HTTP path for per-object GET, PUT and HEAD (about half the CPU of an SDK
   * request); undefined with `checksums: when_supported`, whose response checksum validation
   * only the SDK does.
   */
  readonly #http: S3Http | undefined;
  /** Server-side copies hashed from the source read during the copy, and those read back afterwards. */
  readonly copyChecks = { overlapped: 0, readBack: 0 };
  /** Single PUTs carry Content-MD5 when asked, which S3 checks; multipart uploads cannot. */
  readonly md5CheckedPutLimit = SINGLE_PUT_LIMIT;
  /** Whether CopyObject responses carry the copy's SHA-256; undefined until the first copy tells. */
  #copyGivesSha256: boolean | undefined;

  constructor(readonly options: S3StoreOptions) {
    this.bucket = options.bucket;
    this.prefix = options.prefix === '' ? '' : `${options.prefix}/`;
    this.description = `s3://${options.bucket}${options.prefix ? `/${options.prefix}` : ''}${options.endpoint ? ` at ${options.endpoint}` : ''}`;
    const agentOptions = { keepAlive: true, maxSockets: options.maxSockets ?? 128 };
    const httpAgent = new HttpAgent(agentOptions);
    // One TLS context for every connection, the SDK's and the thin path's (a context per connection would parse every root again).
    const secureContext = options.ca === undefined ? undefined : secureContextFor(options.ca);
    const httpsAgent = new HttpsAgent({ ...agentOptions, ...(secureContext ? { secureContext } : {}) });
    const requestTimeoutMs = options.requestTimeoutSeconds * 1000;
    const config: S3ClientConfig = {
      region: options.region,
      forcePathStyle: options.forcePathStyle,
      // Retries belong to the RetryStore decorator, where they are visible and uniform for every store.
      maxAttempts: 1,
      requestChecksumCalculation: options.checksums === 'when_required' ? 'WHEN_REQUIRED' : 'WHEN_SUPPORTED',
      responseChecksumValidation: options.checksums === 'when_required' ? 'WHEN_REQUIRED' : 'WHEN_SUPPORTED',
      requestHandler: {
        connectionTimeout: CONNECTION_TIMEOUT_MS,
        requestTimeout: requestTimeoutMs,
        // A server that accepts the connection and never answers must fail the request, not hang it.
        throwOnRequestTimeout: true,
        httpAgent,
        httpsAgent,
      },
    };
    if (options.endpoint) config.endpoint = options.endpoint;
    if (options.accessKeyId && options.secretAccessKey) {
      config.credentials = { accessKeyId: options.accessKeyId.reveal(), secretAccessKey: options.secretAccessKey.reveal() };
    }
    this.#clientConfig = config;
    if (options.checksums === 'when_required') {
      const fixed = options.accessKeyId && options.secretAccessKey ? { accessKeyId: options.accessKeyId.reveal(), secretAccessKey: options.secretAccessKey.reveal() } : undefined;
      // Without keys in the config, the SDK's default chain (environment, profile, web identity, instance role), cached and refreshed by the SDK.
      const credentials = fixed ? () => Promise.resolve(fixed) : async () => (await this.sdk()).client.config.credentials();
      this.#http = new S3Http({
        ...(options.endpoint ? { endpoint: options.endpoint } : {}),
        bucket: options.bucket,
        region: options.region,
        forcePathStyle: options.forcePathStyle,
        credentials,
        httpAgent,
        httpsAgent,
        requestTimeoutMs,
        connectionTimeoutMs: CONNECTION_TIMEOUT_MS,
        ...(secureContext ? { secureContext } : {}),
        ownReads: process.env.PACHBACKUP_OBJECT_READS !== 'node',
      });
    }
  }

  /** The SDK and this store's client, created on first use. */
  sdk(): Promise<{ sdk: Sdk; client: S3Client }> {
    this.#sdk ??= loadSdk().then((sdk) => ({ sdk, client: new sdk.S3Client(this.#clientConfig) }));
    return this.#sdk;
  }

  /** Closes the SDK client's sockets, if it was ever created. */
  async destroy(): Promise<void> {
    this.#http?.close();
    if (this.#sdk) (await this.#sdk).client.destroy();
  }

  async check(): Promise<void> {
    try {
      if (this.#http) {
        (await this.#http.send({ method: 'HEAD', key: '' })).resume();
        return;
      }
      const { sdk, client } = await this.sdk();
      await client.send(new sdk.HeadBucketCommand({ Bucket: this.bucket }));
    } catch (err) {
      const status = statusOf(err);
      if (status === 404) throw new StoreError(`bucket ${this.bucket} does not exist at ${this.options.endpoint ?? 'AWS'}; create it or fix the URL`, false);
      if (status === 403 && clockSkewOf(err) === undefined) throw new StoreError(`access to bucket ${this.bucket} denied; check the access key and its permissions`, false, { code: ACCESS_DENIED });
      throw this.classify(err, `reaching bucket ${this.bucket}`);
    }
  }

  async *list(prefix = ''): AsyncIterable<ObjectInfo> {
    if (this.#http) {
      yield* this.#listThin(prefix);
      return;
    }
    let token: string | undefined;
    do {
      let page;
      try {
        const { sdk, client } = await this.sdk();
        page = await client.send(
          new sdk.ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix + prefix, ContinuationToken: token, MaxKeys: 1000 }),
        );
      } catch (err) {
        throw this.classify(err, `listing ${this.description}`);
      }
      for (const item of page.Contents ?? []) {
        if (item.Key === undefined) continue;
        yield { key: item.Key.slice(this.prefix.length), size: item.Size ?? 0, ...(item.ETag ? { etag: item.ETag } : {}) };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
      if (page.IsTruncated && !token) throw this.#untokenedPage();
    } while (token);
  }

  /** ListObjectsV2 on the thin path: the SDK's XML deserializer costs more per key than the rest of a copy's bookkeeping. */
  async *#listThin(prefix: string): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      let page: ListPage;
      try {
        const query: Record<string, string> = { 'list-type': '2', prefix: this.prefix + prefix, 'max-keys': '1000' };
        if (token) query['continuation-token'] = token;
        page = parseListPage(await readSmallBody(await this.#http!.send({ method: 'GET', key: '', query }), LIST_PAGE_LIMIT));
      } catch (err) {
        throw this.classify(err, `listing ${this.description}`);
      }
      for (const item of page.objects) yield { ...item, key: item.key.slice(this.prefix.length) };
      token = page.nextToken;
      if (page.truncated && !token) throw this.#untokenedPage();
    } while (token);
  }

  /**
   * A page that says more keys follow but gives no token to ask for them (a service that answers
   * ListObjectsV2 as the old ListObjects): ending the listing there would leave every later key out.
   */
  #untokenedPage(): StoreError {
    return new StoreError(`listing ${this.description}: a page says the listing is truncated but gives no continuation token; the service does not implement ListObjectsV2, which pachbackup needs`, false, { code: 'ListObjectsV2' });
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    try {
      if (this.#http) {
        const res = await this.#http.send({ method: 'HEAD', key: this.prefix + key });
        res.resume();
        const etag = res.headers.etag;
        return { key, size: Number(res.headers['content-length'] ?? 0), ...(etag ? { etag } : {}) };
      }
      const { sdk, client } = await this.sdk();
      const head = await client.send(new sdk.HeadObjectCommand({ Bucket: this.bucket, Key: this.prefix + key }));
      return { key, size: head.ContentLength ?? 0, ...(head.ETag ? { etag: head.ETag } : {}) };
    } catch (err) {
      if (statusOf(err) === 404) return undefined;
      throw this.classify(err, `stat ${key}`);
    }
  }

  async get(key: string, signal?: AbortSignal): Promise<Readable> {
    try {
      if (this.#http) return await this.#http.getObject(this.prefix + key, signal);
      const { sdk, client } = await this.sdk();
      const out = await client.send(new sdk.GetObjectCommand({ Bucket: this.bucket, Key: this.prefix + key }), signal ? { abortSignal: signal } : {});
      if (!(out.Body instanceof Readable)) throw new StoreError(`reading ${key}: the response had no body`, true);
      return out.Body;
    } catch (err) {
      if (statusOf(err) === 404) throw new NotFoundError(`${key} not found in ${this.description}`);
      throw this.classify(err, `reading ${key}`);
    }
  }

  async put(key: string, body: Readable | Buffer, options: PutOptions = {}, signal?: AbortSignal): Promise<void> {
    const Key = this.prefix + key;
    try {
      const contentMd5 = options.contentMd5 === undefined ? undefined : Buffer.from(options.contentMd5, 'hex').toString('base64');
      if (Buffer.isBuffer(body) || (options.size !== undefined && options.size <= SINGLE_PUT_LIMIT)) {
        if (this.#http) {
          const headers: Record<string, string> = {};
          if (options.ifNoneMatch) headers['if-none-match'] = '*';
          if (options.contentType) headers['content-type'] = options.contentType;
          if (contentMd5) headers['content-md5'] = contentMd5;
          // A buffer is sent with its SHA-256 signed, so the service checks what it received; a stream unsigned.
          const res = await this.#http.send({ method: 'PUT', key: Key, headers, body, ...(options.size !== undefined ? { contentLength: options.size } : {}), ...(signal ? { signal } : {}) });
          res.resume();
          if (options.contentMd5 !== undefined) await this.#confirmMd5(key, options.contentMd5, res.headers.etag);
          return;
        }
        const { sdk, client } = await this.sdk();
        const out = await client.send(
          new sdk.PutObjectCommand({
            Bucket: this.bucket,
            Key,
            Body: body,
            ContentLength: Buffer.isBuffer(body) ? body.length : options.size,
            ...(options.ifNoneMatch ? { IfNoneMatch: '*' } : {}),
            ...(options.contentType ? { ContentType: options.contentType } : {}),
            ...(contentMd5 ? { ContentMD5: contentMd5 } : {}),
          }),
          signal ? { abortSignal: signal } : {},
        );
        if (options.contentMd5 !== undefined) await this.#confirmMd5(key, options.contentMd5, out.ETag);
        return;
      }
      if (options.ifNoneMatch) throw new StoreError(`conditional put of ${key} needs a buffer or a known size`, false);
      if (contentMd5) throw new StoreError(`writing ${key}: Content-MD5 needs a single PUT (a known size of at most ${SINGLE_PUT_LIMIT} bytes)`, false);
      // Multipart: an aborted or failed upload is aborted server-side, so no partial object appears.
      const [{ client }, { Upload }] = await Promise.all([this.sdk(), import('@aws-sdk/lib-storage')]);
      const upload = new Upload({
        client,
        params: { Bucket: this.bucket, Key, Body: body, ...(options.contentType ? { ContentType: options.contentType } : {}) },
        partSize: PART_SIZE,
        queueSize: 2,
        leavePartsOnError: false,
      });
      const onAbort = (): void => void upload.abort();
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        await upload.done();
      } finally {
        signal?.removeEventListener('abort', onAbort);
      }
    } catch (err) {
      if (statusOf(err) === 412) throw new PreconditionFailedError(`${key} already exists in ${this.description}`);
      const name = (err as { name?: string }).name;
      if (name === 'BadDigest' || name === 'InvalidDigest') {
        throw new ChecksumMismatchError(`writing ${key}: ${this.description} refused the bytes (${name}): their MD5 is not the expected ${options.contentMd5}`, true, { cause: err });
      }
      if (err instanceof StoreError) throw err;
      throw this.classify(err, `writing ${key}`);
    }
  }

  /**
   * A service that took a Content-MD5 put must answer with that MD5 as the ETag. One that does
   * not (it ignores Content-MD5, as some S3 look-alikes do, or its ETags are no MD5s, as with
   * SSE-KMS) has not vouched for the bytes: the object is removed and the put fails, so the caller
   * hashes the bytes itself instead.
   */
  async #confirmMd5(key: string, md5: string, etag: string | undefined): Promise<void> {
    if (md5OfEtag(etag) === md5) return;
    await this.remove([key]).catch(() => undefined);
    throw new ChecksumMismatchError(`writing ${key}: ${this.description} answered a Content-MD5 put with ETag ${etag ?? '(none)'}, not the MD5 ${md5}; it does not vouch for the bytes`, false);
  }

  /**
   * Copies `sourceKey` of `source` to `key` of this store inside the S3 service, without the bytes
   * passing through this process. Both stores must be on the same endpoint and the credentials of
   * this store must be able to read the source. Returns the SHA-256 when the service computed one,
   * else the MD5 when `sourceMd5` (the MD5 the source's listed ETag stands for) is given and the
   * copy's ETag equals it: the service vouches that the copy has the bytes of that MD5. Returns
   * neither when the caller must read the copy back to learn its checksum. With `sourceEtag` (the
   * ETag the listing gave), the service copies only that version (`x-amz-copy-source-if-match`):
   * a source replaced since it was listed fails with SOURCE_CHANGED instead of being copied under
   * the listed size.
   */
  async copyFrom(source: S3ObjectStore, sourceKey: string, key: string, size: number, signal?: AbortSignal, sourceMd5?: string, sourceEtag?: string): Promise<{ sha256?: string; md5?: string }> {
    const Key = this.prefix + key;
    const CopySource = encodeURI(`${source.bucket}/${source.prefix}${sourceKey}`).replace(/[+?#]/g, (c) => encodeURIComponent(c));
    const opts = signal ? { abortSignal: signal } : {};
    const limit = this.options.copyObjectLimit ?? COPY_OBJECT_LIMIT;
    const partSize = this.options.copyPartSize ?? COPY_PART_SIZE;
    try {
      if (size <= limit && this.#http && source.#http) return await this.#copyThin(source, sourceKey, Key, CopySource, size, signal, sourceMd5, sourceEtag);
      const { sdk, client } = await this.sdk();
      if (size <= limit) {
        const out = await client.send(new sdk.CopyObjectCommand({ Bucket: this.bucket, Key, CopySource, ChecksumAlgorithm: 'SHA256', ...(sourceEtag ? { CopySourceIfMatch: sourceEtag } : {}) }), opts);
        return checksumOfCopy(sha256OfCopy(out.CopyObjectResult?.ChecksumSHA256), out.CopyObjectResult?.ETag, sourceMd5);
      }
      // Every part from the same version of the source: a source replaced between two parts fails
      // the copy (412) instead of joining two versions.
      const now = await source.stat(sourceKey);
      if (!now) throw new StoreError(`server-side copy of ${sourceKey}: not found`, false, { code: NOT_FOUND });
      if (now.size !== size) throw sourceChanged(sourceKey, `was ${size} bytes when listed but is ${now.size} bytes now`);
      if (sourceEtag !== undefined && !sameEtag(now.etag, sourceEtag)) throw sourceChanged(sourceKey, `has ETag ${now.etag ?? '(none)'} now, not the listed ${sourceEtag}`);
      const { UploadId } = await client.send(new sdk.CreateMultipartUploadCommand({ Bucket: this.bucket, Key }), opts);
      try {
        const parts = [];
        for (let start = 0, n = 1; start < size; start += partSize, n++) {
          const end = Math.min(size, start + partSize) - 1;
          const part = await client.send(
            new sdk.UploadPartCopyCommand({ Bucket: this.bucket, Key, UploadId, PartNumber: n, CopySource, CopySourceRange: `bytes=${start}-${end}`, CopySourceIfMatch: now.etag }),
            opts,
          );
          parts.push({ PartNumber: n, ETag: part.CopyPartResult?.ETag });
        }
        await client.send(new sdk.CompleteMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId, MultipartUpload: { Parts: parts } }), opts);
      } catch (err) {
        await client.send(new sdk.AbortMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId })).catch(() => undefined);
        throw err;
      }
      return {};
    } catch (err) {
      if (err instanceof StoreError) throw err;
      if (statusOf(err) === 412) throw sourceChanged(sourceKey, 'is no longer the version listed (or changed while it was copied in parts)', err);
      throw this.classify(err, `server-side copy of ${sourceKey}`);
    }
  }

  /**
   * CopyObject on the thin path. Once the service has shown it returns no SHA-256 for copies (Ceph
   * Pacific), the source is read and hashed while the service copies it, both requests at once.
   * When the copy's ETag equals the ETag of the version read, the SHA-256 is that of the bytes
   * copied; otherwise (the source changed in between, or the service gives copies new ETags) the
   * copy is read back and hashed, as before. With `sourceMd5`, nothing is read: the copy's ETag
   * is compared with it instead (see copyFrom).
   */
  async #copyThin(source: S3ObjectStore, sourceKey: string, Key: string, copySource: string, size: number, signal?: AbortSignal, sourceMd5?: string, sourceEtag?: string): Promise<{ sha256?: string; md5?: string }> {
    const http = this.#http!;
    const withSignal = signal ? { signal } : {};
    const copying = (async () => {
      const headers: Record<string, string> = { 'x-amz-copy-source': copySource, 'x-amz-checksum-algorithm': 'SHA256' };
      if (sourceEtag) headers['x-amz-copy-source-if-match'] = sourceEtag;
      const res = await http.send({ method: 'PUT', key: Key, headers, ...withSignal });
      const body = await readSmallBody(res);
      // CopyObject can fail after its 200 status line: the error is then in the body.
      const code = /<Error>[\s\S]*?<Code>([^<]*)<\/Code>/.exec(body)?.[1];
      if (code) throw new S3HttpError(code, `PUT ${Key}: ${code} in the body of a 200 response to CopyObject`);
      const etag = /<ETag>([^<]*)<\/ETag>/.exec(body)?.[1];
      const sha256 = /<ChecksumSHA256>([^<]*)<\/ChecksumSHA256>/.exec(body)?.[1];
      return { sha256: sha256OfCopy(sha256), etag: etag === undefined ? undefined : xmlText(etag) };
    })();
    if (this.#copyGivesSha256 !== false || sourceMd5 !== undefined) {
      const result = await copying;
      this.#copyGivesSha256 ??= result.sha256 !== undefined;
      return checksumOfCopy(result.sha256, result.etag, sourceMd5);
    }
    const reading = source.#http!.send({ method: 'GET', key: source.prefix + sourceKey, ...withSignal }).then(async (res) => ({ etag: res.headers.etag, ...(await hashBody(res)) }));
    const [read, copied] = await Promise.allSettled([reading, copying]);
    if (copied.status === 'rejected') throw copied.reason;
    if (copied.value.sha256) return { sha256: copied.value.sha256 };
    let hashed: { bytes: number; sha256: string } | undefined = read.status === 'fulfilled' && sameEtag(read.value.etag, copied.value.etag) ? read.value : undefined;
    if (hashed) this.copyChecks.overlapped++;
    else {
      this.copyChecks.readBack++;
      const reason = read.status === 'rejected' ? `reading the source failed (${(read.reason as Error).message})` : 'the source read has another ETag than the copy';
      hashed = await hashBody(await http.send({ method: 'GET', key: Key, ...withSignal })).catch((err: unknown) => {
        throw new StoreError(`reading back the server-side copy of ${sourceKey} (${reason}): ${(err as Error).message}`, true, { cause: err });
      });
    }
    if (hashed.bytes !== size) throw sourceChanged(sourceKey, `was ${size} bytes when listed but ${hashed.bytes} when copied`);
    return { sha256: hashed.sha256 };
  }

  /** Whether `other` is served by the same S3 service, so objects can be copied between them server-side. */
  sameServiceAs(other: S3ObjectStore): boolean {
    return (this.options.endpoint ?? 'aws') === (other.options.endpoint ?? 'aws') && this.options.region === other.options.region;
  }

  async remove(keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += 1000) {
      const batch = keys.slice(i, i + 1000);
      try {
        const { sdk, client } = await this.sdk();
        const out = await client.send(
          new sdk.DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects: batch.map((k) => ({ Key: this.prefix + k })), Quiet: true } }),
        );
        const failed = out.Errors?.filter((e) => e.Code !== 'NoSuchKey') ?? [];
        // A key the credentials may not delete (AWS answers 200 and AccessDenied per key) is refused as a 403 is: no retry helps.
        const denied = failed.find((e) => e.Code === 'AccessDenied');
        if (denied) {
          throw new StoreError(`removing ${failed.length} objects from ${this.description}: access denied (AccessDenied ${denied.Key}); check the credentials and the bucket policy`, false, { code: ACCESS_DENIED });
        }
        if (failed.length > 0) throw new StoreError(`removing ${failed.length} objects failed: ${failed[0]?.Code} ${failed[0]?.Key}`, true, failed[0]?.Code ? { code: failed[0].Code } : undefined);
      } catch (err) {
        if (err instanceof StoreError) throw err;
        throw this.classify(err, `removing objects from ${this.description}`);
      }
    }
  }

  private classify(err: unknown, doing: string): StoreError {
    const status = statusOf(err);
    const name = (err as { name?: string }).name ?? 'Error';
    const code = (err as { code?: string }).code;
    const message = (err as Error).message ?? String(err);
    // The bucket is in another region (a 301 from a regional endpoint, a 400 for a signature of
    // another region): say which, since "Moved Permanently" alone leaves the operator guessing.
    const region = regionOf(err);
    if (region !== undefined && region !== this.options.region && (status === 301 || status === 307 || status === 400)) {
      const key = this.options.configKey ? `${this.options.configKey}.region` : 'region';
      const endpoint = this.options.endpoint ? `, and an endpoint in that region instead of ${this.options.endpoint}` : '';
      return new StoreError(`${doing}: bucket ${this.bucket} is in region ${region}, not ${this.options.region} (${name}, HTTP ${status}): set ${key}: ${region}${endpoint}`, false, { cause: err, code: name });
    }
    if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH') {
      return new StoreError(`${doing}: cannot reach ${this.options.endpoint ?? 'S3'} (${code}); check the endpoint`, true, { cause: err, code });
    }
    // A certificate this process does not accept is no transient fault: no retry, and say where a private CA goes.
    if (code !== undefined && TLS_CERTIFICATE_ERROR.test(code)) {
      const where = `${this.options.configKey ?? 'the store'}.caFile (or AWS_CA_BUNDLE)`;
      // With a CA already given, it is that CA that does not sign the server's certificate.
      const caHint = this.options.ca === undefined ? `a private CA's certificate goes in ${where}` : `the CA given in ${where} does not sign the server's certificate: give the CA that does`;
      const hint = code === 'ERR_TLS_CERT_ALTNAME_INVALID' ? 'use an endpoint host name the certificate names' : code.includes('EXPIRED') || code.includes('NOT_YET_VALID') ? 'the server needs a valid certificate' : caHint;
      return new StoreError(`${doing}: the TLS certificate of ${this.options.endpoint ?? 'S3'} is not accepted (${code}: ${message}); ${hint}`, false, { cause: err, code });
    }
    // An https endpoint whose port answers plain HTTP: OpenSSL reads the HTTP answer as a TLS record.
    const notTls = code === 'EPROTO' ? /wrong version number|packet length too long|unknown protocol/i.exec(message)?.[0] : undefined;
    if (notTls) {
      return new StoreError(`${doing}: ${this.options.endpoint ?? 'S3'} does not speak TLS on that port (EPROTO: ${notTls}); if the service is plain HTTP there, write the endpoint with http://`, false, { cause: err, code });
    }
    // S3 refuses a signature more than 15 minutes off its own clock, with a 403 like a wrong key's.
    const skew = clockSkewOf(err);
    if (skew !== undefined) {
      return new StoreError(`${doing}: this machine's clock is ${skew} off the service's (${name}, HTTP ${status ?? '?'}), and S3 refuses requests signed more than 15 minutes off; set the clock right (NTP) and run again`, false, { cause: err, code: 'RequestTimeTooSkewed' });
    }
    if (status === 403) return new StoreError(`${doing}: access denied (${name}); check the credentials and the bucket policy`, false, { cause: err, code: ACCESS_DENIED });
    if (status === 404) return new StoreError(`${doing}: not found (${name})`, false, { cause: err, code: NOT_FOUND });
    // 501 NotImplemented (an operation this service lacks, e.g. UploadPartCopy) is never transient.
    const retryable = status === undefined || status === 408 || status === 429 || (status >= 500 && status !== 501) || name === 'TimeoutError' || name === 'RequestTimeout';
    // One name per cause whichever path reported it: a timeout is TimeoutError (the thin path's carry code ETIMEDOUT too).
    const cause = name === 'TimeoutError' ? name : (code ?? (name !== 'Error' ? name : status ? `HTTP ${status}` : undefined));
    return new StoreError(`${doing}: ${name}${status ? ` (HTTP ${status})` : ''}: ${message}`, retryable, { cause: err, ...(cause ? { code: cause } : {}) });
  }
}

/** Node's (OpenSSL's) codes of a server certificate that was refused. */
const TLS_CERTIFICATE_ERROR = /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER/;

/** ETags compared without their quotes, which some services (Ceph) leave out of CopyObject results. */
function sameEtag(a: string | undefined, b: string | undefined): boolean {
  const bare = (etag: string | undefined): string => (etag ?? '').replace(/^"|"$/g, '');
  return bare(a) !== '' && bare(a) === bare(b);
}

async function hashBody(body: AsyncIterable<Buffer>): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash('sha256');
  let bytes = 0;
  for await (const chunk of body) {
    hash.update(chunk);
    bytes += chunk.length;
  }
  return { bytes, sha256: hash.digest('hex') };
}

/** A composite checksum of a multipart source carries a part-count suffix and is not the object's SHA-256. */
function sha256OfCopy(b64: string | undefined): string | undefined {
  return b64 && !b64.includes('-') ? Buffer.from(b64, 'base64').toString('hex') : undefined;
}

/** What a copy's response proves about its bytes: the service's SHA-256 (hex), or the source's MD5 when the copy's ETag is that MD5. */
function checksumOfCopy(sha256: string | undefined, etag: string | undefined, sourceMd5: string | undefined): { sha256?: string; md5?: string } {
  if (sha256) return { sha256 };
  if (sourceMd5 !== undefined && md5OfEtag(etag) === sourceMd5) return { md5: sourceMd5 };
  return {};
}

/**
 * How far this machine's clock is off the service's when that is why a request was refused: S3's
 * RequestTimeTooSkewed, or a 403 without a body (a HEAD) whose Date is more than 15 minutes off.
 * Undefined otherwise.
 */
function clockSkewOf(err: unknown): string | undefined {
  const e = err as { name?: string; ServerTime?: unknown; $response?: { headers?: Record<string, string | undefined> } };
  const date = e.$response?.headers?.['date'];
  const server = typeof e.ServerTime === 'string' ? Date.parse(e.ServerTime) : date ? Date.parse(date) : NaN;
  const off = Number.isFinite(server) ? Math.abs(Date.now() - server) : undefined;
  const text = off === undefined ? 'more than 15 minutes' : `${Math.round(off / 60_000)} minutes`;
  if (e.name === 'RequestTimeTooSkewed') return text;
  return statusOf(err) === 403 && off !== undefined && off > 15 * 60_000 ? text : undefined;
}

/** The bucket's region an error names: the SDK's and the thin path's `Region`, or the SDK's response header. */
function regionOf(err: unknown): string | undefined {
  const e = err as { Region?: unknown; $response?: { headers?: Record<string, string | undefined> } };
  const region = typeof e.Region === 'string' && e.Region ? e.Region : e.$response?.headers?.['x-amz-bucket-region'];
  return region || undefined;
}

function statusOf(err: unknown): number | undefined {
  const meta = (err as { $metadata?: { httpStatusCode?: number } }).$metadata;
  return meta?.httpStatusCode;
}

/** One TLS context per CA text for the whole process: every store of a run shares it (each takes ~20 ms to build). */
const secureContexts = new Map<string, SecureContext>();

function secureContextFor(ca: string): SecureContext {
  let context = secureContexts.get(ca);
  if (!context) {
    context = createSecureContext({ ca: [...rootCertificates, ca] });
    secureContexts.set(ca, context);
  }
  return context;
}
