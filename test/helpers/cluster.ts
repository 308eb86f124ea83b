/**
 * One test cluster for end-to-end tests: a source PostgreSQL server with the Pachyderm fixture, a
 * second PostgreSQL server to restore into, and three stores of one kind (the cluster's bucket,
 * the backup repository, the restore target), plus a validated Config describing all of it and a
 * way to run the real CLI against that config. Everything lives in a temp directory and on free
 * ports, and `cleanup()` removes it, so test files can run in parallel.
 *
 * Secrets travel the production way, by reference: each cluster gets environment variables of
 * its own (set in this process for in-process engine calls, inherited by spawned CLI processes).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { TestContext } from 'node:test';
import { stringify } from 'yaml';
import { validateConfig } from '../../src/config/load.js';
import { runBackup, type BackupOptions, type BackupSummary } from '../../src/engine/backup.js';
import type { EngineEvent } from '../../src/engine/events.js';
import { restoreTargetsFromConfig, runRestore, type RestoreSummary } from '../../src/engine/restore.js';
import { createStrategy } from '../../src/quiesce/factory.js';
import type { Config } from '../../src/config/schema.js';
import { diffFingerprints, fingerprintDatabase, fingerprintStore } from '../../src/demo/compare.js';
import { startLocalPostgres, type LocalPostgres } from '../../src/demo/localPostgres.js';
import { createPachydermFixture, type FixtureChunks } from '../../src/demo/pachydermFixture.js';
import { openStore } from '../../src/objectstore/open.js';
import type { ObjectStore } from '../../src/objectstore/store.js';
import { startCephRgw, startS3rver, type S3TestServer } from './servers.js';

export type StoreKind = 'fs' | 's3rver' | 'ceph';

export interface TestClusterOptions {
  kind: StoreKind;
  /** Start a second PostgreSQL server as the restore target; default true. */
  target?: boolean;
  /** Chunk objects the fixture writes; default 20. */
  chunks?: number;
  /** Bytes per chunk; default 4096. */
  chunkSize?: number;
  /** Create the Pachyderm fixture (databases, rows, chunk objects); default true. */
  fixture?: boolean;
  /** Put the repository in a directory even when the cluster's bucket is S3 (so objects are streamed, not copied server-side). */
  repositoryKind?: 'fs';
}

/** Raw (unvalidated) config as it would be written in YAML; tests mutate a copy of it. */
export type RawConfig = Record<string, any>;

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** stdout parsed as JSON lines (lines that are not JSON are skipped). */
  events: Array<Record<string, any>>;
  /** The `type: "result"` event, when there is one. */
  result: Record<string, any> | undefined;
}

export interface Fingerprints {
  pachyderm: Map<string, { rows: number; md5: string }>;
  dex: Map<string, { rows: number; md5: string }>;
  objects: Map<string, { size: number; sha256: string }>;
}

/** Database names of the fixture on the source, and of the restored copies on the target server. */
export const DATABASES = { pachyderm: 'pachyderm', dex: 'dex' } as const;

const CLI = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
const S3_BUCKETS = { cluster: 'pachyderm-cluster', repository: 'pachbackup-repo', restored: 'pachyderm-restored' } as const;

let clusterSeq = 0;

export class TestCluster {
  /** Secret values by environment variable name; set in process.env and passed to the CLI. */
  readonly env: Record<string, string> = {};
  /** Lines the pause/resume commands append: "paused", "resumed". */
  readonly marker: string;
  /** Directories of the fs stores (fs kind only). */
  readonly dirs: { cluster: string; repository: string; restored: string } | undefined;
  /** The repository's directory when it is a filesystem repository. */
  readonly repositoryDir: string | undefined;
  fixture: FixtureChunks = { keys: [], bytes: 0 };
  readonly #opened: ObjectStore[] = [];
  readonly #s3Stores: Array<{ destroy(): Promise<void> }> = [];

