import { randomBytes } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import type { Config, ObjectStoreConfig, PostgresConfig } from '../config/schema.js';
import { openStore } from '../objectstore/open.js';
import type { ObjectStore } from '../objectstore/store.js';
import { locationsOverlap, type StoreLocation } from '../objectstore/url.js';
import { connect, describeServer, pgServer, type PgServer } from '../postgres/connection.js';
import { databaseState, dropDatabase } from '../postgres/restore.js';
import { referencedKeysIn } from '../postgres/snapshot.js';
import { compareKeys, Cursor, inKeyOrder } from '../objectstore/sorted.js';
import { IndexSource } from './objects.js';
import type { Manifest } from '../repository/manifest.js';
import type { Repository } from '../repository/repository.js';
import { newRetryTally, openRepository, PreflightError } from './context.js';
import type { EventSink } from './events.js';
import { runRestore, type RestoreSummary } from './restore.js';

/**
 * A restore drill: the proof that a backup restores. It restores the backup into scratch
 * databases and a scratch store prefix through the same `runRestore` a real restore uses, checks
 * the result, and always removes the scratch targets again, whatever happened.
 *
 * What is checked, and by whom:
 * - every byte of the backup: `runRestore` checks the manifest, index and referenced-key list
 *   against their recorded SHA-256, reads each dump whole against its SHA-256 before restoring it,
 *   and checks the SHA-256 of every object while copying it. Running `verifyBackup` as well would
 *   read the whole backup a second time for no extra assurance, so the drill does not.
 * - row counts: `runRestore`'s check phase compares every table with the manifest.
 * - referenced-key completeness: here, after the restore: every key the manifest records as
 *   referenced, and every key the restored `pachyderm` database references, is in the scratch
 *   store with the size the backup recorded.
 */

export interface DrillTargets {
  postgres: PostgresConfig;
  /** Config key of `postgres`, for error messages. */
  postgresKey: string;
  /** Store under which the drill's own `drill-<id>/` prefix is created. */
  objectStore: ObjectStoreConfig;
}

export interface DrillOptions {
  config: Config;
  backup: string;
  targets: DrillTargets;
  noOwner: boolean;
  concurrency: number;
  emit: EventSink;
  /** Stops the restore; the scratch targets are removed before the abort is rethrown. */
  signal?: AbortSignal;
}

export interface DrillPhase {
  name: string;
  ms: number;
  ok: boolean;
}

export interface DrillReport {
  drillId: string;
  /** The backup drilled, resolved from the id or `latest`. */
  backup: string;
  ok: boolean;
  /** What went wrong, one sentence each; empty when the drill passed. */
  problems: string[];
  scratch: { server: string; databases: string[]; objectStore: string };
  databases: RestoreSummary['databases'];
  objects: { count: number; bytes: number };
  referencedKeys: number;
  checks: string[];
  /** The restore's phases (from its events), then the drill's own steps. */
  phases: DrillPhase[];
  cleanup: { ok: boolean; databasesDropped: string[]; objectsRemoved: number; problems: string[] };
  totalMs: number;
  /** Requests retried after transient object-store faults, by cause: the restore's and the drill's own (referenced-key check, clean-up). */
  retries: RestoreSummary['retries'];
}

/** Resolves the drill's scratch targets: `drill.postgres` (else `restore.postgres`) and `drill.objectStore`. */
export function drillTargetsFromConfig(config: Config, postgresOverride: Partial<Pick<PostgresConfig, 'host' | 'port' | 'user'>> = {}): DrillTargets {
  const fromDrill = config.drill.postgres;
  const postgres = fromDrill ?? config.restore?.postgres;
  if (!postgres) {
    throw new PreflightError('drill.postgres (or restore.postgres) is required: the PostgreSQL server on which a drill creates, then drops, its scratch databases');
  }
  if (!config.drill.objectStore) {
    throw new PreflightError('drill.objectStore is required (or --scratch-url): a bucket or directory in which each drill writes, then deletes, its own drill-<id>/ prefix');
  }
  return {
    postgres: { ...postgres, ...postgresOverride },
    postgresKey: fromDrill ? 'drill.postgres' : 'restore.postgres',
    objectStore: config.drill.objectStore,
  };
}

