import { gzipSync } from 'node:zlib';
import { withRetry, defaultRetryPolicy, type RetryPolicy } from '../objectstore/retry.js';
import { StoreError, type ObjectInfo, type ObjectStore } from '../objectstore/store.js';
import { digestOf, pipeWithDigest } from '../repository/digest.js';
import { layout, type BackupListing, type IndexEntry, type Repository } from '../repository/repository.js';
import { ProgressReporter, type EventSink, type PhaseName } from './events.js';
import { forEachConcurrently } from './pool.js';

/**
 * What the repository already holds, with checksums: the newest sealed backup's index plus the
 * journals of unsealed (crashed or interrupted) backups, keeping only objects that are still present
 * with the recorded size. An object held but in no index or journal is copied again: without its
 * checksum it cannot be trusted.
 */
export async function loadHeldObjects(repo: Repository, listing: BackupListing): Promise<Map<string, IndexEntry>> {
  const candidates = new Map<string, IndexEntry>();
  const latest = listing.sealed[listing.sealed.length - 1];
  if (latest) for (const e of await repo.readIndex(latest.objects.index)) candidates.set(e.key, e);
  for (const incomplete of listing.incomplete) {
    for (const e of await repo.readJournals(incomplete.id)) candidates.set(e.key, e);
  }
  const held = new Map<string, IndexEntry>();
  if (candidates.size === 0) return held;
  for await (const info of repo.store.list(layout.objectsPrefix)) {
    const key = info.key.slice(layout.objectsPrefix.length);
    const entry = candidates.get(key);
    if (entry && entry.size === info.size) held.set(key, entry);
  }
  return held;
}

/** Lists every object of the cluster's store, with a total for progress. */
export async function listSource(source: ObjectStore): Promise<{ objects: ObjectInfo[]; bytes: number }> {
  const objects: ObjectInfo[] = [];
  let bytes = 0;
  for await (const info of source.list()) {
    objects.push(info);
    bytes += info.size;
  }
  return { objects, bytes };
}

/**
 * Records objects as they are copied, in small gzip files under the backup's journal/, so a backup
 * killed mid-copy is continued by the next run without copying those objects again.
 */
export class CopyJournal {
  #pending: IndexEntry[] = [];
  #seq = 0;
  #lastFlush = performance.now();
  #flushing: Promise<void> = Promise.resolve();

  constructor(private readonly repo: Repository, private readonly backupId: string, private readonly maxEntries = 1000, private readonly maxAgeMs = 2000) {}

  record(entry: IndexEntry): void {
    this.#pending.push(entry);
    if (this.#pending.length >= this.maxEntries || performance.now() - this.#lastFlush >= this.maxAgeMs) void this.flush();
  }

  flush(): Promise<void> {
    if (this.#pending.length === 0) return this.#flushing;
    const batch = this.#pending;
    this.#pending = [];
    this.#lastFlush = performance.now();
    const seq = this.#seq++;
    const data = gzipSync(Buffer.from(`${batch.map((e) => JSON.stringify([e.key, e.size, e.sha256])).join('\n')}\n`));
    // Journals are written one after another so a crash tears at most the last one.
    this.#flushing = this.#flushing.then(() => this.repo.writeBuffer(layout.journal(this.backupId, seq), data).then(() => undefined));
    return this.#flushing;
  }
}

export interface CopyResult {
  entries: IndexEntry[];
  newCount: number;
  newBytes: number;
  /** Objects copied inside the S3 service rather than streamed through this process. */
  serverSideCount: number;
}

/**
 * Copies objects inside one S3 service (CopyObject), when the cluster bucket and the repository
 * share it. The first refusal (permissions, an unsupported operation) switches it off for the rest
 * of the run, and copies fall back to streaming.
 */
export class ServerSideCopier {
  disabled = false;
  reason: string | undefined;
  constructor(private readonly copyInService: (key: string, size: number, signal?: AbortSignal) => Promise<{ sha256?: string }>) {}