  private constructor(
    readonly kind: StoreKind,
    readonly work: string,
    readonly source: LocalPostgres,
    readonly target: LocalPostgres | undefined,
    readonly s3: S3TestServer | undefined,
    readonly raw: RawConfig,
  ) {
    this.marker = join(work, 'pause-marker.txt');
    this.dirs = kind === 'fs' ? { cluster: join(work, 'cluster-bucket'), repository: join(work, 'repository'), restored: join(work, 'restored') } : undefined;
    this.repositoryDir = String(raw.repository.url).startsWith('file:') ? fileURLToPath(String(raw.repository.url)) : undefined;
  }

  /** Starts everything, or returns why Ceph cannot run here (a skip reason). */
  static async create(options: TestClusterOptions): Promise<TestCluster | string> {
    const work = await mkdtemp(join(tmpdir(), 'pachbackup-e2e-'));
    let s3: S3TestServer | undefined;
    let source: LocalPostgres | undefined;
    let target: LocalPostgres | undefined;
    try {
      if (options.kind === 'ceph') {
        const started = await startCephRgw();
        if (typeof started === 'string') {
          await rm(work, { recursive: true, force: true });
          return started;
        }
        s3 = started;
      } else if (options.kind === 's3rver') {
        s3 = await startS3rver();
      }
      [source, target] = await Promise.all([startLocalPostgres(), options.target === false ? Promise.resolve(undefined) : startLocalPostgres()]);
      const id = `PBT${process.pid}_${++clusterSeq}`;
      const env: Record<string, string> = { [`${id}_SRC_PGPASSWORD`]: source.password };
      if (target) env[`${id}_DST_PGPASSWORD`] = target.password;
      if (s3) {
        env[`${id}_S3_ACCESS_KEY`] = s3.accessKeyId;
        env[`${id}_S3_SECRET_KEY`] = s3.secretAccessKey;
      }
      const marker = join(work, 'pause-marker.txt');
      const store = (name: keyof typeof S3_BUCKETS): RawConfig => {
        if (!s3 || (name === 'repository' && options.repositoryKind === 'fs')) return { url: pathToFileURL(join(work, name === 'cluster' ? 'cluster-bucket' : name)).href };
        return {
          url: `s3://${S3_BUCKETS[name]}`,
          endpoint: s3.endpoint,
          region: s3.region,
          forcePathStyle: true,
          accessKeyId: { env: `${id}_S3_ACCESS_KEY` },
          secretAccessKey: { env: `${id}_S3_SECRET_KEY` },
        };
      };
      const server = (pg: LocalPostgres, envName: string): RawConfig => ({
        host: pg.host,
        port: pg.port,
        user: pg.user,
        password: { env: envName },
        sslmode: 'disable',
        binDir: pg.binDir,
        connectTimeoutSeconds: 10,
      });
      const raw: RawConfig = {
        cluster: { postgres: server(source, `${id}_SRC_PGPASSWORD`), databases: { ...DATABASES }, objectStore: store('cluster') },
        repository: store('repository'),
        pause: {
          strategy: 'command',
          command: {
            // The marker path travels as $0, so no quoting of it is needed.
            pause: ['/bin/sh', '-c', 'echo paused >> "$0"', marker],
            resume: ['/bin/sh', '-c', 'echo resumed >> "$0"', marker],
            timeoutSeconds: 60,
          },
        },
        backup: { concurrency: 8 },
        ...(target
          ? { restore: { postgres: server(target, `${id}_DST_PGPASSWORD`), databases: { ...DATABASES }, objectStore: store('restored') } }
          : {}),
      };
      const cluster = new TestCluster(options.kind, work, source, target, s3, raw);
      await mkdir(cluster.repositoryDir ?? work, { recursive: true });
      Object.assign(cluster.env, env);
      Object.assign(process.env, env);
      if (s3) {
        for (const bucket of Object.values(S3_BUCKETS)) await s3.createBucket(bucket);
      } else {
        for (const dir of Object.values(cluster.dirs!)) await mkdir(dir, { recursive: true });
      }
      if (options.fixture !== false) {
        cluster.fixture = await createPachydermFixture(source, cluster.clusterStore(), {
          chunks: options.chunks ?? 20,
          chunkSize: options.chunkSize ?? 4096,
        });
      }
      return cluster;
    } catch (err) {
      await Promise.all([source?.stop(), target?.stop(), s3?.stop()].map((p) => p?.catch(() => undefined)));
      await rm(work, { recursive: true, force: true });
      throw err;
    }
  }

