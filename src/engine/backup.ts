import { setMaxListeners } from 'node:events';
import { createReadStream } from 'node:fs';
import { readdir, readFile, rm, statfs } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import type { Config } from '../config/schema.js';
import { childEnv, describeServer } from '../postgres/connection.js';
import { DatabaseSnapshot } from '../postgres/snapshot.js';
import { findPgTool, runToolToEnd, startTool, stopTool, toolVersion } from '../postgres/tools.js';
import { describeOwner, ownedBy, PauseLedger, type LedgerEntry } from '../quiesce/ledger.js';
import { QuiescenceCheck } from '../quiesce/quiescence.js';
import { clearOwnEntry, resumeLedgerEntry, resumeWithRetries } from '../quiesce/factory.js';
import { assertExpectedContext } from '../quiesce/strategy.js';
import { acquireLock, type LockHandle } from '../repository/lock.js';
import type { PauseRecord, QuiesceStrategy } from '../quiesce/strategy.js';
import { dumpListDigest, manifestFormatVersion, sealManifest, type FileRef, type Manifest, type TableCount } from '../repository/manifest.js';
import { indexRow, layout, newBackupId, RepositoryError, type IndexEntry } from '../repository/repository.js';
import { TOOL_VERSION } from '../version.js';
import { pachydermGcEnabled } from '../pachyderm/helmValues.js';
import type { ObjectInfo } from '../objectstore/store.js';
import { assertSeparateStores, newRetryTally, openCluster, openRepository, PreflightError, type ClusterHandles } from './context.js';
import { predictBackup, type PlanInputs, type Prediction } from './plan.js';
import { PhaseRunner, type EventSink } from './events.js';
import { forEachConcurrently } from './pool.js';
import { copyMissingObjects, copyPlanned, CopyJournal, entriesLookup, planCopy, readEntries, readPlan, RepositoryHoldings, ServerSideCopier, ServiceMd5, type HeldLookup, type PlanCounts } from './objects.js';
import { algorithmOf } from '../repository/checksum.js';
import { compareKeys, Cursor, mergeByKey, readRows, RowWriter, ScratchDir } from '../objectstore/sorted.js';
import { openStore } from '../objectstore/open.js';
import { withCopyFaults } from '../objectstore/faults.js';
import { defaultRetryPolicy, withRetry, type RetryPolicy, type RetrySummary } from '../objectstore/retry.js';

export interface BackupOptions {
  config: Config;
  strategy: QuiesceStrategy;
  emit: EventSink;
  /** Aborted on SIGINT/SIGTERM: the backup stops, the cluster is resumed, nothing is sealed. */
  signal?: AbortSignal;
  /** Asked before pausing when the strategy needs it; false stops the backup before any change. */
  confirm?: (target: string) => Promise<boolean>;
  /** The backup lock's lease (tests; default DEFAULT_LEASE_SECONDS), as prune's leaseSeconds. */
  leaseSeconds?: number;
}

export interface BackupSummary {
  id: string;
  mode: 'paused' | 'online';
  repository: string;
  databases: Array<{ name: string; role: string; bytes: number; tables: number; rows: number }>;
  /** `md5Count`: objects whose checksum is the MD5 the S3 service checked; the others have a SHA-256 computed here. */
  objects: { count: number; bytes: number; newCount: number; newBytes: number; heldCount: number; heldBytes: number; md5Count: number };
  referencedKeys: number;
  /** How new objects travelled: streamed through pachbackup, copied server-side, or both. */
  copyPath: 'stream' | 'server-side' | 'mixed' | 'none';
  phases: Array<{ name: string; ms: number }>;
  downtimeMs: number | null;
  totalMs: number;
  /** Requests retried after a transient fault (throttling, timeouts, resets), by cause. */
  retries: RetrySummary;
}

export class BackupError extends Error {
  override name = 'BackupError';
}

interface DumpedDatabase {
  role: 'pachyderm' | 'dex';
  name: string;
  /** The dump file; for a directory-format dump, its prefix with the total size and the list digest. */
  ref: FileRef;
  /** The files of a directory-format dump (absent for a custom-format one). */
  files?: FileRef[];
  tables: TableCount[];
  serverVersion: string;
}

/** The repository lock, once taken; the backup that took this one's pause over, when one did; a failed resume's message. */
interface LockBox {
  lock?: LockHandle;
  pauseTakenBy?: LedgerEntry;
  /** Set when this backup lost its lock and found its ledger entry removed: another run resumed its pause. */
  pauseResumedByOther?: boolean;
  resumeFailed?: string;
}

export async function runBackup(options: BackupOptions): Promise<BackupSummary> {
  // The repository lock is taken in preflight and released however the backup ends.
  const lockBox: LockBox = {};
  const scratchBox: { dir?: ScratchDir } = {};
  try {
    return await backupUnderLock(options, lockBox, scratchBox);
  } catch (err) {
    throw lockLossError(lockBox, err);
  } finally {
    await scratchBox.dir?.remove();
    await lockBox.lock?.release();
  }
}

/**
 * A backup whose lock was lost fails with one error saying so, whatever the abort broke first:
 * another backup may hold the repository now, and may have taken this one's pause over. A resume
 * that failed is named in it too: the cluster may still be paused.
 */