/** The scratch database names of a drill; the prefix makes leftovers easy to recognise. */
export function drillDatabaseNames(drillId: string): { pachyderm: string; dex: string } {
  return { pachyderm: `pachbackup_drill_${drillId}_pachyderm`, dex: `pachbackup_drill_${drillId}_dex` };
}

/** The store URL of a drill's own prefix under the configured scratch store. */
export function drillStoreUrl(baseUrl: string, drillId: string): string {
  return `${baseUrl.replace(/\/+$/, '')}/drill-${drillId}`;
}

export async function runDrill(options: DrillOptions): Promise<DrillReport> {
  const { config, targets, emit, signal } = options;
  const started = performance.now();
  const drillId = randomBytes(4).toString('hex');
  const names = drillDatabaseNames(drillId);
  const scratchConfig: ObjectStoreConfig = { ...targets.objectStore, url: drillStoreUrl(targets.objectStore.url, drillId) };
  const server = pgServer(targets.postgres, targets.postgresKey);

  // ---- before anything is created: the backup exists and the scratch targets are safe to use.
  // One tally for the drill's own requests (the referenced-key check, the clean-up) and its restore's.
  const retries = newRetryTally((message) => emit({ type: 'warning', message }));
  const repo = openRepository(config, { maxSockets: options.concurrency * 2, retry: retries.policy() });
  await repo.open(false);
  const manifest = await repo.resolve(options.backup);
  const scratch = openStore(scratchConfig, 'drill.objectStore', { maxSockets: options.concurrency * 2, retry: retries.policy() });
  assertScratchIsolated(scratch.location, scratchConfig, config);
  const base = openStore(targets.objectStore, 'drill.objectStore');
  await base.store.check();
  for (const name of Object.values(names)) {
    if ((await databaseState(server, name)).exists) {
      throw new PreflightError(`scratch database "${name}" already exists on ${describeServer(server)}; it is not this drill's to drop. Remove it or run the drill again`);
    }
  }
  emit({ type: 'info', message: `drill ${drillId}: restoring backup ${manifest.id} into databases ${names.pachyderm}, ${names.dex} on ${describeServer(server)} and ${scratch.store.description}` });

  const phases: DrillPhase[] = [];
  const problems: string[] = [];
  const checks: string[] = [];
  let restored: RestoreSummary | undefined;
  let referencedKeys = 0;
  let createdDirectory: string | undefined;
  let cleanup: DrillReport['cleanup'] = { ok: false, databasesDropped: [], objectsRemoved: 0, problems: [] };

  // The restore's own phases are timed from its events, so a failed restore still reports them.
  let failedPhase: string | undefined;
  const recordingEmit: EventSink = (event) => {
    if (event.type === 'phase-end') {
      phases.push({ name: event.phase, ms: event.ms, ok: event.ok });
      if (!event.ok) failedPhase ??= event.phase;
    }
    emit(event);
  };
  const step = async (name: string, work: () => Promise<void>): Promise<void> => {
    const stepStarted = performance.now();
    let ok = false;
    try {
      await work();
      ok = true;
    } finally {
      const ms = Math.round(performance.now() - stepStarted);
      phases.push({ name, ms, ok });
      emit({ type: 'info', message: `drill ${drillId}: ${name} ${ok ? 'done' : 'FAILED'} in ${ms} ms` });
    }
  };

  try {
    if (scratch.location.kind === 'file') {
      // Not recursive: the directory must be new, so removing it afterwards removes only the drill's files.
      await mkdir(scratch.location.path);
      createdDirectory = scratch.location.path;
    }
    try {
      restored = await runRestore({
        config,
        backup: manifest.id,
        targets: { postgres: targets.postgres, databases: names, objectStore: scratchConfig },
        force: false,
        dryRun: false,
        noOwner: options.noOwner,
        concurrency: options.concurrency,
        emit: recordingEmit,
        retries,
        ...(signal ? { signal } : {}),
      });
      checks.push(...restored.checks);
    } catch (err) {
      problems.push(`restore failed${failedPhase ? ` in phase ${failedPhase}` : ''}: ${(err as Error).message}`);
    }
    if (restored) {
      await step('referenced-keys', async () => {
        const result = await checkReferencedKeys(repo, manifest, server, manifest.databases.some((d) => d.role === 'pachyderm') ? names.pachyderm : undefined, scratch.store);
        referencedKeys = result.referenced;
        problems.push(...result.problems);
        if (result.problems.length === 0) checks.push(result.summary);
      }).catch((err: unknown) => {
        problems.push(`checking referenced keys failed: ${(err as Error).message}`);
      });
    }
  } finally {
    // Always, also after a failure or an interrupt: a drill leaves nothing behind.
    await step('cleanup', async () => {
      cleanup = await removeScratch(server, Object.values(names), scratch.store, createdDirectory);
      if (!cleanup.ok) throw new Error(cleanup.problems.join('; '));
    }).catch(() => undefined);
  }
  problems.push(...cleanup.problems.map((p) => `cleanup: ${p}`));
  signal?.throwIfAborted();

  return {
    drillId,
    backup: manifest.id,
    ok: problems.length === 0,
    problems,
    scratch: { server: describeServer(server), databases: manifest.databases.map((d) => (d.role === 'pachyderm' ? names.pachyderm : names.dex)), objectStore: scratch.store.description },
    databases: restored?.databases ?? [],
    objects: restored?.objects ?? { count: 0, bytes: 0 },
    referencedKeys,
    checks,
    phases,
    cleanup,
    totalMs: Math.round(performance.now() - started),
    retries: retries.summary(),
  };
}