  /** Creates a cluster, or marks the test skipped (Ceph not installed) and returns undefined. */
  static async createOrSkip(t: TestContext, options: TestClusterOptions): Promise<TestCluster | undefined> {
    const cluster = await TestCluster.create(options);
    if (typeof cluster === 'string') {
      t.skip(cluster);
      return undefined;
    }
    return cluster;
  }

  /** A deep copy of the raw config, changed by `mutate`. */
  rawConfig(mutate?: (raw: RawConfig) => void): RawConfig {
    const copy = structuredClone(this.raw);
    mutate?.(copy);
    return copy;
  }

  /** The validated config, as the CLI would load it. */
  config(mutate?: (raw: RawConfig) => void): Config {
    return validateConfig(this.rawConfig(mutate), 'test config');
  }

  /** Runs a backup in this process through the engine API, as the CLI would with --yes; `options` can replace the strategy or shorten the lock's lease. */
  async backup(mutate?: (raw: RawConfig) => void, events: EngineEvent[] = [], options: Partial<Pick<BackupOptions, 'strategy' | 'leaseSeconds'>> = {}): Promise<BackupSummary> {
    const config = this.config(mutate);
    return runBackup({ config, strategy: await createStrategy(config.pause), emit: (e) => events.push(e), confirm: async () => true, ...options });
  }

  /** Restores a backup in this process into the target server and the restore store. */
  async restore(backup = 'latest', mutate?: (raw: RawConfig) => void, events: EngineEvent[] = []): Promise<RestoreSummary> {
    const config = this.config(mutate);
    return runRestore({
      config,
      backup,
      targets: restoreTargetsFromConfig(config),
      force: false,
      dryRun: false,
      noOwner: true,
      concurrency: config.backup.concurrency,
      emit: (e) => events.push(e),
    });
  }

  /** Writes the (mutated) config as YAML and returns its path. */
  async writeConfig(mutate?: (raw: RawConfig) => void, name = `config-${randomBytes(4).toString('hex')}.yaml`): Promise<string> {
    const file = join(this.work, name);
    await writeFile(file, stringify(this.rawConfig(mutate)));
    return file;
  }

  private open(section: RawConfig, label: string): ObjectStore {
    const opened = openStore(validateConfig({ ...this.raw, repository: section }, label).repository, label);
    if (opened.s3) this.#s3Stores.push(opened.s3);
    this.#opened.push(opened.store);
    return opened.store;
  }

  /** The cluster's bucket, opened directly (for the fixture, extra objects and fingerprints). */
  clusterStore(): ObjectStore {
    return this.open(this.raw.cluster.objectStore, 'test cluster store');
  }
  /** The repository's store; with `mutate`, as that changed config reaches it (other credentials, say). */
  repositoryStore(mutate?: (raw: RawConfig) => void): ObjectStore {
    return this.open(this.rawConfig(mutate).repository, 'test repository store');
  }
  restoredStore(): ObjectStore {
    if (!this.raw.restore) throw new Error('this test cluster has no restore target');
    return this.open(this.raw.restore.objectStore, 'test restored store');
  }

  /** Ids of the backups that have a manifest in the repository (whether or not it exists yet). */
  async sealedBackups(): Promise<string[]> {
    const ids: string[] = [];
    try {
      for await (const info of this.repositoryStore().list('backups/')) {
        const m = /^backups\/([^/]+)\/manifest\.json$/.exec(info.key);
        if (m) ids.push(m[1]!);
      }
    } catch (err) {
      // A repository that was never created (its bucket missing) holds no backups.
      if (!/does not exist|NoSuchBucket|not found/i.test((err as Error).message)) throw err;
    }
    return ids;
  }

  /** Number of objects in the repository's shared objects/ area. */
  async repositoryObjectCount(): Promise<number> {
    let n = 0;
    for await (const _ of this.repositoryStore().list('objects/')) n++;
    return n;
  }

  async sourceFingerprints(): Promise<Fingerprints> {
    return {
      pachyderm: await fingerprintDatabase(this.source, DATABASES.pachyderm),
      dex: await fingerprintDatabase(this.source, DATABASES.dex),
      objects: await fingerprintStore(this.clusterStore()),
    };
  }