function lockLossError(lockBox: LockBox, err: unknown): unknown {
  const lost = lockBox.lock?.signal.aborted ? (lockBox.lock.signal.reason as Error) : undefined;
  if (!lost) return err;
  const taker = lockBox.pauseTakenBy;
  const pause = taker
    ? `; the cluster was not resumed: ${describeOwner(taker)} took this backup's pause over and paused the cluster itself, and resumes it when it ends`
    : lockBox.pauseResumedByOther
      ? `; the cluster was not resumed by this backup: its pause ledger entry was removed, so another run resumed its pause (run "pachbackup status" to see whether anything is paused now)`
      : lockBox.resumeFailed
      ? `; ${lockBox.resumeFailed}`
      : '';
  return new BackupError(`the backup stopped: ${lost.message}${pause}; nothing was sealed`);
}

async function backupUnderLock(options: BackupOptions, lockBox: LockBox, scratchBox: { dir?: ScratchDir }): Promise<BackupSummary> {
  const { config, strategy, emit } = options;
  const startedAt = new Date();
  const started = performance.now();
  const phases = new PhaseRunner(emit);
  const mode = config.backup.mode;
  const concurrency = config.backup.concurrency;
  const id = newBackupId(startedAt);
  const events = { info: (message: string) => emit({ type: 'info', message }), warn: (message: string) => emit({ type: 'warning', message }) };
  const retries = newRetryTally(events.warn);

  // ---- preflight: everything that can fail is checked before the cluster is touched.
  const pre = await phases.run('preflight', async () => {
    assertSeparateStores(config.cluster.objectStore, 'cluster.objectStore', config.repository);
    const cluster = openCluster(config, { maxSockets: concurrency * 2, retry: retries.policy() });
    const repo = openRepository(config, { maxSockets: concurrency * 2, retry: retries.policy() });
    await cluster.source.store.check();
    await repo.store.check();
    await repo.open(true);
    // Before anything is read or paused: a second backup or a prune on this repository is refused here.
    lockBox.lock = await acquireLock(repo.store, 'backup', { command: ['pachbackup', ...process.argv.slice(2)].join(' ') }, {
      ...(options.leaseSeconds ? { leaseSeconds: options.leaseSeconds } : {}),
      onEvent: emit,
    });
    await repo.checkWritable();
    // Under the lock, a ledger can only be left by a run that died with the cluster paused (or
    // about to be). It is the only record of that pause: it is resumed first, as "pachbackup
    // resume" would (scaling back only what is still paused), never overwritten; if that fails,
    // this backup stops before touching the cluster and the ledger stays.
    const leftLedger = new PauseLedger(repo.store, repo.id);
    const left = await leftLedger.read();
    if (left) {
      const what = `${describeOwner(left)} left ${left.record.target} paused (${left.phase}) since ${left.record.startedAt}`;
      events.warn(`${what}: resuming it from the pause ledger before this backup`);
      try {
        await resumeLedgerEntry(config.pause, leftLedger, left, events);
      } catch (err) {
        throw new BackupError(`RESUME FAILED, the cluster may still be paused: ${what}, and resuming it failed: ${(err as Error).message}. Nothing was paused by this run; fix the cause and run "pachbackup resume", then back up again`);
      }
      events.info(`resumed the pause ${left.backupId} left`);
    }
    const pgDump = findPgTool('pg_dump', config.cluster.postgres.binDir);
    const dumpVersion = await toolVersion(pgDump);
    const databaseBytes = await checkDatabases(cluster, pgDump, dumpVersion, mode, (m) => events.warn(m));
    const rawHelmValues = await readHelmValues(config);
    const helmValues = rawHelmValues && (await repo.helmValuesForStorage(rawHelmValues, config.backup.keepHelmSecrets));
    if (mode === 'paused') await assertExpectedContext(strategy, config.pause.expectedContext);
    if (mode === 'online' && rawHelmValues && pachydermGcEnabled(rawHelmValues.toString('utf8'))) {
      events.warn('the Helm values enable Pachyderm garbage collection; online mode still proves every referenced object is held, but a chunk the dump snapshot references that is deleted before it is copied fails the backup');
    }
    const backups = await repo.listBackups();
    const scratch = await ScratchDir.create();
    scratchBox.dir = scratch;
    const holdings = await RepositoryHoldings.load(repo, backups, scratch);
    // The first merge pass: what the bucket holds against what the repository holds, to a scratch plan.
    if (config.backup.dumpJobs > 1) await warnIfScratchSmall(scratch.path, databaseBytes, events.warn);
    const planOut = new RowWriter(scratch.file('precopy-plan'));
    const counts = await planCopy(cluster.source.store.list(), holdings.lookup(), planOut, undefined, options.signal);
    await planOut.close();
    if (counts.folderMarkers) {
      events.warn(`${counts.folderMarkers} zero-byte "folder" object(s) (keys ending in "/", made by an S3 console's "Create folder") in ${cluster.source.store.description} are left out: Pachyderm neither writes nor reads them`);
    }
    const prediction = predictBackup(backups.sealed, { mode, precopy: config.backup.precopy, holdDuringDump: config.pause.holdDuringDump, databaseBytes, ...counts });
    const target = mode === 'paused' ? await strategy.describeTarget() : 'nothing (online mode)';
    emit({ type: 'info', message: `backup ${id}: ${mode} mode; source ${describeServer(cluster.postgres)} and ${cluster.source.store.description}; repository ${repo.description}; pause ${target}` });
    emit({ type: 'info', message: `predicted downtime ${formatSeconds(prediction.downtimeMs)}, total ${formatSeconds(prediction.totalMs)} (${prediction.basis})` });
    const serverSide = serverSideCopier(config, cluster, concurrency);
    if (serverSide) events.info('the cluster bucket and the repository share an S3 service: objects are copied server-side where the credentials allow');
    return { cluster, repo, pgDump, dumpVersion, helmValues, holdings, scratch, plan: planOut.path, counts, databaseBytes, prediction, serverSide };
  });
  const { cluster, repo, pgDump, dumpVersion, holdings, scratch } = pre;
  // From here on the work stops on SIGINT/SIGTERM, and when the lock is lost (this process stalled
  // past its lease, or its heartbeat hung): another backup may hold the repository by then.
  const signal = combineSignals(options.signal, lockBox.lock?.signal);
  const journal = new CopyJournal(repo, id);
  const serviceMd5 = new ServiceMd5(config.backup.serviceChecksums);

  if (mode === 'paused' && strategy.needsConfirmation && options.confirm) {
    const ok = await options.confirm(await strategy.describeTarget());
    if (!ok) throw new BackupError('not confirmed: nothing was paused and nothing was written');
  }

  // ---- precopy: objects are write-once, so most of them can be copied while the cluster runs.
  let serverSideCount = 0;
  let streamedCount = 0;
  let precopied = { count: 0, bytes: 0 };
  /** The pre-copy's output: every object listed in preflight, held, in key order (the copy phase's lookup). */
  let precopiedEntries: string | undefined;
  const copyOptions = (copySignal: AbortSignal | undefined) => ({
    source: cluster.source.store,
    repo,
    concurrency,
    journal,
    emit,
    ...(copySignal ? { signal: copySignal } : {}),
    ...(pre.serverSide ? { serverSide: pre.serverSide } : {}),
    serviceMd5,
    retry: retries.policy(),
  });
  if (config.backup.precopy || mode === 'online') {
    await phases.run('precopy', async () => {
      const out = new RowWriter(scratch.file('precopied'));
      const copied = await copyPlanned({ ...copyOptions(signal), phase: 'precopy', plan: readPlan(pre.plan), total: { objects: pre.counts.missingObjects, bytes: pre.counts.missingBytes }, out });
      await out.close();
      precopiedEntries = out.path;
      serverSideCount += copied.serverSideCount;
      streamedCount += copied.newCount - copied.serverSideCount;
      precopied = { count: copied.newCount, bytes: copied.newBytes };
    });
  }

  let pauseRecord: PauseRecord | undefined;
  let pausedAt: Date | undefined;
  let resumedAt: Date | undefined;
  const ledger = new PauseLedger(repo.store, repo.id);
  let dumps: DumpedDatabase[] = [];
  /** Referenced keys, in key order, read in the pachyderm database's snapshot. */
  let referenced: { path: string; count: number } | undefined;
  /** The backup's index (key order) and, separately, objects fetched by key because no listing had them. */
  let indexEntries: string | undefined;
  let unlistedEntries: IndexEntry[] = [];
  let missingReferenced: { count: number; shown: string[] } = { count: 0, shown: [] };
  let newCount = 0;
  let newBytes = 0;
  let snapshots: OpenSnapshot[] = [];
  // Paused mode resumes the cluster once the snapshot is taken and the objects are copied: the
  // dump then reads that exported snapshot while the cluster runs (docs/repository-format.md).
  const dumpWhilePaused = mode === 'paused' && config.pause.holdDuringDump;

  // ---- snapshot: one exported snapshot per database; the referenced keys are read in it.
  const takeSnapshot = (): Promise<void> =>
    phases.run('snapshot', async () => {
      snapshots = await openSnapshots(cluster);
      const pachyderm = snapshots.find((s) => s.role === 'pachyderm');
      const out = new RowWriter(scratch.file('referenced'));
      if (pachyderm) for await (const key of pachyderm.snapshot.referencedKeys()) await out.write([key]);
      await out.close();
      referenced = { path: out.path, count: out.rows };
    });

  // ---- copy: what the bucket gained since the pre-copy, and every referenced key.
  const copyObjects = (copySignal: AbortSignal | undefined, quiet?: QuiescenceCheck): Promise<void> =>
    phases.run('copy', async () => {
      if (quiet) await quiet.settled();
      const comparer = quiet?.comparer();
      const planOut = new RowWriter(scratch.file('copy-plan'));
      const held = precopiedEntries ? entriesLookup(precopiedEntries) : holdings.lookup();
      const counts = await planCopy(cluster.source.store.list(), held, planOut, comparer && ((info) => comparer.add(info)), copySignal);
      await planOut.close();
      if (comparer) {
        const problems = await comparer.finish();
        if (problems.length > 0) throw notQuiet(problems);
      }
      const out = new RowWriter(scratch.file('index'));
      const copied = await copyPlanned({ ...copyOptions(copySignal), phase: 'copy', plan: readPlan(planOut.path), total: { objects: counts.missingObjects, bytes: counts.missingBytes }, out });
      await out.close();
      indexEntries = out.path;
      serverSideCount += copied.serverSideCount;
      streamedCount += copied.newCount - copied.serverSideCount;
      newCount = precopied.count + copied.newCount;
      newBytes = precopied.bytes + copied.newBytes;
      // Referenced keys the listing did not have (written after it, in online mode): fetched by key.
      // Once MISSING_SHOWN are known missing the backup will fail: the rest are counted without a
      // lookup each (a wrong bucket or prefix would make that one per referenced key, while paused).
      const unlisted: ObjectInfo[] = [];
      const missing = { count: 0, shown: [] as string[] };
      const index = new Cursor(readEntries(indexEntries));
      try {
        for await (const [key] of readRows(referenced!.path) as AsyncIterable<[string]>) {
          copySignal?.throwIfAborted();
          if (await index.seek(key)) continue;
          const info = missing.count < MISSING_SHOWN ? await cluster.source.store.stat(key) : undefined;
          if (info) unlisted.push(info);
          else if (missing.count++ < MISSING_SHOWN) missing.shown.push(key);
        }
      } finally {
        await index.close();
      }
      missingReferenced = missing;
      if (unlisted.length > 0) {
        const more = await copyMissingObjects({ ...copyOptions(copySignal), phase: 'copy', objects: unlisted, held: new Map() });
        serverSideCount += more.serverSideCount;
        streamedCount += more.newCount - more.serverSideCount;
        unlistedEntries = more.entries;
        newCount += more.newCount;
        newBytes += more.newBytes;
      }
    });

  // ---- dump: pg_dump of every database from its exported snapshot, streamed into the repository.
  const dumpAll = (dumpSignal: AbortSignal | undefined): Promise<void> =>
    phases.run('dump', async () => {
      dumps = await dumpDatabases(snapshots, { cluster, repo, pgDump, id, compression: config.backup.dumpCompression, jobs: config.backup.dumpJobs, scratch, signal: dumpSignal, retry: retries.policy({ ...defaultRetryPolicy, attempts: 4 }) });
    });

  /** Writes this backup's pause ledger entry; refused when another backup's entry is there (ours was taken over). */
  const recordPause = async (phase: LedgerEntry['phase']): Promise<void> => {
    // Asked, not only observed through the signal: a process waking from a stall may get here
    // before the timer that aborts the signal has run.
    lockBox.lock?.assertHeld();
    const other = await ledger.write({ record: pauseRecord!, backupId: id, host: hostname(), pid: process.pid, phase, writtenAt: new Date().toISOString() });
    if (other) {
      throw new BackupError(`${ownedBy(other)}: this backup's lock must have been lost and its pause taken over; it writes nothing over that entry and seals nothing`);
    }
  };

  let quiet: QuiescenceCheck | undefined;
  try {
    if (mode === 'paused') {
      pauseRecord = await strategy.plan();
      await recordPause('pausing');
      let failure: unknown;
      try {
        await phases.run('pause', async () => {
          pausedAt = new Date();
          pauseRecord = await strategy.pause(pauseRecord!, events, signal);
          // Sessions idle since the pause completed did nothing while paused; writers finishing during it are expected.
          const quietSince = new Date();
          await recordPause('paused');
          const q = config.pause.quiescence;
          if (q.enabled && strategy.name !== 'none') {
            // The first half of the quiescence check; the copy phase's listing is the second.
            quiet = await QuiescenceCheck.begin({
              pg: cluster.postgres,
              database: config.cluster.databases.pachyderm,
              store: cluster.source.store,
              settleMs: q.settleSeconds * 1000,
              ...(q.tolerateIdleSessions ? { tolerateIdleSince: quietSince } : {}),
              ...(signal ? { signal } : {}),
            });
            if (quiet.sessionProblems.length > 0) throw notQuiet(quiet.sessionProblems);
          }
        });
        const budget = config.pause.maxDowntimeSeconds;
        const budgetSignal = budget ? AbortSignal.timeout(Math.max(0, budget * 1000 - (Date.now() - pausedAt!.getTime()))) : undefined;
        const stateSignal = combineSignals(signal, budgetSignal);
        try {
          await takeSnapshot();
          await copyObjects(stateSignal, quiet);
          if (dumpWhilePaused) await dumpAll(stateSignal);
        } catch (err) {
          if (budgetSignal?.aborted && !signal?.aborted) {
            throw new BackupError(`the pause would exceed the downtime budget of ${budget}s (pause.maxDowntimeSeconds / --max-downtime); the backup was stopped, the cluster resumed, nothing sealed`);
          }
          throw err;
        }
      } catch (err) {
        failure = err;
      } finally {
        // A lock lost once the work was done fails the backup too (nothing is sealed), and
        // whatever goes wrong in the resume below is reported alongside it.
        failure ??= lockBox.lock?.signal.aborted ? lockBox.lock.signal.reason : undefined;
        // Resume always runs once a pause began: on success, on error and on SIGINT/SIGTERM;
        // unless this backup lost its lock and the next one took the pause over: it resumed
        // this pause (from the ledger) and paused the cluster itself, and its ledger entry is the
        // record of that pause. Resuming now would end that pause in the middle of its backup.
        await phases.run('resume', async () => {
          // A ledger that cannot be read is no proof of a takeover: the cluster is resumed.
          const taker = await ledger.ownedByOther(id).catch(() => undefined);
          if (taker) {
            lockBox.pauseTakenBy = taker;
            emit({ type: 'warning', message: `not resuming the cluster: ${ownedBy(taker)}, which took this backup's pause over; that backup resumes the cluster when it ends` });
            return;
          }
          // Lost the lock, and the entry is gone from the repository (this backup wrote it before
          // pausing): the run that took the repository over resumed this pause and cleared it. A
          // second resume could meet that run's own pause, just starting, and end it.
          if (lockBox.lock?.signal.aborted && (await ledger.repositoryEntry().then((e) => e === undefined, () => false))) {
            lockBox.pauseResumedByOther = true;
            emit({ type: 'warning', message: 'not resuming the cluster: this backup lost its lock and its pause ledger entry was removed from the repository, so another run already resumed this pause' });
            return;
          }
          try {
            await resumeWithRetries(strategy, pauseRecord!, events);
            resumedAt = new Date();
          } catch (err) {
            const msg = `RESUME FAILED, the cluster may still be paused: ${(err as Error).message}. Run "pachbackup resume" to retry from the pause ledger (${ledger.localFile}).`;
            // A lock lost meanwhile replaces whatever failed with its own error (lockLossError), which must still say this.
            lockBox.resumeFailed = msg;
            if (failure) emit({ type: 'warning', message: msg });
            else failure = new BackupError(msg);
            return;
          }
          try {
            await clearOwnEntry(ledger, id, events);
          } catch (err) {
            const msg = `the cluster was resumed, but the pause ledger could not be removed (${(err as Error).message}); run "pachbackup resume" (it only undoes what is still paused) to clear it before the next backup`;
            if (failure) emit({ type: 'warning', message: msg });
            else failure = new BackupError(msg);
          }
        });
      }
      if (failure) throw failure;
      if (!dumpWhilePaused) await dumpAll(signal);
    } else {
      await takeSnapshot();
      await copyObjects(signal);
      await dumpAll(signal);
    }
  } finally {
    await quiet?.close();
    await Promise.all(snapshots.map((s) => s.snapshot.close()));
  }

  // ---- seal: every referenced key must be held; the manifest is written last.
  return phases.run('seal', async () => {
    signal?.throwIfAborted();
    lockBox.lock?.assertHeld();
    const missing = missingReferenced;
    if (missing.count > 0) {
      const shown = missing.shown.join(', ');
      // Past the first MISSING_SHOWN, keys were not looked up one by one: they were only absent from the listing.
      const what =
        missing.count > missing.shown.length
          ? `${missing.count} object(s) the pachyderm database references are not in the backup, so it would not restore: the first ${missing.shown.length} are not in the bucket (${shown}), the other ${missing.count - missing.shown.length} were not in its listing`
          : `${missing.count} object(s) the pachyderm database references are not in the bucket, so the backup would not restore: ${shown}`;
      throw new BackupError(
        `${what}. Nothing was sealed. ${mode === 'online' ? 'If Pachyderm garbage collection is on, back up in paused mode or turn it off; if most are missing, ' : 'If most are missing, '}check that cluster.objectStore names the bucket (and prefix) pachd writes to.`,
      );
    }
    // The index streams from the scratch file, merged with the objects fetched by key, in key order.
    let bytes = 0;
    let md5Count = 0;
    const indexLines = async function* (): AsyncGenerator<string> {
      bytes = 0; // counted again if a retry writes the index again
      md5Count = 0;
      for await (const e of mergeByKey(readEntries(indexEntries!), unlistedEntries.sort((a, b) => compareKeys(a.key, b.key)))) {
        bytes += e.size;
        if (algorithmOf(e.checksum) === 'md5') md5Count++;
        yield JSON.stringify(indexRow(e));
      }
    };
    const { count: entryCount, ...indexRef } = await repo.writeLinesGz(layout.index(id), indexLines, signal);
    const referencedLines = async function* (): AsyncGenerator<string> {
      for await (const [key] of readRows(referenced!.path) as AsyncIterable<[string]>) yield key;
    };
    const referencedRef = await repo.writeLinesGz(layout.referenced(id), referencedLines, signal);
    let helmRef: (FileRef & { redacted: boolean }) | null = null;
    if (pre.helmValues) helmRef = await repo.writeHelmValues(id, pre.helmValues);
    if (pre.serverSide?.disabled) emit({ type: 'info', message: `server-side copy was not possible (${pre.serverSide.reason}); objects were streamed` });
    if (serviceMd5.reason) emit({ type: 'info', message: `the S3 service refused an object against its listed ETag (${serviceMd5.reason}); the remaining objects were hashed with SHA-256 here` });
    const downtimeMs = pausedAt && resumedAt ? resumedAt.getTime() - pausedAt.getTime() : null;
    // In the schema's key order: the checksum is computed over the fields in that order.
    const databases = dumps.map((d) => ({
      ...d.ref,
      role: d.role,
      name: d.name,
      serverVersion: d.serverVersion,
      pgDumpVersion: dumpVersion.full,
      tables: d.tables,
      ...(d.files ? { format: 'directory' as const, files: d.files } : {}),
    }));
    const manifest: Manifest = sealManifest({
      format: 'pachbackup-manifest',
      // The lowest version whose readers read this manifest right (manifestFormatVersion).
      formatVersion: manifestFormatVersion(databases, md5Count),
      id,
      repositoryId: repo.id,
      toolVersion: TOOL_VERSION,
      mode,
      startedAt: startedAt.toISOString(),
      finishedAt: new Date().toISOString(),
      source: {
        postgres: { host: config.cluster.postgres.host, port: config.cluster.postgres.port, user: config.cluster.postgres.user, sslmode: config.cluster.postgres.sslmode },
        objectStore: cluster.source.store.description,
      },
      databases,
      objects: { index: indexRef, count: entryCount, bytes, newCount, newBytes, copyPath: copyPathOf(serverSideCount, streamedCount), md5Count },
      referenced: referencedRef,
      helmValues: helmRef,
      pause: pauseRecord && pausedAt && resumedAt ? { strategy: pauseRecord.strategy, target: pauseRecord.target, pausedAt: pausedAt.toISOString(), resumedAt: resumedAt.toISOString(), downtimeMs: downtimeMs ?? 0 } : null,
      phases: phases.timings.map((t) => ({ ...t })),
      sourceStats: { databaseBytes: pre.databaseBytes, objects: pre.counts.objects },
      prediction: { downtimeMs: pre.prediction.downtimeMs, totalMs: pre.prediction.totalMs, basis: pre.prediction.basis },
    });
    // Writing the index can take minutes: the lock is checked again right before the manifest.
    lockBox.lock?.assertHeld();
    await repo.seal(manifest);
    return {
      id,
      mode,
      repository: repo.description,
      databases: dumps.map((d) => ({ name: d.name, role: d.role, bytes: d.ref.size, tables: d.tables.length, rows: d.tables.reduce((n, t) => n + t.rows, 0) })),
      objects: { count: entryCount, bytes, newCount, newBytes, heldCount: entryCount - newCount, heldBytes: bytes - newBytes, md5Count },
      referencedKeys: referencedRef.count,
      copyPath: manifest.objects.copyPath,
      phases: phases.timings.map((t) => ({ ...t })),
      downtimeMs,
      totalMs: Math.round(performance.now() - started),
      retries: retries.summary(),
    };
  });
}