/** A drill writes only where nothing else lives: never into the cluster's bucket or the repository. */
function assertScratchIsolated(scratch: StoreLocation, scratchConfig: ObjectStoreConfig, config: Config): void {
  const others: Array<[string, ObjectStoreConfig]> = [
    ['cluster.objectStore', config.cluster.objectStore],
    ['repository', config.repository],
  ];
  for (const [key, other] of others) {
    const location = openStore(other, key).location;
    if (locationsOverlap(scratch, scratchConfig.endpoint, location, other.endpoint)) {
      throw new PreflightError(`drill.objectStore (${scratchConfig.url}) overlaps ${key} (${other.url}); a drill must write into a separate bucket or directory`);
    }
  }
}

/**
 * Every key the backup records as referenced, and every key the restored `pachyderm` database
 * references, must be in the scratch store with the size the backup's index recorded.
 *
 * All four are key-ordered streams (the referenced-key file, a database cursor, the index, the
 * scratch listing) merged in one pass, so memory does not grow with the number of keys.
 */
export async function checkReferencedKeys(
  repo: Repository,
  manifest: Manifest,
  server: PgServer,
  restoredPachyderm: string | undefined,
  scratch: ObjectStore,
): Promise<{ referenced: number; problems: string[]; summary: string }> {
  const client = restoredPachyderm ? await connect(server, restoredPachyderm) : undefined;
  const fromDatabase = restoredPachyderm ? `the restored database ${restoredPachyderm} references` : undefined;
  const sources = ['the backup records as referenced', fromDatabase ?? ''] as const;
  const found = sources.map(() => ({ count: 0, missing: new Sample(), wrongSize: new Sample() }));
  const unrecorded = new Sample();
  const asItems = async function* (keys: AsyncIterable<string>): AsyncGenerator<{ key: string }> {
    for await (const key of keys) yield { key };
  };
  const recorded = new Cursor(inKeyOrder(asItems(repo.streamReferenced(manifest.referenced)), manifest.referenced.file));
  const index = new Cursor((await IndexSource.open(repo, manifest.objects.index)).entries());
  const present = new Cursor(inKeyOrder(scratch.list(), `the listing of ${scratch.description}`));
  await client?.query('BEGIN READ ONLY');
  const referenced = new Cursor(client ? inKeyOrder(asItems(referencedKeysIn(client)), 'the referenced keys of the restored database') : asItems((async function* () {})()));
  try {
    for (;;) {
      const [a, b] = [await recorded.peek(), await referenced.peek()];
      if (!a && !b) break;
      const key = !b || (a && compareKeys(a.key, b.key) <= 0) ? a!.key : b.key;
      const inSource = [(await recorded.seek(key)) !== undefined, (await referenced.seek(key)) !== undefined];
      const held = await present.seek(key);
      const recordedSize = (await index.seek(key))?.size;
      inSource.forEach((has, i) => {
        if (!has) return;
        const f = found[i]!;
        f.count++;
        if (!held) f.missing.add(key);
        else if (recordedSize !== undefined && held.size !== recordedSize) f.wrongSize.add(key);
      });
      if (inSource[1] && !inSource[0]) unrecorded.add(key);
    }
  } finally {
    await Promise.all([recorded.close(), index.close(), present.close(), referenced.close().catch(() => undefined)]);
    await client?.query('COMMIT').catch(() => undefined);
    await client?.end().catch(() => undefined);
  }

  const problems: string[] = [];
  found.forEach((f, i) => {
    if (i === 1 && !fromDatabase) return;
    if (f.missing.count > 0) problems.push(`${f.missing.count} object(s) ${sources[i]} are missing from the scratch store after the restore: ${f.missing}`);
    if (f.wrongSize.count > 0) problems.push(`${f.wrongSize.count} object(s) ${sources[i]} have the wrong size in the scratch store: ${f.wrongSize}`);
  });
  const [recordedCount, databaseCount] = [found[0]!.count, found[1]!.count];
  if (fromDatabase && (unrecorded.count > 0 || databaseCount !== recordedCount)) {
    problems.push(
      `the restored database references ${databaseCount} keys but the backup recorded ${recordedCount}${unrecorded.count ? `; not recorded: ${unrecorded}` : ''}: the dump and the referenced-key list do not describe the same state`,
    );
  }
  return {
    referenced: recordedCount,
    problems,
    summary: `referenced keys: all ${recordedCount} keys the backup recorded${restoredPachyderm ? ' (the same the restored database references)' : ''} are in the scratch store with their recorded sizes`,
  };
}

