import { gzipSync } from 'node:zlib';
import { asRetryable, CHECKSUM_FALLBACK, failedAtOnce, failsAtOnce, isRetryable, withRetry, defaultRetryPolicy, type RetryPolicy } from '../objectstore/retry.js';
import { ChecksumMismatchError, isNotFound, md5OfEtag, NOT_FOUND, NotFoundError, SOURCE_CHANGED, sourceChanged, StoreError, type ObjectInfo, type ObjectStore } from '../objectstore/store.js';
import { checksumOf, isChecksum, type Checksum } from '../repository/checksum.js';
import { digestOf, pipeWithDigest } from '../repository/digest.js';
import type { FileRef } from '../repository/manifest.js';
import { indexRow, layout, type BackupListing, type IndexEntry, type Repository } from '../repository/repository.js';
import { compareKeys, Cursor, inKeyOrder, KeyOrderError, readRows, sortByKey, type RowWriter, type ScratchDir } from '../objectstore/sorted.js';
import { ProgressReporter, type EventSink, type PhaseName } from './events.js';
import { forEachConcurrently } from './pool.js';

/** One object of a plan: held already (with its checksum) when `checksum` is set, otherwise to be copied (with the listed `etag`). */
export interface PlanItem {
  key: string;
  size: number;
  checksum?: Checksum;
  etag?: string;
}

/** What the repository holds, asked key by key in ascending key order (each lookup is a merge step). */
export interface HeldLookup {
  get(key: string): Promise<IndexEntry | undefined>;
  close(): Promise<void>;
}

/**
 * What the repository already holds, with checksums: the newest sealed backup's index plus the
 * journals of unsealed (crashed or interrupted) backups, keeping only objects that are still present
 * with the recorded size. An object held but in no index or journal is copied again: without its
 * checksum it cannot be trusted.
 *
 * The index, the journals (sorted by key through scratch files) and the repository's objects/
 * listing are merged as key-ordered streams, so memory does not grow with the number of objects.
 * Only an index written before indexes were key-ordered is read into memory.
 */
export class RepositoryHoldings {
  private constructor(
    private readonly repo: Repository,
    private readonly index: IndexSource | undefined,
    /** The journals' entries in key order, the latest for a key copied more than once; undefined when there are none. */
    private readonly journaled: string | undefined,
  ) {}

  static async load(repo: Repository, listing: BackupListing, scratch: ScratchDir): Promise<RepositoryHoldings> {
    const latest = listing.sealed[listing.sealed.length - 1];
    // Opening checks the index's checksum (before anything is paused) and its order.
    const index = latest && (await IndexSource.open(repo, latest.objects.index));
    const journaled = await sortEntries(journalEntries(repo, listing.incomplete.map((b) => b.id)), scratch, 'journaled');
    return new RepositoryHoldings(repo, index, journaled.count > 0 ? journaled.path : undefined);
  }

  /** A fresh lookup (its own cursors over the index, the journals and the objects/ listing). */
  lookup(): HeldLookup {
    if (!this.index && !this.journaled) return { get: async () => undefined, close: async () => undefined };
    const index = this.index && new Cursor(this.index.entries());
    const journaled = this.journaled ? new Cursor(readEntries(this.journaled)) : undefined;
    const present = new Cursor(repositoryObjects(this.repo));
    return {
      get: async (key) => {
        const fromIndex = await index?.seek(key);
        const fromJournal = await journaled?.seek(key);
        const info = await present.seek(key);
        const candidate = fromJournal ?? fromIndex;
        return candidate && info && info.size === candidate.size ? candidate : undefined;
      },
      close: async () => {
        await index?.close();
        await journaled?.close();
        await present.close();
      },
    };
  }
}

/** The journal entries of these backups, in the order they were written. */
export async function* journalEntries(repo: Repository, ids: string[]): AsyncGenerator<IndexEntry> {
  for (const id of ids) yield* repo.streamJournals(id);
}

/** Index entries sorted by key into a scratch file (the last entry of a key wins), with bounded memory. */
export function sortEntries(entries: AsyncIterable<IndexEntry>, scratch: ScratchDir, name: string): Promise<{ path: string; count: number }> {
  return sortByKey(entries, scratch, name, indexRow, readEntries);
}

