import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';

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
 * Pipes `body` through a DigestStream into `consume` (an upload, a child's stdin). If the consumer
 * fails, the producer is destroyed too, so nothing is left waiting for a reader.
 */
export async function pipeWithDigest(
  body: NodeJS.ReadableStream & { destroy(error?: Error): unknown },
  consume: (stream: DigestStream) => Promise<void>,
  signal?: AbortSignal,
): Promise<{ bytes: number; sha256: string }> {
  const digest = new DigestStream();
  const consumer = consume(digest).catch((err: unknown) => {
    body.destroy(err as Error);
    digest.destroy(err as Error);
    throw err;
  });
  await Promise.all([pipeline(body, digest, signal ? { signal } : {}), consumer]);
  return { bytes: digest.bytes, sha256: digest.sha256 };
}

/** Reads a stream to its end, returning its length and SHA-256. */
export async function digestOf(body: NodeJS.ReadableStream & { destroy(error?: Error): unknown }, signal?: AbortSignal): Promise<{ bytes: number; sha256: string }> {
  return pipeWithDigest(body, (digest) => new Promise((resolve, reject) => digest.on('data', () => undefined).on('end', resolve).on('error', reject)), signal);
}