/** A count of keys with the first three kept, to name in a message. */
class Sample {
  count = 0;
  readonly #first: string[] = [];
  add(key: string): void {
    this.count++;
    if (this.#first.length < 3) this.#first.push(key);
  }
  toString(): string {
    return `${this.#first.join(', ')}${this.count > 3 ? ` and ${this.count - 3} more` : ''}`;
  }
}

/** Drops the scratch databases and removes every scratch object, then checks both are gone. */
async function removeScratch(server: PgServer, databases: string[], store: ObjectStore, directory: string | undefined): Promise<DrillReport['cleanup']> {
  const problems: string[] = [];
  const dropped: string[] = [];
  for (const name of databases) {
    try {
      const state = await databaseState(server, name);
      if (!state.exists) continue;
      await dropDatabase(server, name);
      dropped.push(name);
      if ((await databaseState(server, name)).exists) problems.push(`database "${name}" still exists after DROP DATABASE`);
    } catch (err) {
      problems.push(`could not drop scratch database "${name}": ${(err as Error).message}`);
    }
  }
  let removed = 0;
  try {
    const keys: string[] = [];
    for await (const info of store.list()) keys.push(info.key);
    await store.remove(keys);
    removed = keys.length;
    if (directory) await rm(directory, { recursive: true, force: true });
    let left = 0;
    for await (const _ of store.list()) left++;
    if (left > 0) problems.push(`${left} object(s) still in ${store.description} after removing them`);
  } catch (err) {
    problems.push(`could not remove the scratch objects in ${store.description}: ${(err as Error).message}`);
  }
  return { ok: problems.length === 0, databasesDropped: dropped, objectsRemoved: removed, problems };
}
