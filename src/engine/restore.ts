import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { access, mkdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Config, ObjectStoreConfig, PostgresConfig } from '../config/schema.js';
import { openStore } from '../objectstore/open.js';
import { asRetryable, CHECKSUM_FALLBACK, failsAtOnce, isRetryable, withRetry, type RetryPolicy, type RetrySummary, type RetryTally } from '../objectstore/retry.js';
import { ChecksumMismatchError, StoreError, type ObjectStore } from '../objectstore/store.js';
import { locationsOverlap } from '../objectstore/url.js';
import { REDACTED, rewriteHelmValues } from '../pachyderm/helmValues.js';
import { childEnv, connect, describeServer, pgServer, type PgServer } from '../postgres/connection.js';
import { createDatabase, databaseState, dropDatabase, swapDatabases, SwapOutcomeUnknownError } from '../postgres/restore.js';
import { countTables } from '../postgres/snapshot.js';
import { findPgTool, runToolToEnd, startTool, stopTool, toolVersion } from '../postgres/tools.js';
import { algorithmOf, digestHex } from '../repository/checksum.js';
import { pipeWithDigest } from '../repository/digest.js';
import { dumpFormat, type DatabaseEntry } from '../repository/manifest.js';
import { acquireLock, type LockHandle } from '../repository/lock.js';
import { layout, RepositoryError, type IndexEntry, type Repository } from '../repository/repository.js';
import { PreflightError, newRetryTally, openRepository } from './context.js';
import { PhaseRunner, ProgressReporter, type EventSink } from './events.js';
import { IndexSource, repositoryObjects } from './objects.js';
import { Cursor, inKeyOrder, readRows, RowWriter, ScratchDir } from '../objectstore/sorted.js';
import { forEachConcurrently } from './pool.js';
import { BODY_READ_RETRY, checkDump, crossCheck, type VerifyProblem } from './verify.js';

export interface RestoreTargets {
  postgres: PostgresConfig;
  /** Database name to restore each role into. */
  databases: { pachyderm: string; dex: string | null };
  objectStore: ObjectStoreConfig;
  helmValuesOut?: string;
}

export interface RestoreOptions {
  config: Config;
  backup: string;
  targets: RestoreTargets;
  /** Restore into non-empty databases (dropped and recreated) and a non-empty bucket. */
  force: boolean;
  dryRun: boolean;
  noOwner: boolean;
  concurrency: number;
  /** pg_restore --jobs; default restore.jobs. */
  jobs?: number;
  emit: EventSink;
  signal?: AbortSignal;
  /** Counts this restore's retries into a caller's tally (a drill's, which also counts its own requests); default a new one. */
  retries?: RetryTally;
}

export interface RestoreSummary {
  id: string;
  dryRun: boolean;
  plan: string[];
  databases: Array<{ name: string; from: string; tables: number; rows: number }>;
  objects: { count: number; bytes: number };
  helmValuesOut: string | null;
  checks: string[];
  phases: Array<{ name: string; ms: number }>;
  totalMs: number;
  /** Requests retried after a transient fault (throttling, timeouts, resets), by cause. */
  retries: RetrySummary;
}

export class RestoreError extends Error {
  override name = 'RestoreError';
}

/** Resolves restore targets from the config's `restore` section. */
export function restoreTargetsFromConfig(config: Config): RestoreTargets {
  const r = config.restore;
  if (!r?.postgres) throw new PreflightError('restore.postgres is required: the PostgreSQL server to restore into (host, port, user, password)');
  if (!r.objectStore) throw new PreflightError('restore.objectStore is required: the new, empty bucket or directory to restore the objects into');
  return {
    postgres: r.postgres,
    databases: r.databases ?? { pachyderm: config.cluster.databases.pachyderm, dex: config.cluster.databases.dex },
    objectStore: r.objectStore,
    ...(r.helmValuesOut ? { helmValuesOut: r.helmValuesOut } : {}),
  };
}

