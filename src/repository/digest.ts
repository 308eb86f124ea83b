import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setMaxListeners } from 'node:events';
import type { ChecksumAlgorithm } from './checksum.js';

/**
 * A pass-through stream that counts bytes and hashes everything that flows through it (SHA-256
 * unless told otherwise; `null`: count only, when the receiving service checks the bytes itself).
 */
export class DigestStream extends Transform {
  readonly #hash: Hash | undefined;
  bytes = 0;
  #digest: string | undefined;

  constructor(readonly algorithm: ChecksumAlgorithm | null = 'sha256') {
    super();
    this.#hash = algorithm ? createHash(algorithm) : undefined;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.#hash?.update(chunk);
    this.bytes += chunk.length;
    callback(null, chunk);
  }

  /** The hex digest of the bytes passed so far (empty when only counting), the stream going on. */
  get hexSoFar(): string {
    return this.#hash ? this.#hash.copy().digest('hex') : '';
  }

  /** The hex digest (empty when only counting); only valid once the stream has ended. */
  get hex(): string {
    this.#digest ??= this.#hash ? this.#hash.digest('hex') : '';
    return this.#digest;
  }

  /** The hex SHA-256; only valid once the stream has ended. */
  get sha256(): string {
    if (this.algorithm !== 'sha256') throw new Error(`this stream computes ${this.algorithm ?? 'no digest'}, not SHA-256`);
    return this.hex;
  }
}

export function sha256Hex(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * Pipes `body` through a DigestStream into `consume` (an upload, a child's stdin). A failure on
 * either side stops the other: if the consumer fails, the producer is destroyed; if the producer
 * fails (a reset or truncated download), the consumer's signal aborts, so an upload that would
 * otherwise wait for the rest of its body releases its connection at once.
 */
export async function pipeWithDigest(
  body: NodeJS.ReadableStream & { destroy(error?: Error): unknown },
  consume: (stream: DigestStream, signal: AbortSignal) => Promise<void>,
  signal?: AbortSignal,
  algorithm: ChecksumAlgorithm | null = 'sha256',
): Promise<{ bytes: number; hex: string }> {
  const digest = new DigestStream(algorithm);
  // One controller per call, fed by the caller's signal through a listener removed at the end.
  // (AbortSignal.any would be simpler, but Node keeps a combined signal that has listeners alive
  // as long as its source: with a run-long source that held every copy's streams, ~20 KB each.)
  const local = new AbortController();
  const consumerSignal = local.signal;
  setMaxListeners(0, consumerSignal);
  const forward = (): void => local.abort(signal!.reason);
  if (signal?.aborted) forward();
  else signal?.addEventListener('abort', forward, { once: true });
  const consumer = consume(digest, consumerSignal).catch((err: unknown) => {
    body.destroy(err as Error);
    digest.destroy(err as Error);
    throw err;
  });
  const producer = pipeline(body, digest, signal ? { signal } : {}).catch((err: unknown) => {
    local.abort(err);
    throw err;
  });
  // A consumer that ignores its signal must not hang this call once the producer has failed.
  // (The caller's signal may have been aborted before this call: the listener would then never fire.)
  const aborted = new Promise<never>((_, reject) => {
    if (consumerSignal.aborted) reject(consumerSignal.reason);
    else consumerSignal.addEventListener('abort', () => reject(consumerSignal.reason), { once: true });
  });
  aborted.catch(() => undefined);
  const [produced, consumed] = await Promise.allSettled([producer, Promise.race([consumer, aborted])]);
  signal?.removeEventListener('abort', forward);
  if (produced.status === 'rejected') throw produced.reason;
  if (consumed.status === 'rejected') throw consumed.reason;
  return { bytes: digest.bytes, hex: digest.hex };
}

/** Reads a stream to its end, returning its length and digest (SHA-256 unless told otherwise). */
export async function digestOf(
  body: NodeJS.ReadableStream & { destroy(error?: Error): unknown },
  signal?: AbortSignal,
  algorithm: ChecksumAlgorithm = 'sha256',
): Promise<{ bytes: number; hex: string }> {
  return pipeWithDigest(body, (digest) => new Promise((resolve, reject) => digest.on('data', () => undefined).on('end', resolve).on('error', reject)), signal, algorithm);
}