interface OpenSnapshot {
  role: 'pachyderm' | 'dex';
  name: string;
  snapshot: DatabaseSnapshot;
}

/** Exports a snapshot of every database; if one fails, those already open are closed. */
async function openSnapshots(cluster: ClusterHandles): Promise<OpenSnapshot[]> {
  const opened = await Promise.allSettled(cluster.databases.map(async (db) => ({ role: db.role, name: db.name, snapshot: await DatabaseSnapshot.open(cluster.postgres, db.name) })));
  const failed = opened.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) {
    await Promise.all(opened.map((r) => (r.status === 'fulfilled' ? r.value.snapshot.close() : undefined)));
    throw failed.reason;
  }
  return opened.map((r) => (r as PromiseFulfilledResult<OpenSnapshot>).value);
}

/** Referenced keys missing from the bucket named in the error; after this many, the backup is known to fail. */
const MISSING_SHOWN = 10;

function notQuiet(problems: string[]): BackupError {
  return new BackupError(`the cluster is not quiet after pausing, so the backup would not be consistent; the cluster is resumed and nothing is sealed. Still writing: ${problems.join('; ')}`);
}

/**
 * Dumps each database from its exported snapshot, and counts its rows in that same snapshot, so
 * the dump, the row counts and the referenced keys all describe one state, however long after the
 * snapshot (and the resume) the dump runs.
 */
