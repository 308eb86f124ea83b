import { Cursor, readRows, RowWriter, ScratchDir } from '../objectstore/sorted.js';
import type { ObjectStore } from '../objectstore/store.js';
import { acquireLock, type LockHandle } from '../repository/lock.js';
import type { Manifest } from '../repository/manifest.js';
import { layout, type IndexEntry, type Repository } from '../repository/repository.js';
import { PhaseRunner, ProgressReporter, type EventSink } from './events.js';
import { IndexSource, journalEntries, readEntries, repositoryObjects, sortEntries } from './objects.js';

/**
 * Prune: removes the backups a retention policy does not keep, incomplete backups older than a
 * grace period, then every object no remaining backup needs. docs/repository-format.md ("Prune")
 * specifies the order and why a crash at any point leaves every remaining backup complete.
 */

export interface Duration {
  /** As the user wrote it, e.g. `7d`, for messages. */
  text: string;
  ms: number;
}

/** Restic's policy: each rule keeps some backups; a backup any rule keeps stays. Times are UTC. */
export interface RetentionPolicy {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
  /** Every backup started within this of the newest backup's start. */
  within?: Duration;
}

export interface PruneOptions {
  repo: Repository;
  policy: RetentionPolicy;
  /** Incomplete backups whose id is older than this are removed; younger ones may still be running or resumed. */
  grace: Duration;
  dryRun: boolean;
  emit: EventSink;
  signal?: AbortSignal;
  /** The time grace is measured from (tests). */
  now?: Date;
  leaseSeconds?: number;
  /** Names this run in its lock, for whoever it blocks. */
  command?: string;
}

export interface PruneReport {
  dryRun: boolean;
  repository: string;
  policy: string;
  lockId: string;
  /** Newest first. */
  kept: Array<{ id: string; startedAt: string; reasons: string[] }>;
  /** Sealed backups removed (or, in a dry run, that would be), newest first. */
  removed: Array<{ id: string; startedAt: string; files: number; bytes: number }>;
  incomplete: {
    removed: Array<{ id: string; files: number; bytes: number }>;
    kept: Array<{ id: string; files: number; bytes: number; reason: string }>;
  };
  /** Backups with an unreadable manifest: never removed by prune, and their objects are kept. */
  damaged: Array<{ id: string; problem: string }>;
  objects: { removed: number; removedBytes: number; kept: number; keptBytes: number };
  /** Every byte removed: backup files (manifests included) and objects. */
  bytesFreed: number;
  ms: number;
}

export class PruneError extends Error {
  override name = 'PruneError';
}

/** Named points where PACHBACKUP_CRASH_AT makes prune kill itself, for crash tests. */
export type CrashPoint = 'after-manifests-deleted' | 'mid-backup-files' | 'mid-sweep';

const REMOVE_BATCH = 1000;

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 };

/** Parses `7d`, `36h`, `2w`, `1d12h`, `90m` (m is minutes), `30s`. */
export function parseDuration(text: string): Duration {
  const trimmed = text.trim();
  if (!/^(\d+[wdhms])+$/.test(trimmed)) {
    throw new Error(`"${text}" is not a duration; write a number and a unit (w, d, h, m for minutes, s), e.g. 7d, 36h, 2w, 1d12h`);
  }
  let ms = 0;
  for (const [, n, unit] of trimmed.matchAll(/(\d+)([wdhms])/g)) ms += Number(n) * UNITS[unit!]!;
  if (ms <= 0) throw new Error(`"${text}" is zero; give a positive duration`);
  return { text: trimmed, ms };
}

export function policyIsEmpty(policy: RetentionPolicy): boolean {
  return !policy.last && !policy.hourly && !policy.daily && !policy.weekly && !policy.monthly && !policy.yearly && !policy.within;
}