export async function runRestore(options: RestoreOptions): Promise<RestoreSummary> {
  // A read lock: restores run beside backups, but a prune must not delete what is being restored.
  const lockBox: { lock?: LockHandle } = {};
  try {
    return await restoreUnderLock(options, lockBox);
  } finally {
    await lockBox.lock?.release();
  }
}

async function restoreUnderLock(options: RestoreOptions, lockBox: { lock?: LockHandle }): Promise<RestoreSummary> {
  // Local copies of dumps pg_restore reads from a file live here until the restore ends.
  const scratch = await ScratchDir.create();
  try {
    return await restoreWithScratch(options, lockBox, scratch);
  } finally {
    await scratch.remove();
  }
}

async function restoreWithScratch(options: RestoreOptions, lockBox: { lock?: LockHandle }, scratch: ScratchDir): Promise<RestoreSummary> {
  const { config, targets, emit, signal } = options;
  const started = performance.now();
  const phases = new PhaseRunner(emit);
  const plan: string[] = [];
  const jobs = options.jobs ?? config.restore?.jobs ?? 1;
  const retries = options.retries ?? newRetryTally((message) => emit({ type: 'warning', message }));

  const pre = await phases.run('preflight', async () => {
    const repo = openRepository(config, { maxSockets: options.concurrency * 2, retry: retries.policy() });
    await repo.open(false);
    lockBox.lock = await acquireLock(repo.store, 'read', { command: `pachbackup restore ${options.backup}` }, { onEvent: emit });
    const manifest = await repo.resolve(options.backup);
    // Index and referenced keys are merged as key-ordered streams: memory does not grow with the backup.
    const found: VerifyProblem[] = [];
    const { indexOrdered } = await crossCheck(repo, manifest, found);
    const broken = found.find((p) => !p.item.startsWith('object '));
    if (broken) throw new RepositoryError(broken.problem);
    if (found.length > 0) {
      throw new RestoreError(`backup ${manifest.id} is incomplete: ${found.length} referenced object(s) are not in its index, e.g. ${found[0]!.item.slice('object '.length)}; it cannot be restored`);
    }
    const index = await IndexSource.open(repo, manifest.objects.index, indexOrdered);
    // Every dump is read whole against its SHA-256 before anything changes; a dump pg_restore must
    // read from a file (directory format, or --jobs) is kept on local disk as it is read.
    const localDumps = new Map<DatabaseEntry, string>();
    for (const [at, db] of manifest.databases.entries()) {
      const local = !options.dryRun && (dumpFormat(db) === 'directory' || jobs > 1) ? join(scratch.path, `dump-${at}`) : undefined;
      if (local) await mkdir(local);
      const copyTo = local ? (name: string) => join(local, name) : undefined;
      const problems = await checkDump(repo, db, { signal, concurrency: Math.max(jobs, 4), retry: retries.policy(BODY_READ_RETRY), ...(copyTo ? { copyTo } : {}) }).catch((err: unknown) => {
        throw local ? new RestoreError(`downloading the dump of database ${db.name} to ${local} failed: ${(err as Error).message}; restoring a directory-format dump or with restore.jobs > 1 needs free space under $TMPDIR of about the dump's size`) : err;
      });
      const first = problems[0];
      if (first) throw new RestoreError(`backup ${manifest.id}: the ${first.item} is ${first.problem}; restore refused, nothing was changed. Run pachbackup verify ${manifest.id}`);
      if (local) localDumps.set(db, dumpFormat(db) === 'directory' ? local : join(local, 'dump'));
    }
    await assertObjectsPresent(repo, index, manifest.id);

    const target = pgServer(targets.postgres, 'restore.postgres');
    const pgRestore = findPgTool('pg_restore', targets.postgres.binDir);
    const restoreVersion = await toolVersion(pgRestore);
    for (const db of manifest.databases) {
      const dumpMajor = Number(db.pgDumpVersion.split('.')[0]);
      if (restoreVersion.major < dumpMajor) {
        throw new PreflightError(`pg_restore ${restoreVersion.full} cannot read a dump made by pg_dump ${db.pgDumpVersion}; install postgresql-client-${dumpMajor} or newer`);
      }
    }
    const mapping = manifest.databases.map((db) => {
      const name = db.role === 'pachyderm' ? targets.databases.pachyderm : targets.databases.dex;
      if (!name) throw new PreflightError(`the backup holds database ${db.name} (${db.role}) but restore.databases.${db.role} is null; name a target database`);
      return { db, target: name };
    });
    const named = new Map<string, string>();
    for (const { db, target: name } of mapping) {
      const other = named.get(name);
      if (other) throw new PreflightError(`restore.databases names "${name}" for both ${other} and ${db.role}; give each database its own target (restore.databases or --db-map pachyderm=NAME,dex=NAME)`);
      named.set(name, db.role);
    }
    const existing: string[] = [];
    for (const { target: name } of mapping) {
      const state = await databaseState(target, name);
      if (state.exists && (state.userTables > 0 || state.largeObjects > 0)) {
        const held = state.largeObjects > 0 ? `${state.userTables} tables, ${state.largeObjects} large objects` : `${state.userTables} tables`;
        if (!options.force) {
          throw new RestoreError(`target database "${name}" on ${describeServer(target)} is not empty (${held}); restore into a new database (restore.databases or --db-map) or pass --force to drop and recreate it`);
        }
        plan.push(`drop and recreate non-empty database "${name}" (--force)`);
      }
      if (state.exists) existing.push(name);
    }
    const out = openStore(targets.objectStore, 'restore.objectStore', { maxSockets: options.concurrency * 2, retry: retries.policy() });
    const repoLocation = openStore(config.repository, 'repository').location;
    if (locationsOverlap(out.location, targets.objectStore.endpoint, repoLocation, config.repository.endpoint)) {
      throw new PreflightError('restore.objectStore overlaps the repository; restore into a separate bucket or directory');
    }
    await out.store.check();
    let targetObjects = 0;
    for await (const _ of out.store.list()) {
      targetObjects++;
      break;
    }
    if (targetObjects > 0 && !options.force) {
      throw new RestoreError(`target store ${out.store.description} is not empty; restore into a new bucket or prefix, or pass --force to write into it`);
    }
    // The rewrite is computed now, so a values file that cannot be rewritten stops the restore before it changes anything.
    let helmValues: ReturnType<typeof rewriteHelmValues> | undefined;
    if (manifest.helmValues && targets.helmValuesOut) {
      const kept = (await repo.readVerified(manifest.helmValues)).toString('utf8');
      try {
        helmValues = rewriteHelmValues(kept, {
          postgres: { host: targets.postgres.host, port: targets.postgres.port, database: targets.databases.pachyderm, identityDatabase: targets.databases.dex ?? 'dex' },
          objectStore: {
            url: targets.objectStore.url,
            ...(targets.objectStore.endpoint ? { endpoint: targets.objectStore.endpoint } : {}),
            region: targets.objectStore.region,
          },
        });
      } catch (err) {
        throw new PreflightError(`the kept Helm values cannot be rewritten for the targets: ${(err as Error).message}`);
      }
    } else if (targets.helmValuesOut) {
      emit({ type: 'warning', message: `backup ${manifest.id} kept no Helm values, so ${targets.helmValuesOut} will not be written` });
    }
    if (helmValues !== undefined && targets.helmValuesOut) {
      const present = await stat(targets.helmValuesOut).catch(() => undefined);
      if (present && !options.force) {
        throw new RestoreError(`the Helm values file ${targets.helmValuesOut} already exists; name a new file (--helm-values-out or restore.helmValuesOut) or pass --force to replace it`);
      }
      if (present) plan.push(`replace the existing file ${targets.helmValuesOut} (--force)`);
      // Written last, into its directory: a directory that is missing or read-only would otherwise
      // be found only after the whole restore, which would then be rolled back.
      const dir = dirname(targets.helmValuesOut);
      const writable = await access(dir, fsConstants.W_OK).then(
        async () => (await stat(dir)).isDirectory(),
        () => false,
      );
      if (!writable) throw new RestoreError(`cannot write the Helm values to ${targets.helmValuesOut}: ${dir} is not a writable directory; create it or name another file (--helm-values-out or restore.helmValuesOut)`);
    }
    for (const { db, target: name } of mapping) plan.push(`restore database ${db.name} (${db.size} bytes dump, ${db.tables.length} tables) into "${name}" on ${describeServer(target)}`);
    plan.push(`copy ${manifest.objects.count} objects (${manifest.objects.bytes} bytes) into ${out.store.description}, checking each recorded checksum`);
    if (helmValues !== undefined && targets.helmValuesOut) plan.push(`write Helm values rewritten for the targets to ${targets.helmValuesOut}`);
    return { repo, manifest, index, target, pgRestore, mapping, existing, out: out.store, targetWasEmpty: targetObjects === 0, helmValues, localDumps };
  });
  const { repo, manifest, index, target, pgRestore, mapping, out } = pre;
  const objects = { count: manifest.objects.count, bytes: manifest.objects.bytes };
  const base = { id: manifest.id, plan, phases: phases.timings, helmValuesOut: null, checks: [] as string[] };
  if (options.dryRun) {
    return { ...base, dryRun: true, databases: [], objects, totalMs: Math.round(performance.now() - started), retries: retries.summary() };
  }

  // Everything this restore creates, so a failure can take it back and leave no half-restored target.
  const createdDatabases: string[] = [];
  // Keys written to the target go to a scratch file (not memory), for the rollback. Keys that were
  // in the target before (a --force restore into a non-empty store) are not recorded: the rollback
  // must not delete what this restore did not create.
  const written = new RowWriter(scratch.file('restored-keys'));
  // A database that exists already is replaced only once the restore has been proven good: the
  // backup is restored into a new database beside it, checked, and only then swapped in.
  const suffix = randomBytes(4).toString('hex');
  const work = mapping.map(({ db, target: name }) => ({ db, target: pre.existing.includes(name) ? `pachbackup_restore_${suffix}_${db.role}` : name, final: name }));
  let helmTemp: string | undefined;
  /** Set once an existing database was (or may have been) replaced by its restored copy: a rollback then keeps the objects. */
  let replaced = false;
  try {
    await phases.run('restore-objects', () => restoreObjects(repo, out, index, objects, written, pre.targetWasEmpty, options.concurrency, emit, retries.policy(), signal));
    const databases = await phases.run('restore-databases', async () => {
      const done: RestoreSummary['databases'] = [];
      for (const { db, target: name, final } of work) {
        signal?.throwIfAborted();
        await createDatabase(target, name);
        createdDatabases.push(name);
        const local = pre.localDumps.get(db);
        if (local) await pgRestoreFromFile(local, db, target, name, pgRestore, { noOwner: options.noOwner, jobs }, signal);
        else await pgRestoreFromRepository(repo, db, target, name, pgRestore, options.noOwner, retries.policy(BODY_READ_RETRY), signal);
        done.push({ name: final, from: db.name, tables: db.tables.length, rows: db.tables.reduce((n, t) => n + t.rows, 0) });
      }
      return done;
    });
    const checks = await phases.run('check', () => checkRestored(index, objects, target, work, out));
    let helmValuesOut: string | null = null;
    if (pre.helmValues !== undefined && targets.helmValuesOut) {
      helmValuesOut = targets.helmValuesOut;
      await phases.run('helm-values', async () => {
        const rewrite = pre.helmValues!;
        for (const w of rewrite.warnings) emit({ type: 'warning', message: w });
        if (manifest.helmValues?.redacted) {
          emit({ type: 'warning', message: `the kept Helm values had their secrets redacted (unencrypted repository): replace every ${REDACTED} in ${targets.helmValuesOut} before installing` });
        }
        // Written beside the target with mode 0600 (it may hold secrets), renamed into place last.
        helmTemp = join(dirname(targets.helmValuesOut!), `.${basename(targets.helmValuesOut!)}.pachbackup-${suffix}`);
        await writeFile(helmTemp, rewrite.yaml, { mode: 0o600, flag: 'wx' });
      });
    }
    // Proven good: the databases that existed are replaced now, all in one transaction (a failure
    // leaves every one as it was and rolls the restore back). The replaced ones are then dropped.
    const swaps = work.filter((w) => w.target !== w.final).map((w) => ({ copy: w.target, existing: w.final, old: `pachbackup_replaced_${suffix}_${w.db.role}` }));
    /** From here the restored copies (perhaps in place) and the objects they refer to are kept, whatever happens next. */
    const keepCopies = (): void => {
      replaced = true;
      const copies = new Set(swaps.map((s) => s.copy));
      createdDatabases.splice(0, createdDatabases.length, ...createdDatabases.filter((name) => !copies.has(name)));
    };
    if (swaps.length > 0) {
      await swapDatabases(target, swaps).catch((err: unknown) => {
        if (err instanceof SwapOutcomeUnknownError) {
          keepCopies();
          throw new RestoreError(`putting the restored databases in place of ${swaps.map((s) => `"${s.existing}"`).join(' and ')} may or may not have taken effect: ${err.message}. Nothing is removed: check which databases are where, and drop the ones not wanted`);
        }
        throw new RestoreError(
          `putting the restored databases in place of ${swaps.map((s) => `"${s.existing}"`).join(' and ')} on ${describeServer(target)} failed (${(err as Error).message}); nothing was replaced: ${swaps.length > 1 ? 'they are' : 'it is'} as before`,
        );
      });
      keepCopies();
      for (const s of swaps) {
        await dropDatabase(target, s.old).catch((err: unknown) => {
          emit({ type: 'warning', message: `the database "${s.existing}" replaced by the restore is kept as "${s.old}": dropping it failed (${(err as Error).message}); drop it with DROP DATABASE "${s.old}"` });
        });
      }
    }
    if (helmTemp && targets.helmValuesOut) {
      const staged = helmTemp;
      helmTemp = undefined;
      try {
        await rename(staged, targets.helmValuesOut);
        emit({ type: 'info', message: `wrote ${targets.helmValuesOut} (${pre.helmValues!.changes.map((c) => c.path).join(', ')})` });
      } catch (err) {
        // Databases already replaced are not rolled back for a file: the values are kept where they were staged.
        if (!replaced) {
          await rm(staged, { force: true }).catch(() => undefined);
          throw err;
        }
        helmValuesOut = staged;
        emit({ type: 'warning', message: `the Helm values could not be moved to ${targets.helmValuesOut} (${(err as Error).message}); they are in ${staged} (mode 0600): move them there before installing` });
      }
    }
    return { ...base, dryRun: false, databases, objects, helmValuesOut, checks, totalMs: Math.round(performance.now() - started), retries: retries.summary() };
  } catch (err) {
    // Once a database that existed was dropped and its restored copy kept, the objects it refers to stay.
    emit({
      type: 'warning',
      message: replaced
        ? `restore failed after replacing an existing database; keeping the ${written.rows} restored object(s) the restored database refers to, removing ${createdDatabases.length} unused database(s)`
        : `restore failed; removing what it created (${createdDatabases.length} database(s), ${written.rows} object(s))`,
    });
    for (const name of createdDatabases) await dropDatabase(target, name).catch(() => undefined);
    if (!replaced) await removeWritten(out, written).catch(() => undefined);
    if (helmTemp) await rm(helmTemp, { force: true }).catch(() => undefined);
    throw err;
  } finally {
    await written.close().catch(() => undefined);
  }
}