async function dumpDatabases(snapshots: OpenSnapshot[], dump: DumpContext): Promise<DumpedDatabase[]> {
  // The databases are dumped at the same time. The first failure stops the others (their pg_dump
  // killed, their upload aborted), and returns only once they have stopped: nothing of this backup
  // runs on after it has failed and released its lock.
  const stop = new AbortController();
  const signal = combineSignals(dump.signal, stop.signal)!;
  const settled = await Promise.allSettled(
    snapshots.map(async (open): Promise<DumpedDatabase> => {
      try {
        signal.throwIfAborted();
        const dumped = dump.jobs > 1 ? await dumpToDirectory({ ...dump, signal }, open) : { ref: await dumpToStream({ ...dump, signal }, open) };
        const tables = await open.snapshot.tableCounts();
        return { role: open.role, name: open.name, ...dumped, tables, serverVersion: open.snapshot.serverVersion };
      } catch (err) {
        if (!stop.signal.aborted) stop.abort(err);
        throw err;
      }
    }),
  );
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected' && r.reason === stop.signal.reason) ?? settled.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
  return settled.map((r) => (r as PromiseFulfilledResult<DumpedDatabase>).value);
}

/** What dumping a database needs besides its snapshot. */
interface DumpContext {
  cluster: ClusterHandles;
  repo: ReturnType<typeof openRepository>;
  pgDump: string;
  /** The backup's id. */
  id: string;
  /** backup.dumpCompression and backup.dumpJobs. */
  compression: number;
  jobs: number;
  scratch: ScratchDir;
  signal: AbortSignal | undefined;
  /** For the uploads (four attempts: each reruns pg_dump in the same snapshot). */
  retry: RetryPolicy;
}

