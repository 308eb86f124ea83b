/**
 * Restore drills against a real local PostgreSQL and directory stores: a drill of a good backup
 * passes, a drill of a backup missing one object fails naming it, and in both cases the scratch
 * databases and scratch objects are gone afterwards. Also the CLI end to end, with --json and
 * --metrics-file, so the exit code, the JSON report and the metrics of a drill are checked too.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { stringify } from 'yaml';
import { validateConfig } from '../src/config/load.js';
import type { Config } from '../src/config/schema.js';
import { startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import { addChunks, createPachydermFixture } from '../src/demo/pachydermFixture.js';
import { openRepository } from '../src/engine/context.js';
import { pgServer } from '../src/postgres/connection.js';
import { runBackup, type BackupSummary } from '../src/engine/backup.js';
import { checkReferencedKeys, drillTargetsFromConfig, runDrill, type DrillReport } from '../src/engine/drill.js';
import type { EngineEvent } from '../src/engine/events.js';
import { PreflightError } from '../src/engine/context.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { createStrategy } from '../src/quiesce/factory.js';

const MAIN = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const PASSWORD_ENV = 'PACHBACKUP_DRILL_TEST_PGPASSWORD';

describe('pachbackup drill', () => {
  let pg: LocalPostgres;
  let work: string;
  let raw: Record<string, unknown>;
  let config: Config;
  let configFile: string;
  let backup: BackupSummary;
  let fixtureKeys: string[];

  before(async () => {
    pg = await startLocalPostgres();
    work = await mkdtemp(join(tmpdir(), 'pachbackup-drill-test-'));
    const bucket = join(work, 'cluster-bucket');
    for (const dir of ['cluster-bucket', 'repository', 'scratch']) await mkdir(join(work, dir));
    fixtureKeys = (await createPachydermFixture(pg, new FsObjectStore(bucket), { chunks: 30, chunkSize: 2048 })).keys;
    process.env[PASSWORD_ENV] = pg.password;
    const server = { host: pg.host, port: pg.port, user: pg.user, password: { env: PASSWORD_ENV }, sslmode: 'disable', binDir: pg.binDir };
    raw = {
      cluster: { postgres: server, objectStore: { url: pathToFileURL(bucket).href } },
      repository: { url: pathToFileURL(join(work, 'repository')).href },
      pause: { strategy: 'command', command: { pause: ['true'], resume: ['true'], timeoutSeconds: 30 } },
      restore: { postgres: server },
      drill: { objectStore: { url: pathToFileURL(join(work, 'scratch')).href } },
    };
    config = validateConfig(raw, 'drill test config');
    configFile = join(work, 'pachbackup.yaml');
    await writeFile(configFile, stringify(raw));
    backup = await runBackup({ config, strategy: await createStrategy(config.pause), emit: () => undefined });
  });

  after(async () => {
    delete process.env[PASSWORD_ENV];
    await pg?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  async function drill(backupId = 'latest'): Promise<{ report: DrillReport; events: EngineEvent[] }> {
    const events: EngineEvent[] = [];
    const report = await runDrill({ config, backup: backupId, targets: drillTargetsFromConfig(config), noOwner: true, concurrency: 4, emit: (e) => events.push(e) });
    return { report, events };
  }

  /** Nothing a drill made may survive it: no scratch database, no scratch object or directory. */
  async function assertNothingLeft(): Promise<void> {
    const { rows } = await pg.query<{ datname: string }>('postgres', "SELECT datname FROM pg_database WHERE datname LIKE 'pachbackup\\_drill\\_%'");
    assert.deepEqual(rows, [], 'scratch databases left behind');
    assert.deepEqual(await readdir(join(work, 'scratch')), [], 'scratch objects left behind');
  }

  test('passes on a good backup, with phase timings, and leaves nothing behind', async () => {
    const { report, events } = await drill();
    assert.equal(report.ok, true, report.problems.join('\n'));
    assert.deepEqual(report.problems, []);
    assert.equal(report.backup, backup.id);
    assert.match(report.drillId, /^[0-9a-f]{8}$/);
    assert.deepEqual(report.scratch.databases, [`pachbackup_drill_${report.drillId}_pachyderm`, `pachbackup_drill_${report.drillId}_dex`]);
    assert.equal(report.objects.count, fixtureKeys.length);
    assert.equal(report.referencedKeys, fixtureKeys.length);
    assert.deepEqual(
      report.phases.map((p) => [p.name, p.ok]),
      [['preflight', true], ['restore-objects', true], ['restore-databases', true], ['check', true], ['referenced-keys', true], ['cleanup', true]],
    );
    for (const p of report.phases) assert.ok(Number.isInteger(p.ms) && p.ms >= 0);
    assert.ok(report.checks.some((c) => /all counts equal the backup/.test(c)), 'row counts checked');
    assert.ok(report.checks.some((c) => /referenced keys: all 30 keys/.test(c)), 'referenced keys checked');
    assert.equal(report.cleanup.ok, true);
    assert.deepEqual(report.cleanup.databasesDropped.sort(), [...report.scratch.databases].sort());
    assert.equal(report.cleanup.objectsRemoved, fixtureKeys.length);
    assert.deepEqual(report.retries, { count: 0, causes: {} }, 'a drill without faults retries nothing');
    assert.ok(events.some((e) => e.type === 'phase-end' && e.phase === 'restore-objects'));
    await assertNothingLeft();
  });

  test("counts the retries of the drill's own requests (its scratch listings), not only its restore's", async () => {
    // Faults on the drill's own handle of the scratch store only (the restore opens it as restore.objectStore).
    process.env.PACHBACKUP_FAULTS = JSON.stringify([{ store: 'drill.objectStore', op: 'list', kind: 'transient', limit: 2 }]);
    let result: Awaited<ReturnType<typeof drill>>;
    try {
      result = await drill();
    } finally {
      delete process.env.PACHBACKUP_FAULTS;
    }
    const { report, events } = result;
    assert.equal(report.ok, true, report.problems.join('\n'));
    assert.equal(report.retries.count, 2, JSON.stringify(report.retries));
    assert.deepEqual(report.retries.causes, { SlowDown: 2 });
    assert.equal(events.filter((e) => e.type === 'warning' && /transient object-store fault \(SlowDown\)/.test(e.message)).length, 1, 'the first retry of a cause is warned once');
    await assertNothingLeft();
  });

  test('refuses a scratch store inside the cluster bucket before creating anything', async () => {
    const unsafe = validateConfig({ ...raw, drill: { objectStore: (raw.cluster as { objectStore: unknown }).objectStore } }, 'unsafe drill config');
    await assert.rejects(
      runDrill({ config: unsafe, backup: 'latest', targets: drillTargetsFromConfig(unsafe), noOwner: true, concurrency: 2, emit: () => undefined }),
      (err: unknown) => err instanceof PreflightError && /overlaps cluster\.objectStore/.test(err.message),
    );
    await assertNothingLeft();
  });

  test('CLI: a passing drill exits 0, reports JSON and writes metrics', async () => {
    const metricsFile = join(work, 'pachbackup.prom');
    const cli = await runCli(['-c', configFile, '--json', '--metrics-file', metricsFile, 'drill', backup.id]);
    assert.equal(cli.code, 0, cli.stderr);
    const result = cli.lines.find((l) => l.type === 'result');
    assert.equal(result?.command, 'drill');
    assert.equal(result?.ok, true);
    assert.equal(result?.backup, backup.id);
    const metrics = await readFile(metricsFile, 'utf8');
    assert.match(metrics, /^pachbackup_last_result\{command="drill"\} 1$/m);
    assert.match(metrics, new RegExp(`^pachbackup_last_objects\\{command="drill"\\} ${fixtureKeys.length}$`, 'm'));
    await assertNothingLeft();
  });

  test('fails on an object whose bytes changed (same size), naming it; what was copied is removed', async () => {
    const victim = fixtureKeys[3]!;
    const path = join(work, 'repository', 'objects', victim);
    const good = await readFile(path);
    const bad = Buffer.from(good);
    bad[0] = bad[0]! ^ 0xff;
    await writeFile(path, bad);
    try {
      const { report } = await drill();
      assert.equal(report.ok, false);
      assert.match(report.problems.join('\n'), new RegExp(`restore failed in phase restore-objects: object ${victim} in the repository does not match its recorded checksum`));
      assert.deepEqual(report.phases.map((p) => [p.name, p.ok]), [['preflight', true], ['restore-objects', false], ['cleanup', true]]);
      assert.equal(report.cleanup.ok, true);
      await assertNothingLeft();
    } finally {
      await writeFile(path, good);
    }
  });

  test('interrupted after the databases were restored: scratch removed, then the abort is rethrown', async () => {
    const controller = new AbortController();
    let existing: Promise<{ rows: Array<{ datname: string }> }> | undefined;
    const emit = (e: EngineEvent) => {
      if (e.type === 'phase-start' && e.phase === 'check') {
        existing = pg.query<{ datname: string }>('postgres', "SELECT datname FROM pg_database WHERE datname LIKE 'pachbackup\\_drill\\_%'");
        controller.abort(new Error('interrupted by SIGINT'));
      }
    };
    await assert.rejects(
      runDrill({ config, backup: 'latest', targets: drillTargetsFromConfig(config), noOwner: true, concurrency: 4, emit, signal: controller.signal }),
      /interrupted by SIGINT/,
    );
    assert.equal((await existing)?.rows.length, 2, 'the scratch databases existed when the drill was interrupted');
    await assertNothingLeft();
  });

  test('fails on a backup with a missing object, naming it, and leaves nothing behind', async () => {
    const victim = fixtureKeys[7]!;
    await rm(join(work, 'repository', 'objects', victim));
    const { report } = await drill();
    assert.equal(report.ok, false);
    assert.equal(report.problems.length, 1, report.problems.join('\n'));
    assert.match(report.problems[0]!, /restore failed in phase preflight/);
    assert.ok(report.problems[0]!.includes(`missing ${victim}`), report.problems[0]);
    assert.deepEqual(report.phases.map((p) => [p.name, p.ok]), [['preflight', false], ['cleanup', true]]);
    assert.equal(report.cleanup.ok, true);
    await assertNothingLeft();
  });

  test('CLI: a failing drill exits 1, names the object, and keeps the last success in the metrics', async () => {
    const metricsFile = join(work, 'pachbackup.prom');
    const before = await readFile(metricsFile, 'utf8');
    const lastSuccess = /^pachbackup_last_success_timestamp_seconds\{command="drill"\} (\S+)$/m.exec(before)?.[1];
    assert.ok(lastSuccess);
    const cli = await runCli(['-c', configFile, '--metrics-file', metricsFile, 'drill', 'latest']);
    assert.equal(cli.code, 1);
    assert.match(cli.stdout, /drill [0-9a-f]{8} FAILED/);
    assert.match(cli.stdout, /missing chunk\//);
    const metrics = await readFile(metricsFile, 'utf8');
    assert.match(metrics, /^pachbackup_last_result\{command="drill"\} 0$/m);
    assert.match(metrics, new RegExp(`^pachbackup_last_success_timestamp_seconds\\{command="drill"\\} ${lastSuccess.replace('.', '\\.')}$`, 'm'));
    await assertNothingLeft();
  });

  test('the referenced-key check (one merge over the recorded list, the database, the index and the scratch listing) names what is missing, the wrong size and what the dump references but the list does not', async () => {
    const repo = openRepository(config);
    const manifest = await repo.readManifest(backup.id);
    // A scratch store as a broken restore would leave it: the first key absent, the second one byte too long.
    const scratch = new FsObjectStore(join(work, 'check-scratch'));
    const cluster = new FsObjectStore(join(work, 'cluster-bucket'));
    const sorted = [...fixtureKeys].sort();
    for (const key of sorted.slice(1)) {
      const chunks: Buffer[] = [];
      for await (const chunk of await cluster.get(key)) chunks.push(chunk as Buffer);
      await scratch.put(key, key === sorted[1] ? Buffer.concat([...chunks, Buffer.from('!')]) : Buffer.concat(chunks));
    }
    // The source database, made to reference one chunk more than the backup recorded (undone below).
    const extra = (await addChunks(pg, new FsObjectStore(join(work, 'elsewhere')), 1)).keys[0]!;
    try {
      const server = pgServer(config.restore!.postgres!, 'restore.postgres');
      const result = await checkReferencedKeys(repo, manifest, server, 'pachyderm', scratch);
      assert.equal(result.referenced, fixtureKeys.length);
      assert.deepEqual(result.problems, [
        `1 object(s) the backup records as referenced are missing from the scratch store after the restore: ${sorted[0]}`,
        `1 object(s) the backup records as referenced have the wrong size in the scratch store: ${sorted[1]}`,
        `2 object(s) the restored database pachyderm references are missing from the scratch store after the restore: ${[sorted[0], extra].sort().join(', ')}`,
        `1 object(s) the restored database pachyderm references have the wrong size in the scratch store: ${sorted[1]}`,
        `the restored database references ${fixtureKeys.length + 1} keys but the backup recorded ${fixtureKeys.length}; not recorded: ${extra}: the dump and the referenced-key list do not describe the same state`,
      ]);
    } finally {
      await pg.query('pachyderm', 'DELETE FROM storage.chunk_objects WHERE gen = (SELECT max(gen) FROM storage.chunk_objects)');
    }
  });
});

async function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string; lines: Array<Record<string, unknown>> }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: process.env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    child.on('error', reject);
    child.on('close', (code) => {
      const lines: Array<Record<string, unknown>> = [];
      for (const line of stdout.split('\n')) {
        try {
          lines.push(JSON.parse(line) as Record<string, unknown>);
        } catch {
          // human output
        }
      }
      resolve({ code, stdout, stderr, lines });
    });
  });
}