/** Removes every key the restore wrote, read back from its scratch file in batches. */
async function removeWritten(out: ObjectStore, written: RowWriter): Promise<void> {
  await written.close();
  let batch: string[] = [];
  for await (const [key] of readRows(written.path) as AsyncIterable<[string]>) {
    batch.push(key);
    if (batch.length >= 1000) {
      await out.remove(batch);
      batch = [];
    }
  }
  if (batch.length > 0) await out.remove(batch);
}

/** Every indexed object must be in the repository with its size: the index merged with the objects/ listing. */
async function assertObjectsPresent(repo: Repository, index: IndexSource, id: string): Promise<void> {
  const present = new Cursor(repositoryObjects(repo));
  let absent = 0;
  let wrong = 0;
  let first: string | undefined;
  try {
    for await (const e of index.entries()) {
      const info = await present.seek(e.key);
      if (!info) {
        absent++;
        first ??= `missing ${e.key}`;
      } else if (info.size !== e.size) {
        wrong++;
        first ??= `wrong size ${e.key}`;
      }
    }
  } finally {
    await present.close();
  }
  if (absent > 0 || wrong > 0) {
    throw new RestoreError(`backup ${id} cannot be restored: ${absent} object(s) missing and ${wrong} of the wrong size in the repository (${first}); restore refused, nothing was changed. Run pachbackup verify ${id}`);
  }
}