/** `backup.dumpJobs: 1`: one pg_dump custom-format stream, written straight into the repository. */
async function dumpToStream({ cluster, repo, pgDump, id, compression, signal, retry }: DumpContext, { name, snapshot }: OpenSnapshot): Promise<FileRef> {
  // A transient store fault on the upload reruns pg_dump: the exported snapshot stays open, so
  // every attempt dumps exactly the same state.
  return withRetry(
    async () => {
      const tool = startTool(pgDump, ['--format=custom', `--compress=${compression}`, '--no-password', `--snapshot=${snapshot.snapshotId}`, `--dbname=${name}`], childEnv(cluster.postgres));
      const onAbort = (): void => void tool.child.kill('SIGTERM');
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        const [written] = await Promise.all([repo.writeStream(layout.dump(id, name), tool.child.stdout, signal), tool.done]);
        return written;
      } catch (err) {
        throw await stopTool(tool, err);
      } finally {
        signal?.removeEventListener('abort', onAbort);
      }
    },
    retry,
    signal,
  );
}

/**
 * `backup.dumpJobs` > 1: pg_dump --format=directory --jobs into the scratch directory (every
 * worker reads the exported snapshot), then each file uploaded into the repository through the
 * same write path as everything else. A transient store fault uploads that file again from disk.
 */