  async restoredFingerprints(): Promise<Fingerprints> {
    if (!this.target) throw new Error('this test cluster has no restore target');
    return {
      pachyderm: await fingerprintDatabase(this.target, DATABASES.pachyderm),
      dex: await fingerprintDatabase(this.target, DATABASES.dex),
      objects: await fingerprintStore(this.restoredStore()),
    };
  }

  /** Databases on the target server other than the built-in ones. */
  async targetDatabases(): Promise<string[]> {
    if (!this.target) throw new Error('this test cluster has no restore target');
    const { rows } = await this.target.query<{ datname: string }>('postgres', "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1') ORDER BY 1");
    return rows.map((r) => r.datname);
  }

  /** Keys in the restore target store. */
  async restoredKeys(): Promise<string[]> {
    const keys: string[] = [];
    for await (const info of this.restoredStore().list()) keys.push(info.key);
    return keys;
  }

  /** Lines of the pause marker file (empty when nothing was paused). */
  async markerLines(): Promise<string[]> {
    try {
      return (await readFile(this.marker, 'utf8')).split('\n').filter((l) => l !== '');
    } catch {
      return [];
    }
  }

  async resetMarker(): Promise<void> {
    await rm(this.marker, { force: true });
  }

  /** Starts the CLI with this cluster's secrets in its environment. */
  spawnCli(args: string[], options: { env?: Record<string, string>; timeoutMs?: number } = {}): { child: ChildProcess; done: Promise<CliResult> } {
    const child = spawn(process.execPath, [CLI, ...args], {
      cwd: this.work,
      env: { ...process.env, ...this.env, CI: 'true', ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const timeoutMs = options.timeoutMs ?? 300_000;
    const done = new Promise<CliResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`pachbackup ${args.join(' ')} did not finish within ${timeoutMs} ms\nstdout:\n${stdout}\nstderr:\n${stderr}`));
      }, timeoutMs);
      child.on('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        const events: Array<Record<string, any>> = [];
        for (const line of stdout.split('\n')) {
          if (!line.startsWith('{')) continue;
          try {
            events.push(JSON.parse(line) as Record<string, any>);
          } catch {
            // not a JSON line
          }
        }
        resolve({ code, signal, stdout, stderr, events, result: events.find((e) => e.type === 'result') });
      });
    });
    return { child, done };
  }

  runCli(args: string[], options: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<CliResult> {
    return this.spawnCli(args, options).done;
  }

  async cleanup(): Promise<void> {
    await Promise.all(this.#s3Stores.map((s) => s.destroy()));
    await Promise.all([this.source.stop(), this.target?.stop(), this.s3?.stop()].map((p) => p?.catch(() => undefined)));
    for (const name of Object.keys(this.env)) delete process.env[name];
    await rm(this.work, { recursive: true, force: true });
  }
}

/** Differences between the source and the restored cluster, as readable lines; empty when equal. */
export function compareFingerprints(before: Fingerprints, after: Fingerprints): string[] {
  return [
    ...diffFingerprints('table pachyderm', before.pachyderm, after.pachyderm),
    ...diffFingerprints('table dex', before.dex, after.dex),
    ...diffFingerprints('object', before.objects, after.objects),
  ];
}

/** Runs `fn` with PACHBACKUP_FAULTS set in this process (stores opened meanwhile get the faults). */
export async function withFaults<T>(rules: unknown[], fn: () => Promise<T>): Promise<T> {
  const previous = process.env.PACHBACKUP_FAULTS;
  process.env.PACHBACKUP_FAULTS = JSON.stringify(rules);
  try {
    return await fn();
  } finally {
    if (previous === undefined) delete process.env.PACHBACKUP_FAULTS;
    else process.env.PACHBACKUP_FAULTS = previous;
  }
}

/** For failing assertions: the CLI's output, so a failure explains itself. */
export function describeRun(r: CliResult): string {
  return `exit ${r.code} (signal ${r.signal})\nstdout:\n${r.stdout.slice(-4000)}\nstderr:\n${r.stderr.slice(-4000)}`;
}