async function restoreObjects(
  repo: Repository,
  out: ObjectStore,
  index: IndexSource,
  total: { count: number; bytes: number },
  written: RowWriter,
  targetWasEmpty: boolean,
  concurrency: number,
  emit: EventSink,
  retry: RetryPolicy,
  signal?: AbortSignal,
): Promise<void> {
  const progress = new ProgressReporter(emit, 'restore-objects', total.count, total.bytes);
  // Whether the target answers Content-MD5 puts with the MD5 as ETag; the first that does not
  // (SSE-KMS, a store ignoring Content-MD5) turns the MD5s over to this process from then on.
  let targetVouches = true;
  await forEachConcurrently(
    withPresence(index.entries(), out, targetWasEmpty),
    concurrency,
    async ({ entry, recorded }) => {
      await withRetry(
        async () => {
          const body = await failsAtOnce(repo.store.get(layout.object(entry.key), signal));
          if (recorded) await written.write([entry.key]);
          // An MD5 checksum is checked by the target service itself when it can (Content-MD5): nothing to hash here.
          const algorithm = algorithmOf(entry.checksum);
          const serviceChecks = targetVouches && algorithm === 'md5' && entry.size <= (out.md5CheckedPutLimit ?? -1);
          const damaged = `object ${entry.key} in the repository does not match its recorded checksum: the backup is damaged (run pachbackup verify)`;
          const put = { size: entry.size, ...(serviceChecks ? { contentMd5: digestHex(entry.checksum) } : {}) };
          const { bytes, hex } = await pipeWithDigest(body, (digest, putSignal) => out.put(entry.key, digest, put, putSignal), signal, serviceChecks ? null : algorithm).catch((err: unknown) => {
            if (err instanceof ChecksumMismatchError && err.refused) throw new StoreError(damaged, false, { cause: err });
            if (err instanceof ChecksumMismatchError) {
              targetVouches = false;
              throw new StoreError(`restoring ${entry.key}: ${err.message}; restoring it again with its MD5 computed here`, true, { cause: err, code: CHECKSUM_FALLBACK });
            }
            throw asRetryable(err, `restoring ${entry.key}`, signal);
          });
          if (bytes !== entry.size || (!serviceChecks && hex !== digestHex(entry.checksum))) throw new StoreError(damaged, false);
        },
        retry,
        signal,
      );
      progress.add(1, entry.size);
    },
    signal,
  );
  progress.flush();
}