async function dumpToDirectory({ cluster, repo, pgDump, id, compression, jobs, scratch, signal, retry }: DumpContext, { role, name, snapshot }: OpenSnapshot): Promise<{ ref: FileRef; files: FileRef[] }> {
  const dir = join(scratch.path, `dump-${role}`);
  await rm(dir, { recursive: true, force: true });
  try {
    const args = ['--format=directory', `--jobs=${jobs}`, `--compress=${compression}`, '--no-password', `--snapshot=${snapshot.snapshotId}`, `--dbname=${name}`, `--file=${dir}`];
    try {
      await runToolToEnd(pgDump, args, childEnv(cluster.postgres), signal);
    } catch (err) {
      signal?.throwIfAborted();
      throw scratchDumpError(name, dir, err as Error);
    }
    const entries = await readdir(dir, { withFileTypes: true });
    const odd = entries.find((e) => !e.isFile());
    if (odd) throw new BackupError(`pg_dump wrote ${join(dir, odd.name)}, which is not a plain file; pachbackup stores directory dumps of plain files only`);
    const prefix = layout.dumpDirectory(id, name);
    const files: FileRef[] = [];
    await forEachConcurrently(
      entries.map((e) => e.name),
      jobs,
      async (file) => {
        const ref = await withRetry(() => repo.writeStream(`${prefix}${file}`, createReadStream(join(dir, file)), signal), retry, signal);
        files.push(ref);
      },
      signal,
    );
    files.sort((a, b) => compareKeys(a.file, b.file));
    return { ref: { file: prefix, size: files.reduce((n, f) => n + f.size, 0), sha256: dumpListDigest(prefix, files) }, files };
  } finally {
    // The local copy goes as soon as it is uploaded: the other database's dump may still need the space.
    await rm(dir, { recursive: true, force: true });
  }
}