  /** Copies and returns the SHA-256 (computed by the service, or by reading the copy back); undefined when off. */
  async copy(repo: Repository, info: ObjectInfo, signal?: AbortSignal): Promise<{ size: number; sha256: string } | undefined> {
    if (this.disabled) return undefined;
    let result: { sha256?: string };
    try {
      result = await this.copyInService(info.key, info.size, signal);
    } catch (err) {
      if (err instanceof StoreError && err.retryable) throw err;
      this.disabled = true;
      this.reason = (err as Error).message;
      return undefined;
    }
    if (result.sha256) return { size: info.size, sha256: result.sha256 };
    // The service gave no checksum: read the copy back, so the index still holds a verified SHA-256.
    const { bytes, sha256 } = await digestOf(await repo.store.get(layout.object(info.key), signal), signal).catch((err: unknown) => {
      throw asRetryable(err, `reading back the server-side copy of ${info.key}`, signal);
    });
    return { size: bytes, sha256 };
  }
}

/**
 * Copies every listed object the repository does not hold yet, streaming with a checksum, and
 * returns index entries for all listed objects. `held` gains the copied objects.
 */
export async function copyMissingObjects(options: {
  source: ObjectStore;
  repo: Repository;
  objects: ObjectInfo[];
  held: Map<string, IndexEntry>;
  concurrency: number;
  journal: CopyJournal;
  emit: EventSink;
  phase: PhaseName;
  signal?: AbortSignal;
  retry?: RetryPolicy;
  serverSide?: ServerSideCopier;
}): Promise<CopyResult> {
  const { source, repo, held, signal } = options;
  const missing = options.objects.filter((o) => held.get(o.key)?.size !== o.size);
  const progress = new ProgressReporter(options.emit, options.phase, missing.length, missing.reduce((n, o) => n + o.size, 0));
  let newBytes = 0;
  let serverSideCount = 0;
  try {
    await forEachConcurrently(
      missing,
      options.concurrency,
      async (info) => {
        const entry = await withRetry(
          async () => {
            const copied = await options.serverSide?.copy(repo, info, signal);
            if (copied) {
              if (copied.size !== info.size) throw new StoreError(`object ${info.key} was ${info.size} bytes when listed but ${copied.size} when copied; it changed during the backup`, false);
              serverSideCount++;
              return { key: info.key, ...copied };
            }
            const body = await source.get(info.key, signal);
            const { bytes, sha256 } = await pipeWithDigest(body, (digest, putSignal) => repo.store.put(layout.object(info.key), digest, { size: info.size }, putSignal), signal).catch(
              (err: unknown) => {
                throw asRetryable(err, `copying ${info.key}`, signal);
              },
            );
            if (bytes !== info.size) throw new StoreError(`object ${info.key} was ${info.size} bytes when listed but ${bytes} when read; it changed during the backup`, false);
            return { key: info.key, size: bytes, sha256 };
          },
          options.retry ?? defaultRetryPolicy,
          signal,
        );
        held.set(info.key, entry);
        options.journal.record(entry);
        newBytes += entry.size;
        progress.add(1, entry.size);
      },
      signal,
    );
  } catch (err) {
    // Also on failure: what was copied and checked is recorded, so the next run does not copy it
    // again. A journal that cannot be written must not hide the error that stopped the copy.
    await options.journal.flush().catch(() => undefined);
    throw err;
  }
  await options.journal.flush();
  progress.flush();
  const entries = options.objects.map((o) => held.get(o.key)!);
  return { entries, newCount: missing.length, newBytes, serverSideCount };
}

/** A stream that breaks mid-copy (reset, truncated body) is worth another try; an abort is not. */
export function asRetryable(err: unknown, doing: string, signal?: AbortSignal): unknown {
  if (err instanceof StoreError || signal?.aborted) return err;
  return new StoreError(`${doing}: ${(err as Error).message ?? String(err)}`, true, { cause: err });
}