/**
 * Each index entry, with whether the restore will have created its object (`recorded`): in a
 * target that held objects before, one already there is not this restore's to remove on a
 * rollback. The target's listing is merged with the index (both in key order), one LIST per
 * thousand keys instead of a HEAD per object; it is read before each object is copied, so a
 * retry does not take the restore's own earlier attempt for an object that was there.
 */
async function* withPresence(entries: AsyncIterable<IndexEntry>, out: ObjectStore, targetWasEmpty: boolean): AsyncGenerator<{ entry: IndexEntry; recorded: boolean }> {
  if (targetWasEmpty) {
    for await (const entry of entries) yield { entry, recorded: true };
    return;
  }
  const present = new Cursor(inKeyOrder(out.list(), `the listing of ${out.description}`));
  try {
    for await (const entry of entries) yield { entry, recorded: (await present.seek(entry.key)) === undefined };
  } finally {
    await present.close();
  }
}

/** pg_restore of a dump already downloaded and checked: a custom-format file or a directory. */
async function pgRestoreFromFile(
  path: string,
  db: DatabaseEntry,
  server: PgServer,
  name: string,
  pgRestore: string,
  options: { noOwner: boolean; jobs: number },
  signal?: AbortSignal,
): Promise<void> {
  // --single-transaction cannot be combined with --jobs; the database is new either way, and a
  // failed restore drops it again.
  const args = ['--no-password', '--exit-on-error', options.jobs > 1 ? `--jobs=${options.jobs}` : '--single-transaction', `--dbname=${name}`];
  if (options.noOwner) args.push('--no-owner', '--no-acl');
  if (dumpFormat(db) === 'directory') args.push('--format=directory');
  try {
    await runToolToEnd(pgRestore, [...args, path], childEnv(server), signal);
  } catch (err) {
    signal?.throwIfAborted();
    throw new RestoreError(`restoring database ${name} on ${describeServer(server)}: ${(err as Error).message}`);
  }
}

