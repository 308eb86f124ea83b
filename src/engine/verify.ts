import { isNotFound, StoreError } from '../objectstore/store.js';
import { asRetryable, defaultRetryPolicy, failsAtOnce, withRetry, type RetryPolicy, type RetrySummary, type RetryTally } from '../objectstore/retry.js';
import { newRetryTally } from './context.js';
import { createWriteStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { algorithmOf, checksumOf, describeChecksum, type Checksum } from '../repository/checksum.js';
import { digestOf, pipeWithDigest } from '../repository/digest.js';
import { dumpFiles, dumpFormat, dumpListDigest, type DatabaseEntry, type Manifest } from '../repository/manifest.js';
import { layout, RepositoryError, type IndexEntry, type Repository } from '../repository/repository.js';
import { Cursor, inKeyOrder, KeyOrderError } from '../objectstore/sorted.js';
import { ProgressReporter, type EventSink } from './events.js';
import { forEachConcurrently } from './pool.js';

export interface VerifyProblem {
  item: string;
  problem: string;
}

export interface VerifyReport {
  id: string;
  ok: boolean;
  problems: VerifyProblem[];
  checked: { dumps: number; objects: number; bytes: number };
  /** Objects held by the backup that its pachyderm database does not reference (information only). */
  orphans: number;
  ms: number;
  /** Requests and reads retried after transient object-store faults, by cause. */
  retries: RetrySummary;
}

/** Reads of a stored file that break mid-body: five attempts in all. */
export const BODY_READ_RETRY: RetryPolicy = { ...defaultRetryPolicy, attempts: 5 };

/**
 * Reads a stored file fully and compares its size and checksum (SHA-256, or MD5 for `md5:`) with
 * what was recorded; returns the problem, or undefined. With `copyTo`, the bytes read are also
 * written to that local file (to be trusted only when no problem is returned).
 */
export async function checkStoredFile(
  repo: Repository,
  path: string,
  expected: { size: number; checksum: Checksum },
  signal?: AbortSignal,
  copyTo?: string,
  retry: RetryPolicy = BODY_READ_RETRY,
): Promise<string | undefined> {
  let result: { bytes: number; hex: string };
  const algorithm = algorithmOf(expected.checksum);
  try {
    // A read that breaks mid-body (a reset connection) is read again from the start: a flaky
    // network is not a damaged backup. Opening the read is retried by the store already, and a
    // local write that fails (copyTo on a full disk) is no fault of the store: neither is retried
    // here. What stays broken is an error of verify, not a finding.
    result = await withRetry(
      async () => {
        const body = await failsAtOnce(repo.store.get(path, signal));
        try {
          return copyTo
            ? await pipeWithDigest(body, (digest, writeSignal) => failsAtOnce(pipeline(digest, createWriteStream(copyTo), { signal: writeSignal })), signal, algorithm)
            : await digestOf(body, signal, algorithm);
        } catch (err) {
          throw asRetryable(err, `reading ${path}`, signal);
        }
      },
      retry,
      signal,
    );
  } catch (err) {
    if (isNotFound(err)) return 'missing';
    // A file that fails to decrypt or whose stream breaks permanently is a finding, not a crash.
    if (err instanceof StoreError && !err.retryable) return `unreadable: ${err.message}`;
    throw err;
  }
  const { bytes, hex } = result;
  if (bytes !== expected.size) return `size ${bytes} bytes, expected ${expected.size}`;
  const found = checksumOf(algorithmOf(expected.checksum), hex);
  if (found !== expected.checksum) return `checksum mismatch (${describeChecksum(found)}, expected ${describeChecksum(expected.checksum)}): the bytes were changed or damaged`;
  return undefined;
}

/**
 * Checks every file of a database's dump against its recorded size and SHA-256 (one file for a
 * custom-format dump, each file of a directory-format one, whose file list must also match the
 * digest recorded for the dump). With `copyTo`, each file is saved there under its own name.
 */
export async function checkDump(
  repo: Repository,
  db: DatabaseEntry,
  options: { signal?: AbortSignal | undefined; copyTo?: (name: string) => string; concurrency?: number; retry?: RetryPolicy } = {},
): Promise<VerifyProblem[]> {
  const { signal, copyTo } = options;
  const problems: VerifyProblem[] = [];
  const directory = dumpFormat(db) === 'directory';
  if (directory && dumpListDigest(db.file, dumpFiles(db)) !== db.sha256) {
    problems.push({ item: `dump of database ${db.name} (${db.file})`, problem: 'its file list does not match the digest recorded for the dump: the manifest is damaged' });
  }
  const checked = new Map<string, string>();
  await forEachConcurrently(
    dumpFiles(db),
    options.concurrency ?? 1,
    async (f) => {
      const problem = await checkStoredFile(repo, f.file, { size: f.size, checksum: f.sha256 }, signal, copyTo?.(directory ? f.file.slice(db.file.length) : 'dump'), options.retry);
      if (problem) checked.set(f.file, problem);
    },
    signal,
  );
  // Reported in the manifest's order, whichever finished first.
  for (const f of dumpFiles(db)) {
    const problem = checked.get(f.file);
    if (problem) problems.push({ item: `dump of database ${db.name} (${f.file})`, problem });
  }
  return problems;
}

/**
 * Checks a sealed backup end to end: manifest checksum, index and referenced-key list, every
 * dump byte and every object byte against their recorded checksum (SHA-256, or MD5 for `md5:`
 * entries), and that every key the database references is held. Problems are collected, not thrown, so one run names them all.
 */
export async function verifyBackup(options: {
  repo: Repository;
  manifest: Manifest;
  emit: EventSink;
  concurrency: number;
  signal?: AbortSignal;
  /** The run's tally, when the repository's store counts into it too (the CLI's); else one of its own for the re-reads. */
  retries?: RetryTally;
}): Promise<VerifyReport> {
  const { repo, manifest, emit, signal } = options;
  const started = performance.now();
  const retries = options.retries ?? newRetryTally((message) => emit({ type: 'warning', message }));
  const retry = retries.policy(BODY_READ_RETRY);
  const problems: VerifyProblem[] = [];
  const { orphans, indexReadable } = await crossCheck(repo, manifest, problems);
  for (const db of manifest.databases) problems.push(...(await checkDump(repo, db, { signal, concurrency: options.concurrency, retry })));
  const progress = new ProgressReporter(emit, 'verify', manifest.objects.count, manifest.objects.bytes);
  let checkedObjects = 0;
  if (indexReadable) {
    // The index streams again, feeding the checks: memory does not grow with the number of objects.
    await forEachConcurrently(
      repo.streamIndex(manifest.objects.index),
      options.concurrency,
      async (entry) => {
        const problem = await checkStoredFile(repo, layout.object(entry.key), entry, signal, undefined, retry);
        if (problem) problems.push({ item: `object ${entry.key}`, problem });
        checkedObjects++;
        progress.add(1, entry.size);
      },
      signal,
    );
  }
  progress.flush();
  return {
    id: manifest.id,
    ok: problems.length === 0,
    problems,
    checked: { dumps: manifest.databases.length, objects: checkedObjects, bytes: progress.bytes },
    orphans,
    ms: Math.round(performance.now() - started),
    retries: retries.summary(),
  };
}

/**
 * Every referenced key must be in the index; index entries nobody references are orphans. Both
 * files are key-ordered, so they are merged as streams (each checked against its checksum as it
 * ends). Backups sealed before indexes were key-ordered are compared in memory instead.
 */
export async function crossCheck(repo: Repository, manifest: Manifest, problems: VerifyProblem[]): Promise<{ orphans: number; indexReadable: boolean; indexOrdered: boolean }> {
  const broken: { index?: string; referenced?: string } = {};
  const missing: string[] = [];
  let orphans = 0;
  try {
    const index = new Cursor(inKeyOrder(endOnError(repo.streamIndex(manifest.objects.index), (m) => (broken.index = m)), manifest.objects.index.file));
    try {
      const referenced = endOnError(repo.streamReferenced(manifest.referenced), (m) => (broken.referenced = m));
      for await (const { key } of inKeyOrder(keyed(referenced), manifest.referenced.file)) {
        if (!(await index.seek(key, () => orphans++))) missing.push(key);
      }
      await index.drain(() => orphans++);
    } finally {
      await index.close();
    }
  } catch (err) {
    if (!(err instanceof KeyOrderError)) throw err;
    return { ...(await crossCheckInMemory(repo, manifest, problems)), indexOrdered: false };
  }
  if (broken.index) problems.push({ item: manifest.objects.index.file, problem: broken.index });
  if (broken.referenced) problems.push({ item: manifest.referenced.file, problem: broken.referenced });
  // Keys "missing" from an index that could not be read whole say nothing.
  if (!broken.index) for (const key of missing) problems.push({ item: `object ${key}`, problem: 'referenced by the pachyderm database but not in the backup index' });
  return { orphans, indexReadable: !broken.index, indexOrdered: !broken.index };
}

async function crossCheckInMemory(repo: Repository, manifest: Manifest, problems: VerifyProblem[]): Promise<{ orphans: number; indexReadable: boolean }> {
  let entries: IndexEntry[] = [];
  let indexReadable = true;
  try {
    entries = await repo.readIndex(manifest.objects.index);
  } catch (err) {
    indexReadable = false;
    problems.push({ item: manifest.objects.index.file, problem: (err as Error).message });
  }
  let referenced: string[] = [];
  try {
    referenced = await repo.readReferenced(manifest.referenced);
  } catch (err) {
    problems.push({ item: manifest.referenced.file, problem: (err as Error).message });
  }
  const byKey = new Set(entries.map((e) => e.key));
  if (indexReadable) {
    for (const key of referenced) if (!byKey.has(key)) problems.push({ item: `object ${key}`, problem: 'referenced by the pachyderm database but not in the backup index' });
  }
  const referencedSet = new Set(referenced);
  return { orphans: entries.filter((e) => !referencedSet.has(e.key)).length, indexReadable };
}

/** Ends a stream at its first read error, handing the message to `onError` (a finding, not a crash). */
async function* endOnError<T>(items: AsyncIterable<T>, onError: (message: string) => void): AsyncGenerator<T> {
  try {
    yield* items;
  } catch (err) {
    if (err instanceof RepositoryError || err instanceof StoreError) onError((err as Error).message);
    else throw err;
  }
}

async function* keyed(keys: AsyncIterable<string>): AsyncGenerator<{ key: string }> {
  for await (const key of keys) yield { key };
}
