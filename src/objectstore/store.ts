import type { Readable } from 'node:stream';

/** One entry of a listing. `key` is relative to the store's root (its URL prefix). */
export interface ObjectInfo {
  key: string;
  size: number;
  /** Opaque version tag (S3 ETag, or mtime+size for files); only compared for equality. */
  etag?: string;
}

export interface PutOptions {
  /** Byte length when known in advance; lets S3 stores use a single PUT. */
  size?: number;
  /** Fail with PreconditionFailedError if the key already exists (S3 `If-None-Match: *`). */
  ifNoneMatch?: boolean;
  contentType?: string;
  /**
   * The MD5 (hex) the body must have. The service checks it (S3 `Content-MD5`) and refuses a body
   * with another digest with ChecksumMismatchError, so nothing is stored. Only for puts of at
   * most `md5CheckedPutLimit` bytes with a known `size`.
   */
  contentMd5?: string;
}

/**
 * The one interface every object store implements (S3, filesystem; decorators wrap it).
 * Keys are `/`-separated paths relative to the store root, never starting with `/`.
 */
export interface ObjectStore {
  /** A human description without secrets, e.g. `s3://bucket/prefix (http://127.0.0.1:7480)`. */
  readonly description: string;
  /** Yields every object whose key starts with `prefix`, each exactly once, in key order. */
  list(prefix?: string): AsyncIterable<ObjectInfo>;
  /** Returns the object's size, or undefined when it does not exist. */
  stat(key: string): Promise<ObjectInfo | undefined>;
  /** Opens the object for reading; throws NotFoundError when it does not exist. */
  get(key: string, signal?: AbortSignal): Promise<Readable>;
  /**
   * Stores `body` under `key`. The object becomes visible whole or not at all: a failed or
   * aborted put never leaves a partial object under `key`.
   */
  put(key: string, body: Readable | Buffer, options?: PutOptions, signal?: AbortSignal): Promise<void>;
  /** Removes the keys; keys that do not exist are ignored. */
  remove(keys: string[]): Promise<void>;
  /** Checks that the store exists and is reachable; throws a StoreError saying what is wrong. */
  check(): Promise<void>;
  /**
   * The largest put whose `contentMd5` the service itself checks; absent when it checks none
   * (a directory, an encrypted repository whose stored bytes are not the plaintext).
   */
  readonly md5CheckedPutLimit?: number;
}

/** Classified errors, so callers and the retry decorator can decide without parsing messages. */
export class StoreError extends Error {
  /** A short name of the cause (S3 error code, socket error code, `HTTP 503`), for counting retries. */
  readonly code: string | undefined;
  constructor(
    message: string,
    readonly retryable: boolean,
    options?: { cause?: unknown; code?: string },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'StoreError';
    this.code = options?.code;
  }
}

export class NotFoundError extends StoreError {
  constructor(message: string) {
    super(message, false);
    this.name = 'NotFoundError';
  }
}

export class PreconditionFailedError extends StoreError {
  constructor(message: string) {
    super(message, false);
    this.name = 'PreconditionFailedError';
  }
}

/**
 * The MD5 (hex) an S3 ETag stands for, when it has the form of one: 32 hex digits, quotes aside.
 * A multipart ETag (`…-N`) is not the object's MD5, and an ETag of an SSE-KMS or SSE-C object is
 * not one either although it looks like one; callers only rely on it when the service itself
 * checks it (Content-MD5), or when a copy's ETag equals it.
 */
export function md5OfEtag(etag: string | undefined): string | undefined {
  const bare = (etag ?? '').replace(/^"|"$/g, '').toLowerCase();
  return /^[0-9a-f]{32}$/.test(bare) ? bare : undefined;
}

/**
 * A put with `contentMd5` whose bytes the service did not vouch for, nothing stored: `refused`
 * when it checked them and they have another MD5 (BadDigest); not refused when it stored them but
 * answered an ETag that is not that MD5 (it ignores Content-MD5, or its ETags are no MD5s, as with
 * SSE-KMS), so whether the bytes match is unknown and the caller must hash them itself.
 */
export class ChecksumMismatchError extends StoreError {
  constructor(
    message: string,
    readonly refused: boolean,
    options?: { cause?: unknown },
  ) {
    super(message, false, options);
    this.name = 'ChecksumMismatchError';
  }
}

export function isNotFound(err: unknown): err is NotFoundError {
  return err instanceof NotFoundError;
}

/** StoreError code of an object or bucket the service answered 404 for. */
export const NOT_FOUND = 'NotFound';

/**
 * StoreError code of a request the credentials may not make (S3 403; EACCES, EPERM or EROFS on a
 * filesystem): e.g. a write with read-only credentials.
 */
export const ACCESS_DENIED = 'AccessDenied';

/**
 * StoreError code of an object that is no longer the one listed (another size, or replaced during
 * a copy in parts): no retry and no other copy path can give the listed object.
 */
export const SOURCE_CHANGED = 'SourceChanged';

/** The error of an object that is no longer the one listed; `how` says what differs, after "object <key>". */
export function sourceChanged(key: string, how: string, cause?: unknown): StoreError {
  return new StoreError(
    `object ${key} ${how}; it changed during the backup (Pachyderm writes each object once, so something else is writing to the bucket): find that writer, then run the backup again`,
    false,
    { code: SOURCE_CHANGED, ...(cause === undefined ? {} : { cause }) },
  );
}