/** How long a pg_restore that stopped reading its input may take to exit with its own error. */
const TOOL_EXIT_GRACE_MS = 5000;

/**
 * pg_restore fed straight from the repository (a custom-format dump, one job): nothing on local
 * disk. pg_restore runs in one transaction, so when the read of the dump breaks mid-body (a reset
 * connection) the partial restore rolls back; the database is then created again and the whole
 * dump streamed once more, up to `retry.attempts` times. A failure of pg_restore itself, or a
 * dump that does not decrypt or match its checksum, is not retried.
 */
async function pgRestoreFromRepository(
  repo: Repository,
  db: DatabaseEntry,
  server: PgServer,
  name: string,
  pgRestore: string,
  noOwner: boolean,
  retry: RetryPolicy,
  signal?: AbortSignal,
): Promise<void> {
  const args = ['--no-password', '--exit-on-error', '--single-transaction', `--dbname=${name}`];
  if (noOwner) args.push('--no-owner', '--no-acl');
  let attempt = 0;
  await withRetry(
    async () => {
      signal?.throwIfAborted();
      if (attempt++ > 0) {
        // Start again from an empty database (the rolled-back transaction left it so; this makes sure).
        await dropDatabase(server, name);
        await createDatabase(server, name);
      }
      const tool = startTool(pgRestore, args, childEnv(server));
      let readBroke: unknown;
      // pg_restore failed or stopped reading on its own: a broken read is then its consequence
      // (EPIPE), and its own error is the one to report, once.
      let toolFailed = false;
      let stopping = false;
      tool.done.catch(() => {
        if (!stopping) toolFailed = true;
      });
      try {
        const body = await failsAtOnce(repo.store.get(db.file, signal));
        body.once('error', (err) => (readBroke ??= err));
        const [digest] = await Promise.all([
          pipeWithDigest(
            body,
            (stream) =>
              new Promise<void>((resolve, reject) =>
                stream
                  .pipe(tool.child.stdin)
                  .on('finish', resolve)
                  .on('error', (err) => {
                    if (!stopping) toolFailed = true;
                    reject(err);
                  }),
              ),
            signal,
          ),
          tool.done,
        ]);
        if (digest.hex !== db.sha256) throw new RestoreError(`the dump of ${db.name} changed while it was restored (checksum mismatch); the restore is not trustworthy`);
      } catch (err) {
        stopping = true;
        const toolExited = tool.child.exitCode !== null || tool.child.signalCode !== null;
        const readFault = readBroke !== undefined && !toolFailed && !toolExited && !signal?.aborted;
        // pg_restore closed its input: give it a moment to exit and say why, rather than kill it.
        if (toolFailed && !toolExited) await Promise.race([tool.done.catch(() => undefined), sleep(TOOL_EXIT_GRACE_MS)]);
        const cause = await stopTool(tool, err);
        if (readFault) {
          // The dump's read broke, not pg_restore: a transient fault unless the store says otherwise.
          const failure = asRetryable(readBroke, `reading the dump of ${db.name} into pg_restore`, signal);
          if (isRetryable(failure)) throw failure;
        }
        throw new RestoreError(`restoring database ${name} on ${describeServer(server)}: ${(cause as Error).message ?? String(cause)}`);
      }
    },
    retry,
    signal,
  ).catch((err: unknown) => {
    if (err instanceof StoreError && err.retryable) throw new RestoreError(`restoring database ${name} on ${describeServer(server)}: ${err.message} (read ${attempt} times)`);
    throw err;
  });
}