/** The objects the repository holds, keyed as in the cluster bucket, in key order. */
export async function* repositoryObjects(repo: Repository): AsyncGenerator<ObjectInfo> {
  const prefix = layout.objectsPrefix;
  for await (const info of inKeyOrder(repo.store.list(prefix), `the listing of ${repo.description}`)) yield { ...info, key: info.key.slice(prefix.length) };
}

/**
 * A sealed backup's index as a key-ordered stream, to be read as many times as needed. One pass
 * at open checks its checksum and its order; an index written before indexes were key-ordered is
 * read into memory and sorted instead.
 */
export class IndexSource {
  private constructor(
    private readonly repo: Repository,
    private readonly ref: FileRef,
    private readonly sortedInMemory: IndexEntry[] | undefined,
  ) {}

  /** `ordered`: a pass already proved this index key-ordered and intact (verify's crossCheck), so none is needed here. */
  static async open(repo: Repository, ref: FileRef, ordered = false): Promise<IndexSource> {
    if (ordered) return new IndexSource(repo, ref, undefined);
    try {
      for await (const _ of inKeyOrder(repo.streamIndex(ref), ref.file));
      return new IndexSource(repo, ref, undefined);
    } catch (err) {
      if (!(err instanceof KeyOrderError)) throw err;
      return new IndexSource(repo, ref, (await repo.readIndex(ref)).sort((a, b) => compareKeys(a.key, b.key)));
    }
  }

  entries(): AsyncIterable<IndexEntry> {
    if (!this.sortedInMemory) return this.repo.streamIndex(this.ref);
    const entries = this.sortedInMemory;
    return (async function* () {
      yield* entries;
    })();
  }
}

/** A lookup over a key-ordered file of index entries (a pass's output). */
export function entriesLookup(path: string): HeldLookup {
  const cursor = new Cursor(readEntries(path));
  return { get: (key) => cursor.seek(key), close: () => cursor.close() };
}

/** Entries (or plan items) written by a RowWriter, read back in order. */
export async function* readEntries(path: string): AsyncGenerator<IndexEntry> {
  for await (const row of readRows(path)) yield { key: row[0] as string, size: row[1] as number, checksum: row[2] as Checksum };
}

/** Plan rows: `[key, size, checksum]` held, `[key, size]` or `[key, size, null, etag]` to copy. */
export async function* readPlan(path: string): AsyncGenerator<PlanItem> {
  for await (const row of readRows(path)) {
    const item: PlanItem = { key: row[0] as string, size: row[1] as number };
    if (isChecksum(row[2])) item.checksum = row[2];
    else if (typeof row[3] === 'string') item.etag = row[3];
    yield item;
  }
}

export interface PlanCounts {
  objects: number;
  bytes: number;
  missingObjects: number;
  missingBytes: number;
  /** Zero-byte "folder" objects (keys ending in `/`, as S3 consoles create) left out; listed for the quiescence check only. */
  folderMarkers?: number;
}

/**
 * A zero-byte object whose key ends in `/`: what an S3 console's "Create folder" leaves. Pachyderm
 * never writes one and nothing references it, and a directory repository cannot hold its key.
 */
export function isFolderMarker(info: ObjectInfo): boolean {
  return info.size === 0 && (info.key === '' || info.key.endsWith('/'));
}

/**
 * One merge pass: every listed object, in key order, marked held (with its checksum) or to copy.
 * Written to `out` when given; `onListed` sees each listed object first (the quiescence check).
 */
