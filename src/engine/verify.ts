import { isNotFound, StoreError } from '../objectstore/store.js';
import { digestOf } from '../repository/digest.js';
import type { Manifest } from '../repository/manifest.js';
import { layout, type IndexEntry, type Repository } from '../repository/repository.js';
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
}

/** Reads a stored file fully and compares its size and SHA-256 with what was recorded. */
export async function checkStoredFile(repo: Repository, path: string, expected: { size: number; sha256: string }, signal?: AbortSignal): Promise<string | undefined> {
  let result: { bytes: number; sha256: string };
  try {
    result = await digestOf(await repo.store.get(path, signal), signal);
  } catch (err) {
    if (isNotFound(err)) return 'missing';
    // A file that fails to decrypt or whose stream breaks permanently is a finding, not a crash.
    if (err instanceof StoreError && !err.retryable) return `unreadable: ${err.message}`;
    throw err;
  }
  const { bytes, sha256 } = result;
  if (bytes !== expected.size) return `size ${bytes} bytes, expected ${expected.size}`;
  if (sha256 !== expected.sha256) return `checksum mismatch (SHA-256 ${sha256.slice(0, 12)}…, expected ${expected.sha256.slice(0, 12)}…): the bytes were changed or damaged`;
  return undefined;
}

/**
 * Checks a sealed backup end to end: manifest checksum, index and referenced-key list, every
 * dump byte and every object byte against their recorded SHA-256, and that every key the
 * database references is held. Problems are collected, not thrown, so one run names them all.
 */
export async function verifyBackup(options: { repo: Repository; manifest: Manifest; emit: EventSink; concurrency: number; signal?: AbortSignal }): Promise<VerifyReport> {
  const { repo, manifest, emit, signal } = options;
  const started = performance.now();
  const problems: VerifyProblem[] = [];
  let entries: IndexEntry[] = [];
  try {
    entries = await repo.readIndex(manifest.objects.index);
  } catch (err) {
    problems.push({ item: manifest.objects.index.file, problem: (err as Error).message });
  }
  let referenced: string[] = [];
  try {
    referenced = await repo.readReferenced(manifest.referenced);
  } catch (err) {
    problems.push({ item: manifest.referenced.file, problem: (err as Error).message });
  }
  const byKey = new Set(entries.map((e) => e.key));
  if (entries.length > 0 || problems.length === 0) {
    for (const key of referenced) if (!byKey.has(key)) problems.push({ item: `object ${key}`, problem: 'referenced by the pachyderm database but not in the backup index' });
  }
  for (const db of manifest.databases) {
    const problem = await checkStoredFile(repo, db.file, db, signal);
    if (problem) problems.push({ item: `dump of database ${db.name} (${db.file})`, problem });
  }
  const referencedSet = new Set(referenced);
  const orphans = entries.filter((e) => !referencedSet.has(e.key)).length;
  const progress = new ProgressReporter(emit, 'verify', entries.length, entries.reduce((n, e) => n + e.size, 0));
  await forEachConcurrently(
    entries,
    options.concurrency,
    async (entry) => {
      const problem = await checkStoredFile(repo, layout.object(entry.key), entry, signal);
      if (problem) problems.push({ item: `object ${entry.key}`, problem });
      progress.add(1, entry.size);
    },
    signal,
  );
  progress.flush();
  return {
    id: manifest.id,
    ok: problems.length === 0,
    problems,
    checked: { dumps: manifest.databases.length, objects: entries.length, bytes: progress.bytes },
    orphans,
    ms: Math.round(performance.now() - started),
  };
}