function scratchDumpError(database: string, dir: string, err: Error): BackupError {
  const local = /could not (write|create|open|close)|No space left|Permission denied|Read-only file system|Disk quota/i.test(err.message);
  const hint = local
    ? `; backup.dumpJobs > 1 writes the whole dump to the scratch directory (under $TMPDIR) before uploading it, so it needs free space there of about the dumps' size: free space, point TMPDIR at a larger disk, or set backup.dumpJobs: 1 to stream the dump with no local copy`
    : '';
  return new BackupError(`pg_dump --format=directory of database ${database} into ${dir} failed: ${err.message}${hint}`);
}

/** Directory dumps need local disk: warns in preflight when $TMPDIR has less free space than the databases' on-disk size. */
async function warnIfScratchSmall(path: string, databaseBytes: number, warn: (message: string) => void): Promise<void> {
  const fs = await statfs(path);
  const free = fs.bavail * fs.bsize;
  if (free < databaseBytes) {
    warn(
      `backup.dumpJobs > 1 dumps to ${path} first, which has ${formatMiB(free)} free for databases of ${formatMiB(databaseBytes)} on disk; the dumps are usually smaller (no indexes, compressed), but if pg_dump runs out of space the backup fails: point TMPDIR at a larger disk or set backup.dumpJobs: 1`,
    );
  }
}