export async function planCopy(
  listing: AsyncIterable<ObjectInfo>,
  held: HeldLookup,
  out?: RowWriter,
  onListed?: (info: ObjectInfo) => Promise<void>,
  signal?: AbortSignal,
): Promise<PlanCounts> {
  const counts: PlanCounts = { objects: 0, bytes: 0, missingObjects: 0, missingBytes: 0 };
  try {
    for await (const info of inKeyOrder(listing, 'the cluster bucket listing')) {
      // Listing a large bucket takes minutes, in paused mode while paused: Ctrl-C and the
      // downtime budget stop it, between two objects.
      signal?.throwIfAborted();
      await onListed?.(info);
      if (isFolderMarker(info)) {
        counts.folderMarkers = (counts.folderMarkers ?? 0) + 1;
        continue;
      }
      counts.objects++;
      counts.bytes += info.size;
      const entry = await held.get(info.key);
      if (entry && entry.size === info.size) {
        await out?.write(indexRow(entry));
      } else {
        counts.missingObjects++;
        counts.missingBytes += info.size;
        await out?.write(info.etag === undefined ? [info.key, info.size] : [info.key, info.size, null, info.etag]);
      }
    }
  } finally {
    await held.close();
  }
  return counts;
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
  #failure: { error: unknown } | undefined;

  constructor(private readonly repo: Repository, private readonly backupId: string, private readonly maxEntries = 1000, private readonly maxAgeMs = 2000) {}

  record(entry: IndexEntry): void {
    this.#pending.push(entry);
    // Written in the background: a failure is kept (the copy stops on it) and every later flush()
    // rejects with it, instead of an unhandled rejection ending the process, paused cluster and all.
    if (this.#pending.length >= this.maxEntries || performance.now() - this.#lastFlush >= this.maxAgeMs) {
      this.flush().catch((error: unknown) => (this.#failure ??= { error }));
    }
  }

  /** The failure of a journal written in the background, once there is one. */
  get failure(): { error: unknown } | undefined {
    return this.#failure;
  }

  flush(): Promise<void> {
    if (this.#pending.length === 0) return this.#flushing;
    const batch = this.#pending;
    this.#pending = [];
    this.#lastFlush = performance.now();
    const seq = this.#seq++;
    const data = gzipSync(Buffer.from(`${batch.map((e) => JSON.stringify(indexRow(e))).join('\n')}\n`));
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
  constructor(private readonly copyInService: (key: string, size: number, signal?: AbortSignal, sourceMd5?: string, sourceEtag?: string) => Promise<{ sha256?: string; md5?: string }>) {}

  /**
   * Copies and returns the checksum: the service's SHA-256, or the source's MD5 when the copy's
   * ETag proves it (`sourceMd5` given), or else the SHA-256 of the copy read back; undefined when off.
   */
  async copy(repo: Repository, info: ObjectInfo, signal?: AbortSignal, sourceMd5?: string): Promise<{ size: number; checksum: Checksum } | undefined> {
    if (this.disabled) return undefined;
    let result: { sha256?: string; md5?: string };
    try {
      result = await this.copyInService(info.key, info.size, signal, sourceMd5, info.etag);
    } catch (err) {
      // Transient, or this object changed: streaming it would not do better, and the service can
      // still copy the others.
      if (err instanceof StoreError && (err.retryable || err.code === SOURCE_CHANGED)) throw err;
      // Not found: gone, or a copy source this service misreads (s3rver: '+' in a key). This one
      // object is streamed; its read says which.
      if (err instanceof StoreError && err.code === NOT_FOUND) return undefined;
      // Anything else is the service refusing server-side copies: off for the run.
      this.disabled = true;
      this.reason = (err as Error).message;
      return undefined;
    }
    if (result.sha256) return { size: info.size, checksum: result.sha256 };
    if (result.md5) return { size: info.size, checksum: checksumOf('md5', result.md5) };
    // The service gave no checksum: read the copy back, so the index still holds a verified SHA-256.
    const { bytes, hex } = await digestOf(await failsAtOnce(repo.store.get(layout.object(info.key), signal)), signal).catch((err: unknown) => {
      throw asRetryable(err, `reading back the server-side copy of ${info.key}`, signal);
    });
    return { size: bytes, checksum: hex };
  }
}

/**
 * Whether copies let the S3 service check each object against the MD5 its listed ETag stands for
 * (`Content-MD5` on the upload, or the ETag of a server-side copy) instead of hashing every byte
 * here (`backup.serviceChecksums`). A source whose ETags turn out not to be MD5s (the service
 * refuses a body: SSE-KMS or SSE-C objects) switches it off for the rest of the run.
 */
export class ServiceMd5 {
  reason: string | undefined;
  constructor(public enabled: boolean) {}

  /** The MD5 to have the service check for this object, when there is one to trust. */
  md5For(info: ObjectInfo): string | undefined {
    return this.enabled ? md5OfEtag(info.etag) : undefined;
  }

  disable(reason: string): void {
    this.enabled = false;
    this.reason ??= reason;
  }
}

interface CopyContext {
  source: ObjectStore;
  repo: Repository;
  signal?: AbortSignal;
  retry?: RetryPolicy;
  serverSide?: ServerSideCopier;
  serviceMd5?: ServiceMd5;
}

/**
 * Copies one object, retrying transient faults: server-side when possible; else streamed, either
 * with the service checking the source's MD5 (nothing hashed here) or hashed with SHA-256.
 */
async function copyOne(ctx: CopyContext, info: ObjectInfo): Promise<IndexEntry & { serverSide: boolean }> {
  const { source, repo, signal } = ctx;
  return withRetry(
    async () => {
      const md5 = ctx.serviceMd5?.md5For(info);
      const copied = await ctx.serverSide?.copy(repo, info, signal, md5);
      if (copied) {
        if (copied.size !== info.size) throw sourceChanged(info.key, `was ${info.size} bytes when listed but ${copied.size} when copied`);
        return { key: info.key, ...copied, serverSide: true };
      }
      const checked = md5 !== undefined && info.size <= (repo.store.md5CheckedPutLimit ?? -1) ? md5 : undefined;
      const body = await failsAtOnce(source.get(info.key, signal));
      const put = { size: info.size, ...(checked ? { contentMd5: checked } : {}) };
      const { bytes, hex } = await pipeWithDigest(body, (digest, putSignal) => repo.store.put(layout.object(info.key), digest, put, putSignal), signal, checked ? null : 'sha256').catch(
        async (err: unknown) => {
          if (err instanceof ChecksumMismatchError) {
            // The listed ETag is not the object's MD5 (or the object changed): hash it here instead, from now on.
            ctx.serviceMd5?.disable(`${info.key}: ${err.message}`);
            throw new StoreError(`copying ${info.key}: ${err.message}; copying it again with a SHA-256 computed here`, true, { cause: err, code: CHECKSUM_FALLBACK });
          }
          const failure = asRetryable(err, `copying ${info.key}`, signal);
          // A body of another length than listed fails the upload just as a broken connection
          // does (an S3 PUT of a declared length): before trying again, make sure it is not the
          // object itself that changed, which no retry would fix.
          if (isRetryable(failure) && !failedAtOnce(failure) && !signal?.aborted) await assertListedSize(source, info);
          throw failure;
        },
      );
      if (bytes !== info.size) {
        // Only a store that does not hold a put to its declared size (a directory) gets here. An
        // object still of its listed size means the read ended early (a truncated response): tried again.
        await assertListedSize(source, info);
        throw new StoreError(`copying ${info.key}: read ${bytes} of its ${info.size} bytes`, true, { code: 'BodyLength' });
      }
      return { key: info.key, size: bytes, checksum: checked ? checksumOf('md5', checked) : hex, serverSide: false };
    },
    ctx.retry ?? defaultRetryPolicy,
    signal,
  );
}

/**
 * Asked only when a streamed copy broke or read another number of bytes than listed (never per
 * object copied): throws if the object is no longer as listed. Gone: the NotFoundError its read
 * would have met, so it is treated as any object that disappears between listing and copying.
 * Another size: a permanent error, since copying it again cannot give the listed object.
 */
async function assertListedSize(source: ObjectStore, info: ObjectInfo): Promise<void> {
  let now: ObjectInfo | undefined;
  try {
    now = await source.stat(info.key);
  } catch {
    // The probe itself failed (the store retried it already): leave the copy's own failure to decide.
    return;
  }
  if (!now) throw new NotFoundError(`${info.key} not found in ${source.description}`);
  if (now.size !== info.size) throw sourceChanged(info.key, `was ${info.size} bytes when listed but is ${now.size} bytes now`);
}

export interface CopyOptions extends CopyContext {
  concurrency: number;
  journal: CopyJournal;
  emit: EventSink;
  phase: PhaseName;
}

/**
 * Copies every listed object the repository does not hold yet, streaming with a checksum, and
 * returns index entries for all listed objects. `held` gains the copied objects.
 */
export async function copyMissingObjects(options: CopyOptions & { objects: ObjectInfo[]; held: Map<string, IndexEntry> }): Promise<CopyResult> {
  const { held } = options;
  const missing = options.objects.filter((o) => held.get(o.key)?.size !== o.size);
  const progress = new ProgressReporter(options.emit, options.phase, missing.length, missing.reduce((n, o) => n + o.size, 0));
  let newBytes = 0;
  let serverSideCount = 0;
  try {
    await forEachConcurrently(
      missing,
      options.concurrency,
      async (info) => {
        const { serverSide, ...entry } = await copyOne(options, info);
        if (serverSide) serverSideCount++;
        held.set(info.key, entry);
        options.journal.record(entry);
        newBytes += entry.size;
        progress.add(1, entry.size);
      },
      options.signal,
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

/**
 * After a copy failed with "not found": whether the cluster bucket confirms the object is gone
 * (deleted since it was listed). Anything else (the repository answering 404, a stat that fails)
 * stays the copy's failure.
 */
async function confirmedGone(source: ObjectStore, key: string, error: unknown): Promise<boolean> {
  if (!isNotFound(error)) return false;
  return (await source.stat(key).catch(() => null)) === undefined;
}

/** Results waiting to be written in key order; a copy that is slow holds back at most this many. */
const ORDER_WINDOW = 4096;

/**
 * Carries out a plan in key order: objects marked held pass through, the others are copied with
 * `concurrency` copies in flight. Every entry is written to `out` in the plan's (key) order, so the
 * output is itself a key-ordered index; memory is bounded by the window, not by the plan's length.
 *
 * An object the cluster bucket no longer has when its copy starts (deleted since the listing:
 * Pachyderm's garbage collector, pachd's start-up test object) is left out of the output with a
 * warning, not a failure: only referenced objects must be held, and the seal checks those.
 */
export async function copyPlanned(options: CopyOptions & { plan: AsyncIterable<PlanItem>; total: { objects: number; bytes: number }; out?: RowWriter }): Promise<{ count: number; bytes: number; newCount: number; newBytes: number; serverSideCount: number; goneCount: number }> {
  const { signal } = options;
  const progress = new ProgressReporter(options.emit, options.phase, options.total.objects, options.total.bytes);
  const result = { count: 0, bytes: 0, newCount: 0, newBytes: 0, serverSideCount: 0, goneCount: 0 };
  const goneShown: string[] = [];
  const window: Array<{ entry?: IndexEntry; gone?: boolean; settled?: Promise<void> }> = [];
  const inFlight = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;

  const writeReady = async (): Promise<void> => {
    while (window.length > 0) {
      const head = window[0]!;
      if (!head.entry && !head.gone) {
        if (window.length < ORDER_WINDOW || !head.settled) return;
        await head.settled;
        if (!head.entry && !head.gone) return;
      }
      window.shift();
      if (!head.entry) continue;
      result.count++;
      result.bytes += head.entry.size;
      await options.out?.write(indexRow(head.entry));
    }
  };

  try {
    for await (const item of options.plan) {
      failure ??= options.journal.failure;
      if (failure) break;
      signal?.throwIfAborted();
      if (item.checksum !== undefined) {
        window.push({ entry: { key: item.key, size: item.size, checksum: item.checksum } });
      } else {
        while (inFlight.size >= options.concurrency) await Promise.race(inFlight);
        if (failure) break;
        const slot: { entry?: IndexEntry; gone?: boolean; settled?: Promise<void> } = {};
        const settled = copyOne(options, item).then(
          ({ serverSide, ...entry }) => {
            slot.entry = entry;
            if (serverSide) result.serverSideCount++;
            result.newCount++;
            result.newBytes += entry.size;
            options.journal.record(entry);
            progress.add(1, entry.size);
          },
          async (error: unknown) => {
            if (!signal?.aborted && (await confirmedGone(options.source, item.key, error))) {
              slot.gone = true;
              if (result.goneCount++ < 5) goneShown.push(item.key);
              progress.add(1, 0);
              return;
            }
            failure ??= { error };
          },
        );
        slot.settled = settled;
        inFlight.add(settled);
        void settled.finally(() => inFlight.delete(settled));
        window.push(slot);
      }
      await writeReady();
    }
    await Promise.all(inFlight);
    if (failure) throw failure.error;
    signal?.throwIfAborted();
    for (const slot of window) await slot.settled;
    await writeReady();
  } catch (err) {
    await Promise.allSettled(inFlight);
    // Also on failure: what was copied and checked is recorded, so the next run does not copy it
    // again. A journal that cannot be written must not hide the error that stopped the copy.
    await options.journal.flush().catch(() => undefined);
    throw err;
  }
  await options.journal.flush();
  progress.flush();
  if (result.goneCount > 0) {
    options.emit({
      type: 'warning',
      message: `${result.goneCount} object(s) listed in the cluster bucket were deleted before they were copied (${options.phase}), so the backup does not hold them: ${goneShown.join(', ')}${result.goneCount > goneShown.length ? ', …' : ''}. Pachyderm deletes only chunks nothing references (garbage collection) and its start-up test objects; the seal still fails if a referenced one is missing`,
    });
  }
  return result;
}

