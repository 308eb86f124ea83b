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
}

/** Classified errors, so callers and the retry decorator can decide without parsing messages. */
export class StoreError extends Error {
  constructor(
    message: string,
    readonly retryable: boolean,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'StoreError';
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

export function isNotFound(err: unknown): err is NotFoundError {
  return err instanceof NotFoundError;
}
