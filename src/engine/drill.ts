import { randomBytes } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import type { Config, ObjectStoreConfig, PostgresConfig } from '../config/schema.js';
import { openStore } from '../objectstore/open.js';
import type { ObjectStore } from '../objectstore/store.js';
import { locationsOverlap, type StoreLocation } from '../objectstore/url.js';
import { connect, describeServer, pgServer, type PgServer } from '../postgres/connection.js';
import { databaseState, dropDatabase } from '../postgres/restore.js';
import { REFERENCED_KEYS_SQL } from '../postgres/snapshot.js';
import type { Manifest } from '../repository/manifest.js';
import type { Repository } from '../repository/repository.js';
import { openRepository, PreflightError } from './context.js';
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
  const repo = openRepository(config, options.concurrency * 2);
  await repo.open(false);
  const manifest = await repo.resolve(options.backup);
  const scratch = openStore(scratchConfig, 'drill.objectStore', { maxSockets: options.concurrency * 2 });
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
 */
async function checkReferencedKeys(
  repo: Repository,
  manifest: Manifest,
  server: PgServer,
  restoredPachyderm: string | undefined,
  scratch: ObjectStore,
): Promise<{ referenced: number; problems: string[]; summary: string }> {
  const recorded = await repo.readReferenced(manifest.referenced);
  const sizes = new Map((await repo.readIndex(manifest.objects.index)).map((e) => [e.key, e.size]));
  const present = new Map<string, number>();
  for await (const info of scratch.list()) present.set(info.key, info.size);

  let fromDatabase: string[] = [];
  if (restoredPachyderm) {
    const client = await connect(server, restoredPachyderm);
    try {
      const { rows } = await client.query<{ present: boolean }>(`SELECT to_regclass('storage.chunk_objects') IS NOT NULL AS present`);
      if (rows[0]?.present) fromDatabase = (await client.query<{ key: string }>(REFERENCED_KEYS_SQL)).rows.map((r) => r.key);
    } finally {
      await client.end();
    }
  }

  const problems: string[] = [];
  const absent = (keys: string[]) => keys.filter((k) => present.get(k) === undefined);
  const wrongSize = (keys: string[]) => keys.filter((k) => present.get(k) !== undefined && sizes.get(k) !== undefined && present.get(k) !== sizes.get(k));
  const name = (keys: string[]) => `${keys.slice(0, 3).join(', ')}${keys.length > 3 ? ` and ${keys.length - 3} more` : ''}`;
  for (const [source, keys] of [
    ['the backup records as referenced', recorded],
    [`the restored database ${restoredPachyderm ?? ''} references`, fromDatabase],
  ] as const) {
    const missing = absent(keys);
    const wrong = wrongSize(keys);
    if (missing.length > 0) problems.push(`${missing.length} object(s) ${source} are missing from the scratch store after the restore: ${name(missing)}`);
    if (wrong.length > 0) problems.push(`${wrong.length} object(s) ${source} have the wrong size in the scratch store: ${name(wrong)}`);
  }
  const recordedSet = new Set(recorded);
  const unrecorded = fromDatabase.filter((k) => !recordedSet.has(k));
  if (restoredPachyderm && (unrecorded.length > 0 || fromDatabase.length !== recorded.length)) {
    problems.push(
      `the restored database references ${fromDatabase.length} keys but the backup recorded ${recorded.length}${unrecorded.length ? `; not recorded: ${name(unrecorded)}` : ''}: the dump and the referenced-key list do not describe the same state`,
    );
  }
  return {
    referenced: recorded.length,
    problems,
    summary: `referenced keys: all ${recorded.length} keys the backup recorded${restoredPachyderm ? ' (the same the restored database references)' : ''} are in the scratch store with their recorded sizes`,
  };
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