/** Compares the restored result with the manifest: rows per table and objects (count and bytes). */
async function checkRestored(
  index: IndexSource,
  total: { count: number; bytes: number },
  server: PgServer,
  mapping: Array<{ db: DatabaseEntry; target: string; final: string }>,
  out: ObjectStore,
): Promise<string[]> {
  const checks: string[] = [];
  for (const { db, target: name, final } of mapping) {
    // A database that existed is checked in the copy that replaces it once all checks pass: named as asked for.
    const label = name === final ? `database "${name}"` : `database "${final}" (checked in its restored copy "${name}", swapped in after the checks)`;
    const client = await connect(server, name);
    let counts;
    try {
      counts = await countTables(client, server, name);
    } finally {
      await client.end();
    }
    const got = new Map(counts.map((t) => [`${t.schema}.${t.table}`, t.rows]));
    const wrong = db.tables.filter((t) => got.get(`${t.schema}.${t.table}`) !== t.rows);
    if (wrong.length > 0) {
      const w = wrong[0]!;
      throw new RestoreError(`${label}: ${wrong.length} table(s) differ from the backup, e.g. ${w.schema}.${w.table} has ${got.get(`${w.schema}.${w.table}`) ?? 'no'} rows, expected ${w.rows}`);
    }
    checks.push(`database "${final}": ${db.tables.length} tables, ${db.tables.reduce((n, t) => n + t.rows, 0)} rows, all counts equal the backup`);
  }
  // The target's listing merged with the index: both in key order.
  let count = 0;
  let bytes = 0;
  const restored = new Cursor(inKeyOrder(out.list(), `the listing of ${out.description}`));
  try {
    for await (const e of index.entries()) {
      const info = await restored.seek(e.key);
      if (info?.size === e.size) {
        count++;
        bytes += info.size;
      }
    }
  } finally {
    await restored.close();
  }
  if (count !== total.count || bytes !== total.bytes) {
    throw new RestoreError(`the target store holds ${count} of the backup's ${total.count} objects (${bytes} of ${total.bytes} bytes)`);
  }
  checks.push(`objects: ${count} objects, ${bytes} bytes, all present with the backup's sizes (contents checked by SHA-256 while copied)`);
  return checks;
}