function formatMiB(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(0)} MiB`;
}

function combineSignals(...signals: Array<AbortSignal | undefined>): AbortSignal | undefined {
  const present = signals.filter((s): s is AbortSignal => s !== undefined);
  if (present.length === 0) return undefined;
  if (present.length === 1) return present[0];
  const combined = AbortSignal.any(present);
  setMaxListeners(0, combined);
  return combined;
}

/**
 * Connects to every database and checks pg_dump can dump it; returns their total size. A
 * `pachyderm` database without storage.chunk_objects is not Pachyderm's metadata (a wrong
 * cluster.databases.pachyderm): no referenced key can be listed, so online mode, whose
 * consistency rests on them, refuses it; a paused backup is warned through `warn`.
 */
async function checkDatabases(cluster: ClusterHandles, pgDump: string, dumpVersion: { major: number; full: string }, mode: 'paused' | 'online', warn: (message: string) => void): Promise<number> {
  let bytes = 0;
  for (const db of cluster.databases) {
    const probe = await DatabaseSnapshot.open(cluster.postgres, db.name);
    try {
      bytes += await probe.databaseBytes();
      const unreadable = await probe.unreadableRelations();
      if (unreadable.length > 0) {
        throw new PreflightError(
          `user ${cluster.postgres.config.user} may not read ${unreadable.length} table(s) or sequence(s) of database "${db.name}" (e.g. ${unreadable.slice(0, 3).join(', ')}), so pg_dump would fail; back up as the database owner or GRANT SELECT on them`,
        );
      }
      if (db.role === 'pachyderm' && !(await probe.hasChunkObjects())) {
        const what = `database "${db.name}" (cluster.databases.pachyderm) has no table storage.chunk_objects: it is not a Pachyderm metadata database, or pachd has never started on it`;
        if (mode === 'online') throw new PreflightError(`${what}; online mode proves the backup consistent through the chunk keys that table references, so it cannot back this up: check cluster.databases.pachyderm, or use paused mode`);
        warn(`${what}; the backup cannot list which objects the database references, so it cannot prove them held: check cluster.databases.pachyderm`);
      }
      if (dumpVersion.major < probe.serverMajor) {
        throw new PreflightError(
          `pg_dump ${dumpVersion.full} (${pgDump}) is older than the server ${describeServer(cluster.postgres)} (PostgreSQL ${probe.serverVersion}); install postgresql-client-${probe.serverMajor} or newer, or set cluster.postgres.binDir`,
        );
      }
    } finally {
      await probe.close();
    }
  }
  return bytes;
}

function formatSeconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

/**
 * `pachbackup plan`: measures what the next backup would do (database sizes, objects not yet
 * held) and predicts its downtime and total time, without pausing or writing anything.
 */
export async function runPlan(config: Config): Promise<{ prediction: Prediction; inputs: PlanInputs; warnings: string[]; history: Array<{ id: string; predictedDowntimeMs: number | null; downtimeMs: number | null; predictedTotalMs: number | null; totalMs: number }> }> {
  const cluster = openCluster(config);
  const repo = openRepository(config);
  await cluster.source.store.check();
  await repo.store.check();
  const pgDump = findPgTool('pg_dump', config.cluster.postgres.binDir);
  const warnings: string[] = [];
  const databaseBytes = await checkDatabases(cluster, pgDump, await toolVersion(pgDump), config.backup.mode, (m) => warnings.push(m));
  let sealed: Manifest[] = [];
  let held: HeldLookup = { get: async () => undefined, close: async () => undefined };
  const scratch = await ScratchDir.create();
  let counts: PlanCounts;
  try {
    try {
      await repo.open(false);
      const backups = await repo.listBackups();
      sealed = backups.sealed;
      held = (await RepositoryHoldings.load(repo, backups, scratch)).lookup();
    } catch (err) {
      if (!(err instanceof RepositoryError)) throw err;
    }
    counts = await planCopy(cluster.source.store.list(), held);
  } finally {
    await scratch.remove();
  }
  const inputs: PlanInputs = { mode: config.backup.mode, precopy: config.backup.precopy, holdDuringDump: config.pause.holdDuringDump, databaseBytes, ...counts };
  return {
    prediction: predictBackup(sealed, inputs),
    inputs,
    warnings,
    history: sealed.map((m) => ({
      id: m.id,
      predictedDowntimeMs: m.prediction?.downtimeMs ?? null,
      downtimeMs: m.pause?.downtimeMs ?? null,
      predictedTotalMs: m.prediction?.totalMs ?? null,
      totalMs: Date.parse(m.finishedAt) - Date.parse(m.startedAt),
    })),
  };
}

/** A server-side copier when the cluster bucket and an unencrypted repository share an S3 service. */
function serverSideCopier(config: Config, cluster: ClusterHandles, concurrency: number): ServerSideCopier | undefined {
  const source = cluster.source.s3;
  if (!source || (config.repository as Record<string, unknown>).encryption) return undefined;
  const target = openStore(config.repository, 'repository', { maxSockets: concurrency * 2 }).s3;
  if (!target || !source.sameServiceAs(target)) return undefined;
  // PACHBACKUP_FAULTS rules of op `copy` apply here, under the copier: it classifies them as the service's errors.
  return new ServerSideCopier(withCopyFaults('repository', (key: string, size: number, signal?: AbortSignal, sourceMd5?: string, sourceEtag?: string) => target.copyFrom(source, key, layout.object(key), size, signal, sourceMd5, sourceEtag)));
}

function copyPathOf(serverSide: number, streamed: number): 'stream' | 'server-side' | 'mixed' | 'none' {
  if (serverSide === 0 && streamed === 0) return 'none';
  if (serverSide === 0) return 'stream';
  return streamed === 0 ? 'server-side' : 'mixed';
}

/** The Helm values to keep: from the configured file, or from the live release's Secret. */
async function readHelmValues(config: Config): Promise<Buffer | undefined> {
  if (config.cluster.helmValues) {
    try {
      return await readFile(config.cluster.helmValues);
    } catch (err) {
      throw new PreflightError(`cluster.helmValues: cannot read ${config.cluster.helmValues} (${(err as NodeJS.ErrnoException).code}); fix the path or remove the key`);
    }
  }
  const release = config.cluster.helmRelease;
  if (!release) return undefined;
  const kubeconfig = release.kubeconfig ?? config.pause.kubernetes?.kubeconfig;
  const context = release.context ?? config.pause.kubernetes?.context;
  // Loaded only when used: the Kubernetes client is heavy to load.
  const { readHelmReleaseValues } = await import('../quiesce/helmRelease.js');
  const yaml = await readHelmReleaseValues({ ...(kubeconfig ? { kubeconfig } : {}), ...(context ? { context } : {}) }, release.namespace, release.name);
  return Buffer.from(yaml);
}