export function describePolicy(policy: RetentionPolicy): string {
  const parts: string[] = [];
  if (policy.last) parts.push(`last ${policy.last}`);
  for (const unit of ['hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) if (policy[unit]) parts.push(`${policy[unit]} ${unit}`);
  if (policy.within) parts.push(`within ${policy.within.text} of the newest`);
  return parts.length ? `keep ${parts.join(', ')}` : 'keep nothing';
}

const BUCKETS = {
  hourly: (t: Date) => t.toISOString().slice(0, 13),
  daily: (t: Date) => t.toISOString().slice(0, 10),
  weekly: isoWeek,
  monthly: (t: Date) => t.toISOString().slice(0, 7),
  yearly: (t: Date) => t.toISOString().slice(0, 4),
} as const;

export interface RetentionDecision {
  id: string;
  time: Date;
  keep: boolean;
  /** Why it is kept: `last`, `daily`, `within 7d`, …; empty when removed. */
  reasons: string[];
}

/**
 * Applies restic's semantics: walking from the newest backup, keep-last keeps the first N; each
 * bucketed rule keeps the newest backup of each of the N most recent buckets (hour, day, ISO
 * week, month, year in UTC) that hold a backup; keep-within keeps every backup started within
 * the duration of the newest one (not of now, so backups that stopped running are not all lost).
 */
export function applyRetention(backups: Array<{ id: string; time: Date }>, policy: RetentionPolicy): RetentionDecision[] {
  const ordered = [...backups].sort((a, b) => b.time.getTime() - a.time.getTime() || (a.id < b.id ? 1 : -1));
  const remaining: Record<keyof typeof BUCKETS, number> = {
    hourly: policy.hourly ?? 0,
    daily: policy.daily ?? 0,
    weekly: policy.weekly ?? 0,
    monthly: policy.monthly ?? 0,
    yearly: policy.yearly ?? 0,
  };
  const lastBucket: Partial<Record<keyof typeof BUCKETS, string>> = {};
  const newest = ordered[0]?.time.getTime() ?? 0;
  return ordered.map((backup, index) => {
    const reasons: string[] = [];
    if (policy.last && index < policy.last) reasons.push('last');
    for (const unit of Object.keys(BUCKETS) as Array<keyof typeof BUCKETS>) {
      if (remaining[unit] <= 0) continue;
      const bucket = BUCKETS[unit](backup.time);
      if (bucket === lastBucket[unit]) continue;
      lastBucket[unit] = bucket;
      remaining[unit]--;
      reasons.push(unit);
    }
    if (policy.within && backup.time.getTime() >= newest - policy.within.ms) reasons.push(`within ${policy.within.text}`);
    return { id: backup.id, time: backup.time, keep: reasons.length > 0, reasons };
  });
}

function isoWeek(t: Date): string {
  const day = new Date(Date.UTC(t.getUTCFullYear(), t.getUTCMonth(), t.getUTCDate()));
  const weekday = day.getUTCDay() || 7;
  // The Thursday of this week decides the ISO year.
  day.setUTCDate(day.getUTCDate() + 4 - weekday);
  const yearStart = Date.UTC(day.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((day.getTime() - yearStart) / 86_400_000 + 1) / 7);
  return `${day.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

/** The start time a backup id encodes (`YYYYMMDDTHHMMSSZ-…`), or undefined for a foreign name. */
export function backupIdTime(id: string): Date | undefined {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z-/.exec(id);
  if (!m) return undefined;
  const t = Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6]));
  return Number.isFinite(t) ? new Date(t) : undefined;
}

interface StoredFile {
  key: string;
  size: number;
}

export async function runPrune(options: PruneOptions): Promise<PruneReport> {
  const { repo, policy, emit, signal } = options;
  const started = performance.now();
  const now = options.now ?? new Date();
  const phases = new PhaseRunner(emit);
  if (policyIsEmpty(policy)) {
    throw new PruneError('refusing to prune without a keep option: it would delete every backup; give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within');
  }

  let lock: LockHandle | undefined;
  const scratch = await ScratchDir.create();
  try {
    const plan = await phases.run('preflight', async () => {
      await repo.open(false);
      // A dry run deletes nothing, so it only needs to keep prunes away, not backups.
      lock = await acquireLock(repo.store, options.dryRun ? 'read' : 'exclusive', { command: options.command ?? `pachbackup prune${options.dryRun ? ' --dry-run' : ''}` }, {
        ...(options.leaseSeconds ? { leaseSeconds: options.leaseSeconds } : {}),
        onEvent: emit,
      });
      emit({ type: 'info', message: `took ${lock.kind} lock ${lock.id} on ${repo.description}` });
      return planPrune(repo, policy, options.grace, now, emit, scratch);
    });
    const report: PruneReport = {
      dryRun: options.dryRun,
      repository: repo.description,
      policy: describePolicy(policy),
      lockId: lock!.id,
      kept: plan.kept,
      removed: plan.removed.map((r) => ({ id: r.id, startedAt: r.startedAt, files: r.files.length, bytes: sum(r.files) })),
      incomplete: {
        removed: plan.incompleteRemoved.map((r) => ({ id: r.id, files: r.files.length, bytes: sum(r.files) })),
        kept: plan.incompleteKept,
      },
      damaged: plan.damaged,
      objects: { removed: plan.sweep.count, removedBytes: plan.sweep.bytes, kept: plan.objectsKept, keptBytes: plan.objectsKeptBytes },
      bytesFreed: 0,
      ms: 0,
    };
    const backupFiles = [...plan.removed, ...plan.incompleteRemoved].flatMap((b) => b.files);
    report.bytesFreed = sum(backupFiles) + plan.sweep.bytes;

    if (!options.dryRun) {
      const held = lock!;
      const guard = (): void => {
        held.assertHeld();
        signal?.throwIfAborted();
      };
      await phases.run('prune', async () => {
        // 1. Manifests first: from here on the backups are no longer listed or restorable.
        const manifests = new Set(plan.removed.map((r) => layout.manifest(r.id)));
        guard();
        await removeInBatches(repo.store, [...manifests].map((key) => ({ key, size: 0 })), manifests.size, guard);
        crashPoint('after-manifests-deleted');
        // 2. Their other files, and incomplete backups past the grace period.
        const rest = backupFiles.filter((f) => !manifests.has(f.key));
        await removeInBatches(repo.store, rest, rest.length, guard, 'mid-backup-files');
        // 3. Sweep last: the mark was taken from remaining backups only, before anything was deleted.
        const progress = new ProgressReporter(emit, 'prune', plan.sweep.count, plan.sweep.bytes);
        await removeInBatches(repo.store, sweptFiles(plan.sweep.path), plan.sweep.count, guard, 'mid-sweep', (batch) => progress.add(batch.length, sum(batch)));
        progress.flush();
      });
    }
    report.ms = Math.round(performance.now() - started);
    return report;
  } finally {
    await lock?.release();
    await scratch.remove();
  }
}

async function* sweptFiles(path: string): AsyncGenerator<StoredFile> {
  for await (const [key, size] of readRows(path) as AsyncIterable<[string, number]>) yield { key, size };
}

interface PrunePlan {
  kept: PruneReport['kept'];
  removed: Array<{ id: string; startedAt: string; files: StoredFile[] }>;
  incompleteRemoved: Array<{ id: string; files: StoredFile[] }>;
  incompleteKept: PruneReport['incomplete']['kept'];
  damaged: PruneReport['damaged'];
  /** The objects no remaining backup needs, in a scratch file (`[key, size]` rows), and their totals. */
  sweep: { path: string; count: number; bytes: number };
  objectsKept: number;
  objectsKeptBytes: number;
}

/**
 * Decides everything before anything is deleted: which backups go, and which objects no
 * remaining backup needs (the mark: indexes of kept sealed backups, journals and indexes of
 * incomplete backups within the grace period and of damaged backups). A kept backup whose index
 * cannot be read stops the prune here, with nothing deleted.
 */
async function planPrune(repo: Repository, policy: RetentionPolicy, grace: Duration, now: Date, emit: EventSink, scratch: ScratchDir): Promise<PrunePlan> {
  const listing = await repo.listBackups();
  const filesById = new Map<string, StoredFile[]>();
  for await (const info of repo.store.list(layout.backupsPrefix)) {
    const id = info.key.slice(layout.backupsPrefix.length).split('/')[0];
    if (!id) continue;
    const files = filesById.get(id) ?? [];
    files.push({ key: info.key, size: info.size });
    filesById.set(id, files);
  }

  const byId = new Map<string, Manifest>(listing.sealed.map((m) => [m.id, m]));
  const decisions = applyRetention(
    listing.sealed.map((m) => ({ id: m.id, time: new Date(m.startedAt) })),
    policy,
  );
  const keptManifests = decisions.filter((d) => d.keep).map((d) => byId.get(d.id)!);
  if (listing.sealed.length > 0 && keptManifests.length === 0) {
    throw new PruneError(`the policy (${describePolicy(policy)}) keeps none of the ${listing.sealed.length} backups; refusing to delete them all`);
  }

  const incompleteRemoved: PrunePlan['incompleteRemoved'] = [];
  const incompleteKept: PrunePlan['incompleteKept'] = [];
  for (const backup of listing.incomplete) {
    const time = backupIdTime(backup.id);
    const files = filesById.get(backup.id) ?? [];
    if (!time) {
      incompleteKept.push({ id: backup.id, files: backup.files, bytes: backup.bytes, reason: 'its name is not a backup id; left alone' });
    } else if (now.getTime() - time.getTime() > grace.ms) {
      incompleteRemoved.push({ id: backup.id, files });
    } else {
      incompleteKept.push({ id: backup.id, files: backup.files, bytes: backup.bytes, reason: `started within the grace period (${grace.text})` });
    }
  }
  for (const d of listing.damaged) {
    emit({ type: 'warning', message: `backup ${d.id} is damaged (${d.problem}); prune keeps it and the objects its index or journals name` });
  }

  // The mark: only backups that remain. The kept indexes are key-ordered streams, merged with the
  // (key-ordered) objects/ listing below, so memory does not grow with the number of objects;
  // opening each checks its checksum first, so a damaged one stops the prune before any deletion.
  const keptIndexes: IndexSource[] = [];
  for (const manifest of keptManifests) {
    try {
      keptIndexes.push(await IndexSource.open(repo, manifest.objects.index));
    } catch (err) {
      throw new PruneError(`cannot read the index of backup ${manifest.id}, which the policy keeps (${(err as Error).message}); nothing was deleted. Run pachbackup verify ${manifest.id}`);
    }
  }
  // Journals and indexes of unsealed or damaged backups, sorted by key through scratch files.
  const damagedIds = new Set(listing.damaged.map((d) => d.id));
  const protectedIds = [...incompleteKept.map((k) => k.id), ...damagedIds];
  const unsealed = async function* (): AsyncGenerator<IndexEntry> {
    yield* journalEntries(repo, protectedIds);
    for (const kept of protectedIds) {
      const index = layout.index(kept);
      if (!(filesById.get(kept) ?? []).some((f) => f.key === index)) continue;
      try {
        yield* repo.streamUnsealedIndex(index);
      } catch (err) {
        // A damaged backup may be a sealed one whose manifest could not be read just now (a
        // transient fault): its objects are kept, so an index that cannot be read stops the prune.
        if (damagedIds.has(kept)) {
          throw new PruneError(`cannot read the index of backup ${kept}, whose manifest cannot be read either (${(err as Error).message}); prune keeps every object a damaged backup names, so nothing was deleted. Run prune again once the repository answers; if the backup stays unreadable, pachbackup verify ${kept} says what is wrong with it, and a backup known to be lost can be removed by deleting backups/${kept}/ from the repository by hand`);
        }
        // An unreadable index of an unsealed backup protects only what was read of it; its journals did what they could.
      }
    }
  };
  const marked = await sortEntries(unsealed(), scratch, 'unsealed-marks');

  const sweepOut = new RowWriter(scratch.file('sweep'));
  const sweep = { path: sweepOut.path, count: 0, bytes: 0 };
  let objectsKept = 0;
  let objectsKeptBytes = 0;
  const cursors = [...keptIndexes.map((index) => new Cursor(index.entries())), new Cursor(readEntries(marked.path))];
  try {
    for await (const info of repositoryObjects(repo)) {
      let needed = false;
      // Every cursor moves to this key (they must all pass it), whether or not an earlier one had it.
      for (const cursor of cursors) if ((await cursor.seek(info.key)) !== undefined) needed = true;
      if (needed) {
        objectsKept++;
        objectsKeptBytes += info.size;
      } else {
        await sweepOut.write([layout.objectsPrefix + info.key, info.size]);
        sweep.count++;
        sweep.bytes += info.size;
      }
    }
  } finally {
    await Promise.all(cursors.map((c) => c.close()));
    await sweepOut.close();
  }

  const removed = decisions
    .filter((d) => !d.keep)
    .map((d) => ({ id: d.id, startedAt: byId.get(d.id)!.startedAt, files: filesById.get(d.id) ?? [] }));
  const kept = decisions.filter((d) => d.keep).map((d) => ({ id: d.id, startedAt: byId.get(d.id)!.startedAt, reasons: d.reasons }));
  emit({
    type: 'info',
    message: `${describePolicy(policy)}: keeping ${kept.length} of ${listing.sealed.length} backups, removing ${removed.length}; ${incompleteRemoved.length} incomplete backup(s) older than ${grace.text} removed, ${incompleteKept.length} kept; ${sweep.count} object(s) no remaining backup needs`,
  });
  return { kept, removed, incompleteRemoved, incompleteKept, damaged: listing.damaged, sweep, objectsKept, objectsKeptBytes };
}

/**
 * Removes files in batches, checking `guard` before each. With a crash point, the batches are at
 * most half of the `count` files, so the point falls after the first batch, genuinely midway.
 */
async function removeInBatches(store: ObjectStore, files: Iterable<StoredFile> | AsyncIterable<StoredFile>, count: number, guard: () => void, crash?: CrashPoint, onBatch?: (batch: StoredFile[]) => void): Promise<void> {
  const size = Math.max(1, Math.min(REMOVE_BATCH, crash ? Math.ceil(count / 2) : REMOVE_BATCH));
  let batch: StoredFile[] = [];
  let first = true;
  const flush = async (): Promise<void> => {
    guard();
    await store.remove(batch.map((f) => f.key));
    onBatch?.(batch);
    batch = [];
    if (first && crash) crashPoint(crash);
    first = false;
  };
  for await (const file of files) {
    batch.push(file);
    if (batch.length >= size) await flush();
  }
  if (batch.length > 0) await flush();
}

/** The hidden crash hook: PACHBACKUP_CRASH_AT=<point> kills the process there, as kill -9 would. */
function crashPoint(point: CrashPoint): void {
  if (process.env.PACHBACKUP_CRASH_AT === point) process.kill(process.pid, 'SIGKILL');
}

function sum(files: StoredFile[]): number {
  let n = 0;
  for (const f of files) n += f.size;
  return n;
}
