import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setMaxListeners } from 'node:events';

/** A pass-through stream that counts bytes and computes SHA-256 of everything that flows through it. */
export class DigestStream extends Transform {
  readonly #hash: Hash = createHash('sha256');
  bytes = 0;
  #digest: string | undefined;

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.#hash.update(chunk);
    this.bytes += chunk.length;
    callback(null, chunk);
  }

  /** The hex SHA-256; only valid once the stream has ended. */
  get sha256(): string {
    this.#digest ??= this.#hash.digest('hex');
    return this.#digest;
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
): Promise<{ bytes: number; sha256: string }> {
  const digest = new DigestStream();
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
  const aborted = new Promise<never>((_, reject) => consumerSignal.addEventListener('abort', () => reject(consumerSignal.reason), { once: true }));
  aborted.catch(() => undefined);
  const [produced, consumed] = await Promise.allSettled([producer, Promise.race([consumer, aborted])]);
  signal?.removeEventListener('abort', forward);
  if (produced.status === 'rejected') throw produced.reason;
  if (consumed.status === 'rejected') throw consumed.reason;
  return { bytes: digest.bytes, sha256: digest.sha256 };
}

/** Reads a stream to its end, returning its length and SHA-256. */
export async function digestOf(body: NodeJS.ReadableStream & { destroy(error?: Error): unknown }, signal?: AbortSignal): Promise<{ bytes: number; sha256: string }> {
  return pipeWithDigest(body, (digest) => new Promise((resolve, reject) => digest.on('data', () => undefined).on('end', resolve).on('error', reject)), signal);
}
