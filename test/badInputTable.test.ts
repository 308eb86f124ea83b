/**
 * Issue 6: the bad-input table. One test per input, through the real CLI process, each with the
 * message it must print: malformed YAML, unknown and mistyped keys, bad URLs and flags, wrong
 * credentials, unreachable hosts (within the configured timeouts: a blackhole proxy accepts the
 * connection and never answers), missing privileges, a repository that is the cluster's bucket,
 * non-empty restore targets. Every refusal exits non-zero, seals nothing, never pauses the
 * cluster, and (for restores) leaves the targets as they were. This extends test/badInput.test.ts
 * (issue 2) with the inputs it does not try.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, before, describe, test, type TestContext } from 'node:test';
import { findFreePort } from '../src/demo/localPostgres.js';
import { startFaultProxy, type FaultProxy } from '../src/objectstore/faultProxy.js';
import { describeRun, TestCluster, type CliResult, type RawConfig, type StoreKind } from './helpers/cluster.js';
import { cephRgwSkipReason, withTempDir } from './helpers/servers.js';

const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

function errorLine(run: CliResult): string {
  return (run.stderr.split('\n').find((l) => l.startsWith('pachbackup: error: ')) ?? '').replace('pachbackup: error: ', '');
}

interface Refusal {
  exit: number | number[];
  message: RegExp[];
  /** The run must end within this many seconds (unreachable hosts). */
  withinSeconds?: number;
}

/** Runs the CLI, checks exit code, messages and time, records the row, and returns the run. */
async function refused(t: TestContext, cluster: TestCluster, category: string, input: string, args: string[], expected: Refusal, env: Record<string, string> = {}): Promise<CliResult> {
  const started = Date.now();
  let run: CliResult | undefined;
  let hung: string | undefined;
  try {
    run = await cluster.runCli(args, { env, timeoutMs: expected.withinSeconds ? Math.max(60_000, expected.withinSeconds * 3000) : 120_000 });
  } catch (err) {
    hung = (err as Error).message;
  }
  const seconds = (Date.now() - started) / 1000;
  record(t, {
    category: 'bad input',
    fault: `${category}: ${input}`,
    runs: 1,
    detail: run ? `exit ${run.code}${expected.withinSeconds ? ` after ${seconds.toFixed(1)} s` : ''}: "${errorLine(run).replace(/\s+/g, ' ').slice(0, 240)}"` : 'did not finish (killed)',
  });
  assert.ok(run, `the command must end: ${hung}`);
  const exits = Array.isArray(expected.exit) ? expected.exit : [expected.exit];
  assert.ok(exits.includes(run.code ?? -1), `exit ${run.code}, expected ${exits.join(' or ')}: ${describeRun(run)}`);
  assert.match(run.stderr, /pachbackup: error: /, describeRun(run));
  for (const pattern of expected.message) assert.match(run.stderr, pattern, describeRun(run));
  if (expected.withinSeconds) assert.ok(seconds <= expected.withinSeconds, `ended within ${expected.withinSeconds} s (took ${seconds.toFixed(1)} s)`);
  for (const secret of Object.values(cluster.env)) assert.ok(!run.stderr.includes(secret) && !run.stdout.includes(secret), 'no secret printed');
  return run;
}

/** Backup refusals seal nothing new and never pause. */
async function refusedBackup(t: TestContext, cluster: TestCluster, category: string, input: string, mutate: (raw: RawConfig) => void, expected: Refusal, env: Record<string, string> = {}): Promise<CliResult> {
  const sealedBefore = (await cluster.sealedBackups()).length;
  await cluster.resetMarker();
  const config = await cluster.writeConfig(mutate);
  const run = await refused(t, cluster, category, input, ['--config', config, '--yes', 'backup'], expected, env);
  assert.equal((await cluster.sealedBackups()).length, sealedBefore, 'no backup sealed');
  assert.deepEqual(await cluster.markerLines(), [], 'the cluster was never paused');
  return run;
}

/** A config file with exactly this text. */
async function configText(cluster: TestCluster, name: string, text: string): Promise<string> {
  const file = join(cluster.work, name);
  await writeFile(file, text);
  return file;
}

describe('bad input table: configuration files', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: 3 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  const yamlCases: Array<{ input: string; text: () => string; message: RegExp[] }> = [
    { input: 'a tab used for indentation', text: () => 'cluster:\n\tpostgres:\n\t\thost: x\n', message: [/is not valid YAML at line \d+/, /[Tt]ab/] },
    { input: 'the same key twice', text: () => 'repository:\n  url: file:///tmp/a\nrepository:\n  url: file:///tmp/b\n', message: [/is not valid YAML at line \d+/, /unique/] },
    { input: 'a list instead of a mapping', text: () => '- cluster\n- repository\n', message: [/must hold a YAML mapping/] },
    { input: 'an empty file', text: () => '', message: [/cluster: is required/, /repository: is required/] },
    { input: 'an alias bomb (billion laughs)', text: () => ['a: &a ["x","x","x","x","x","x","x","x","x","x"]', 'b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]', 'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]', 'd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]', 'e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]', ''].join('\n'), message: [/bad-an-alias-bomb-billion-laughs-\.yaml/, /alias/i] },
  ];
  for (const { input, text, message } of yamlCases) {
    test(`malformed YAML: ${input}`, { timeout: 120_000 }, async (t) => {
      const file = await configText(cluster, `bad-${input.replace(/\W+/g, '-')}.yaml`, text());
      await cluster.resetMarker();
      await refused(t, cluster, 'malformed YAML', input, ['--config', file, '--yes', 'backup'], { exit: EXIT_USAGE, message });
      assert.deepEqual(await cluster.markerLines(), []);
    });
  }

  const keyCases: Array<{ category: string; input: string; mutate: (raw: RawConfig) => void; message: RegExp[] }> = [
    { category: 'unknown key', input: 'repository.endpiont (misspelt)', mutate: (raw) => void (raw.repository.endpiont = 'http://x'), message: [/repository: unknown key "endpiont"/] },
    { category: 'unknown key', input: 'backup.concurency (misspelt)', mutate: (raw) => void (raw.backup.concurency = 4), message: [/backup: unknown key "concurency"/] },
    { category: 'unknown key', input: 'pause.command.resum (misspelt)', mutate: (raw) => void (raw.pause.command.resum = 'true'), message: [/pause\.command: unknown key "resum"/] },
    { category: 'unknown key', input: 'restore.postgres.passwrd (misspelt)', mutate: (raw) => void (raw.restore = { postgres: { user: 'u', passwrd: { env: 'X' } } }), message: [/restore\.postgres: unknown key "passwrd"/] },
    { category: 'mistyped key', input: 'cluster.postgres.sslmode: verify_full', mutate: (raw) => void (raw.cluster.postgres.sslmode = 'verify_full'), message: [/cluster\.postgres\.sslmode/, /verify-full/] },
    { category: 'mistyped key', input: 'sslmode verify-full without sslrootcert', mutate: (raw) => void (raw.cluster.postgres.sslmode = 'verify-full'), message: [/cluster\.postgres\.sslrootcert/, /needs sslrootcert/] },
    { category: 'mistyped key', input: 'repository.forcePathStyle: "yes"', mutate: (raw) => void (raw.repository.forcePathStyle = 'yes'), message: [/repository\.forcePathStyle: expected boolean, got the string "yes"/] },
    { category: 'mistyped key', input: 'cluster.postgres.port: 70000', mutate: (raw) => void (raw.cluster.postgres.port = 70000), message: [/cluster\.postgres\.port/, /65535/] },
    { category: 'mistyped key', input: 'backup.concurrency: 0', mutate: (raw) => void (raw.backup.concurrency = 0), message: [/backup\.concurrency/, />=\s*1|too small/i] },
    { category: 'mistyped key', input: 'repository.requestTimeoutSeconds: "10s"', mutate: (raw) => void (raw.repository.requestTimeoutSeconds = '10s'), message: [/repository\.requestTimeoutSeconds: expected number, got the string "10s"/] },
    { category: 'mistyped key', input: 'cluster.databases.dex: 5', mutate: (raw) => void (raw.cluster.databases.dex = 5), message: [/cluster\.databases\.dex/] },
    { category: 'mistyped key', input: 'pause.strategy: pause-it', mutate: (raw) => void (raw.pause.strategy = 'pause-it'), message: [/pause\.strategy/, /command/] },
    { category: 'bad URL', input: 'repository.endpoint: "not a url"', mutate: (raw) => void (raw.repository.endpoint = 'not a url'), message: [/repository\.endpoint: must be a URL/] },
  ];
  for (const { category, input, mutate, message } of keyCases) {
    test(`${category}: ${input}`, { timeout: 120_000 }, async (t) => {
      await refusedBackup(t, cluster, category, input, mutate, { exit: EXIT_USAGE, message: [/is not a valid pachbackup config/, ...message] });
    });
  }

  test('wrong database: cluster.databases.pachyderm names a database that is not Pachyderm\'s (no storage.chunk_objects)', { timeout: 120_000 }, async (t) => {
    const notPachyderm = (raw: RawConfig): void => void (raw.cluster.databases.pachyderm = 'postgres');
    // Online mode's consistency rests on the referenced chunk keys: refused before anything is copied.
    await refusedBackup(t, cluster, 'wrong database', 'cluster.databases.pachyderm: postgres, online mode', (raw) => {
      notPachyderm(raw);
      raw.backup.mode = 'online';
    }, { exit: EXIT_FAILED, message: [/database "postgres" \(cluster\.databases\.pachyderm\) has no table storage\.chunk_objects/, /online mode .* check cluster\.databases\.pachyderm/] });
    // Paused mode can still back it up, but says it cannot prove the objects held: plan says so before any backup.
    const plan = await cluster.runCli(['--config', await cluster.writeConfig(notPachyderm), 'plan']);
    assert.equal(plan.code, 0, describeRun(plan));
    assert.match(plan.stdout, /! warning: database "postgres" \(cluster\.databases\.pachyderm\) has no table storage\.chunk_objects.*cannot prove them held/, describeRun(plan));
  });

  const urlCases: Array<{ input: string; mutate: (raw: RawConfig) => void; message: RegExp[] }> = [
    { input: 'repository.url http://bucket (not a store URL)', mutate: (raw) => void (raw.repository.url = 'http://bucket'), message: [/repository\.url/, /"http:\/\/bucket" is not a store URL; use s3:\/\/bucket\[\/prefix\] or file:\/\/\/absolute\/path/] },
    { input: 'cluster.objectStore.url s3://Bad_Bucket', mutate: (raw) => void (raw.cluster.objectStore.url = 's3://Bad_Bucket'), message: [/cluster\.objectStore\.url: "Bad_Bucket" is not a valid S3 bucket name/] },
    { input: 'repository.url s3:// (no bucket)', mutate: (raw) => void (raw.repository.url = 's3://'), message: [/repository\.url: "" is not a valid S3 bucket name/] },
    { input: 'repository.url gs://bucket (unsupported)', mutate: (raw) => void (raw.repository.url = 'gs://bucket'), message: [/gs:\/\/ stores are not supported yet/] },
    { input: 'repository.url file://relative/dir (not absolute)', mutate: (raw) => void (raw.repository.url = 'file://relative/dir'), message: [/repository\.url: file:\/\/relative\/dir is not a valid file URL; write it as file:\/\/\/absolute\/path/] },
    { input: 'repository.url file:///no/such/dir', mutate: (raw) => void (raw.repository.url = 'file:///no/such/pachbackup-dir'), message: [/\/no\/such\/pachbackup-dir does not exist/] },
  ];
  for (const { input, mutate, message } of urlCases) {
    test(`bad URL: ${input}`, { timeout: 120_000 }, async (t) => {
      await refusedBackup(t, cluster, 'bad URL', input, mutate, { exit: [EXIT_FAILED, EXIT_USAGE], message });
    });
  }

  const flagCases: Array<{ input: string; args: string[]; message: RegExp[] }> = [
    { input: 'backup --concurrency 0', args: ['backup', '--concurrency', '0'], message: [/--concurrency/, /integer from 1 to 512/] },
    { input: 'backup --mode sometimes', args: ['backup', '--mode', 'sometimes'], message: [/--mode/, /paused, online|choices/] },
    { input: 'restore latest --db-map pachyderm', args: ['restore', 'latest', '--db-map', 'pachyderm'], message: [/--db-map/, /pachyderm=NAME/] },
    { input: 'backup --max-downtime -5', args: ['backup', '--max-downtime', '-5'], message: [/--max-downtime/] },
  ];
  for (const { input, args, message } of flagCases) {
    test(`bad flag: ${input}`, { timeout: 120_000 }, async (t) => {
      const config = await cluster.writeConfig();
      const started = Date.now();
      const run = await cluster.runCli(['--config', config, '--yes', ...args]);
      record(t, { category: 'bad input', fault: `bad flag: ${input}`, runs: 1, detail: `exit ${run.code}: "${run.stderr.split('\n')[0]}"` });
      assert.equal(run.code, EXIT_USAGE, describeRun(run));
      for (const pattern of message) assert.match(run.stderr, pattern, describeRun(run));
      assert.ok(Date.now() - started < 60_000);
    });
  }
});

describe('bad input table: databases, repositories and restore targets (fs)', () => {
  let cluster: TestCluster;
  let id: string;
  let blackhole: FaultProxy;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 5 })) as TestCluster;
    id = (await cluster.backup()).id;
    await cluster.resetMarker();
    // Accepts connections for PostgreSQL and never answers.
    blackhole = await startFaultProxy({ target: { host: '127.0.0.1', port: 9 }, mode: { kind: 'blackhole' } });
  });
  after(async () => {
    await blackhole?.close();
    await cluster?.cleanup();
  });

  /** Restore refusals create no database and write no object. */
  async function refusedRestore(t: TestContext, category: string, input: string, mutate: (raw: RawConfig) => void, expected: Refusal, extraArgs: string[] = [], env: Record<string, string> = {}): Promise<CliResult> {
    const databases = await cluster.targetDatabases();
    const keys = await cluster.restoredKeys();
    const config = await cluster.writeConfig(mutate);
    const run = await refused(t, cluster, category, input, ['--config', config, '--yes', 'restore', id, ...extraArgs], expected, env);
    assert.deepEqual(await cluster.targetDatabases(), databases, 'no database created or dropped on the target');
    assert.deepEqual(await cluster.restoredKeys(), keys, 'the target store is unchanged');
    return run;
  }

  test('unreachable host: cluster.postgres accepts TCP and never answers (connectTimeoutSeconds 2)', { timeout: 120_000 }, async (t) => {
    await refusedBackup(t, cluster, 'unreachable host', 'cluster.postgres blackholed (accepts, never answers), connectTimeoutSeconds 2', (raw) => {
      raw.cluster.postgres.port = blackhole.port;
      raw.cluster.postgres.connectTimeoutSeconds = 2;
    }, { exit: EXIT_FAILED, message: [/cannot reach PostgreSQL/, /timed out after 2s/, /cluster\.postgres\.host/], withinSeconds: 2 + 25 });
  });

  test('unreachable host: restore.postgres accepts TCP and never answers (connectTimeoutSeconds 2)', { timeout: 120_000 }, async (t) => {
    await refusedRestore(t, 'unreachable host', 'restore.postgres blackholed (accepts, never answers), connectTimeoutSeconds 2', (raw) => {
      raw.restore.postgres.port = blackhole.port;
      raw.restore.postgres.connectTimeoutSeconds = 2;
    }, { exit: EXIT_FAILED, message: [/cannot reach PostgreSQL/, /timed out after 2s/, /restore\.postgres\.host/], withinSeconds: 2 + 25 });
  });

  test('unreachable host: a host name that does not resolve', { timeout: 120_000 }, async (t) => {
    await refusedBackup(t, cluster, 'unreachable host', 'cluster.postgres.host pg.invalid (does not resolve), connectTimeoutSeconds 3', (raw) => {
      raw.cluster.postgres.host = 'pg.invalid';
      raw.cluster.postgres.connectTimeoutSeconds = 3;
    }, { exit: EXIT_FAILED, message: [/pg\.invalid/, /cannot resolve host|cannot reach/, /cluster\.postgres\.host/], withinSeconds: 3 + 25 });
  });

  test('wrong credentials: restore.postgres password', { timeout: 120_000 }, async (t) => {
    await refusedRestore(t, 'wrong credentials', 'restore.postgres.password is not the password', (raw) => {
      raw.restore.postgres.password = { env: 'PBT_TABLE_WRONG_PASSWORD' };
    }, { exit: EXIT_FAILED, message: [/password authentication failed/, /restore\.postgres\.password/] }, [], { PBT_TABLE_WRONG_PASSWORD: 'not-the-password-at-all' });
  });

  test('missing privileges: restore as a user without CREATEDB', { timeout: 120_000 }, async (t) => {
    await cluster.target!.query('postgres', "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pbnocreatedb') THEN CREATE ROLE pbnocreatedb LOGIN PASSWORD 'pbnocreatedb-pw' NOCREATEDB; END IF; END $$");
    await refusedRestore(t, 'missing privileges', 'restore.postgres.user has LOGIN but not CREATEDB', (raw) => {
      raw.restore.postgres.user = 'pbnocreatedb';
      raw.restore.postgres.password = { env: 'PBT_TABLE_NOCREATEDB' };
    }, { exit: EXIT_FAILED, message: [/pbnocreatedb may not create databases/, /CREATEDB/] }, [], { PBT_TABLE_NOCREATEDB: 'pbnocreatedb-pw' });
  });

  test('missing privileges: back up as a user who may not read the Pachyderm tables (refused before pausing)', { timeout: 120_000 }, async (t) => {
    await cluster.source.query('postgres', "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pbnoread') THEN CREATE ROLE pbnoread LOGIN PASSWORD 'pbnoread-pw'; END IF; END $$");
    const run = await refusedBackup(t, cluster, 'missing privileges', 'cluster.postgres.user may connect but not read the tables', (raw) => {
      raw.cluster.postgres.user = 'pbnoread';
      raw.cluster.postgres.password = { env: 'PBT_TABLE_NOREAD' };
    }, { exit: EXIT_FAILED, message: [/may not read/, /GRANT SELECT/] }, { PBT_TABLE_NOREAD: 'pbnoread-pw' });
    assert.match(errorLine(run), /pbnoread|permission denied for (table|schema)/, describeRun(run));
  });

  test('Helm values that cannot be parsed, for an unencrypted repository (their secrets cannot be redacted; refused before pausing)', { timeout: 120_000 }, async (t) => {
    const values = join(cluster.work, 'broken-values.yaml');
    await writeFile(values, 'pachd:\n  storage:\n    amazon: [unclosed\n');
    await refusedBackup(t, cluster, 'malformed Helm values', 'cluster.helmValues is not YAML (unencrypted repository)', (raw) => {
      raw.cluster.helmValues = values;
    }, { exit: EXIT_FAILED, message: [/cluster\.helmValues/, /cannot be parsed to redact/, /keepHelmSecrets/] });
  });

  test('repository equal to the cluster directory (fs, the same path)', { timeout: 120_000 }, async (t) => {
    await refusedBackup(t, cluster, 'repository equal to the cluster bucket', 'repository.url is cluster.objectStore.url (fs)', (raw) => {
      raw.repository.url = raw.cluster.objectStore.url;
    }, { exit: EXIT_FAILED, message: [/overlaps/, /repository\.url/, /cluster\.objectStore\.url/] });
  });

  test('repository that contains the cluster directory (fs, its parent)', { timeout: 120_000 }, async (t) => {
    await refusedBackup(t, cluster, 'repository equal to the cluster bucket', 'repository.url is the parent directory of cluster.objectStore.url (fs)', (raw) => {
      raw.repository.url = pathToFileURL(dirname(cluster.dirs!.cluster)).href;
    }, { exit: EXIT_FAILED, message: [/overlaps/] });
  });

  test('restore target store equal to the repository', { timeout: 120_000 }, async (t) => {
    await refusedRestore(t, 'repository equal to the cluster bucket', 'restore.objectStore.url is repository.url', (raw) => {
      raw.restore.objectStore.url = raw.repository.url;
    }, { exit: EXIT_FAILED, message: [/restore\.objectStore overlaps the repository/] });
  });

  test('non-empty restore target: a database with tables', { timeout: 120_000 }, async (t) => {
    await cluster.target!.createDatabase('occupied');
    await cluster.target!.query('occupied', 'CREATE TABLE IF NOT EXISTS precious (id int)');
    await refusedRestore(t, 'non-empty restore target', 'restore.databases.pachyderm names a database that has tables', (raw) => {
      raw.restore.databases.pachyderm = 'occupied';
    }, { exit: EXIT_FAILED, message: [/target database "occupied" on .* is not empty \(1 tables\)/, /--force/] });
    const { rows } = await cluster.target!.query<{ n: string }>('occupied', "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'precious'");
    assert.equal(Number(rows[0]?.n), 1, 'the existing table is untouched');
  });

  test('non-empty restore target: a store that holds objects', { timeout: 120_000 }, async (t) => {
    const occupied = join(cluster.work, 'occupied-store');
    await mkdir(occupied, { recursive: true });
    await writeFile(join(occupied, 'someone-elses-object'), 'keep me');
    await refusedRestore(t, 'non-empty restore target', 'restore.objectStore.url names a directory that holds objects', (raw) => {
      raw.restore.objectStore.url = pathToFileURL(occupied).href;
    }, { exit: EXIT_FAILED, message: [/target store .*occupied-store is not empty/, /--force/] });
  });

  test('non-empty restore target with --force --dry-run: prints the plan, changes nothing', { timeout: 120_000 }, async (t) => {
    const config = await cluster.writeConfig((raw) => {
      raw.restore.databases.pachyderm = 'occupied';
    });
    const run = await cluster.runCli(['--config', config, '--yes', 'restore', id, '--force', '--dry-run']);
    assert.equal(run.code, 0, describeRun(run));
    assert.match(run.stdout, /dry run/);
    assert.match(run.stdout, /drop and recreate non-empty database "occupied"/);
    const { rows } = await cluster.target!.query<{ n: string }>('occupied', "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'precious'");
    assert.equal(Number(rows[0]?.n), 1, 'nothing dropped');
    record(t, { category: 'bad input', fault: 'non-empty restore target: --force --dry-run', runs: 1, detail: 'exit 0, the plan names the drop, nothing changed' });
  });

  test('a backup id that does not exist', { timeout: 120_000 }, async (t) => {
    const config = await cluster.writeConfig();
    await refused(t, cluster, 'bad argument', 'restore 20990101T000000Z-000000 (no such backup)', ['--config', config, '--yes', 'restore', '20990101T000000Z-000000'], { exit: EXIT_FAILED, message: [/backup 20990101T000000Z-000000 has no manifest/, /pachbackup list/] });
  });

  test('a repository directory that is not a pachbackup repository', { timeout: 120_000 }, async (t) => {
    const config = await cluster.writeConfig((raw) => {
      raw.repository.url = pathToFileURL(cluster.dirs!.restored).href;
    });
    await refused(t, cluster, 'bad URL', 'verify against a directory that is not a repository', ['--config', config, 'verify', 'latest'], { exit: EXIT_FAILED, message: [/is not a pachbackup repository/, /repository\.url/] });
  });
});

describe('bad input table: S3 credentials and endpoints', () => {
  let cluster: TestCluster;
  let kind: StoreKind;
  let blackhole: FaultProxy;
  before(async () => {
    kind = cephRgwSkipReason() === undefined ? 'ceph' : 's3rver';
    cluster = (await TestCluster.create({ kind, target: false, chunks: 3 })) as TestCluster;
    const endpoint = new URL(cluster.s3!.endpoint);
    blackhole = await startFaultProxy({ target: { host: endpoint.hostname, port: Number(endpoint.port) }, mode: { kind: 'blackhole' } });
  });
  after(async () => {
    await blackhole?.close();
    await cluster?.cleanup();
  });

  test('wrong credentials: the repository\'s S3 secret key', { timeout: 120_000 }, async (t) => {
    if (kind !== 'ceph') {
      t.skip('s3rver does not check request signatures; needs Ceph RGW');
      return;
    }
    await refusedBackup(t, cluster, 'wrong credentials', 'repository.secretAccessKey is not the key (Ceph RGW)', (raw) => {
      raw.repository.secretAccessKey = { env: 'PBT_TABLE_WRONG_S3_SECRET' };
    }, { exit: EXIT_FAILED, message: [/pachbackup-repo/, /denied|SignatureDoesNotMatch/, /credentials|access key/] }, { PBT_TABLE_WRONG_S3_SECRET: 'wrong-secret-key-0123456789abcdef' });
  });

  test('wrong credentials: an S3 access key id the server does not know', { timeout: 120_000 }, async (t) => {
    await refusedBackup(t, cluster, 'wrong credentials', `cluster.objectStore.accessKeyId unknown to the server (${kind})`, (raw) => {
      raw.cluster.objectStore.accessKeyId = { env: 'PBT_TABLE_WRONG_S3_ID' };
    }, { exit: EXIT_FAILED, message: [/pachyderm-cluster/, /denied/, /access key|credentials/] }, { PBT_TABLE_WRONG_S3_ID: 'NOSUCHACCESSKEY12345' });
  });

  test('unreachable host: an S3 endpoint on a closed port', { timeout: 120_000 }, async (t) => {
    const port = await findFreePort();
    await refusedBackup(t, cluster, 'unreachable host', 'repository.endpoint on a closed port (connection refused)', (raw) => {
      raw.repository.endpoint = `http://127.0.0.1:${port}`;
    }, { exit: EXIT_FAILED, message: [new RegExp(`cannot reach http://127\\.0\\.0\\.1:${port}`), /ECONNREFUSED/, /endpoint/], withinSeconds: 40 });
  });

  test('unreachable host: an S3 endpoint that accepts TCP and never answers (requestTimeoutSeconds 2)', { timeout: 180_000 }, async (t) => {
    // check() tries 3 times, each bounded by the 2 s request timeout.
    await refusedBackup(t, cluster, 'unreachable host', 'repository.endpoint blackholed (accepts, never answers), requestTimeoutSeconds 2', (raw) => {
      raw.repository.endpoint = `http://${blackhole.address}`;
      raw.repository.requestTimeoutSeconds = 2;
    }, { exit: EXIT_FAILED, message: [/pachbackup-repo/, /timeout|timed out/i], withinSeconds: 3 * 2 + 25 });
  });

  test('repository equal to the cluster bucket, endpoint spelt with another case', { timeout: 120_000 }, async (t) => {
    await refusedBackup(t, cluster, 'repository equal to the cluster bucket', 'repository is the cluster bucket, endpoint host in upper case', (raw) => {
      raw.repository = { ...raw.cluster.objectStore, endpoint: raw.cluster.objectStore.endpoint.replace('http://', 'HTTP://') };
    }, { exit: EXIT_FAILED, message: [/overlaps/, /repository\.url/] });
  });
});

describe('bad input table: command lines and signals (no cluster needed)', () => {
  const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
  const cli = (args: string[]) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: { ...process.env, CI: 'true' } });

  // A scheduled job whose arguments lost the command must fail, not report success.
  for (const args of [[], ['--config', 'pachbackup.yaml'], ['--json', '--yes'], ['key']]) {
    test(`no command: pachbackup ${args.join(' ')}`, (t) => {
      const run = cli(args);
      record(t, { category: 'bad input', fault: `bad flag: no command (pachbackup ${args.join(' ')})`, runs: 1, detail: `exit ${run.status}` });
      assert.equal(run.status, EXIT_USAGE, `${run.stdout}${run.stderr}`);
      assert.match(run.stderr, /Usage: pachbackup/);
    });
  }

  // --json promises one JSON event per line on stdout: a refused command line is an error event,
  // as a refused config file is.
  for (const { args, message } of [
    { args: ['backup', '--mode', 'sometimes'], message: /--mode/ },
    { args: ['--bogus', 'list'], message: /unknown option '--bogus'/ },
    { args: ['restore'], message: /missing required argument 'backup'/ },
    { args: ['key'], message: /command is missing/ },
  ]) {
    test(`--json: a refused command line is a JSON error event: pachbackup --json ${args.join(' ')}`, () => {
      const run = cli(['--json', ...args]);
      assert.equal(run.status, EXIT_USAGE, `${run.stdout}${run.stderr}`);
      const events = run.stdout.split('\n').filter((line) => line !== '').map((line) => JSON.parse(line) as { type: string; message: string });
      assert.equal(events.length, 1, run.stdout);
      assert.equal(events[0]!.type, 'error');
      assert.match(events[0]!.message, message);
    });
  }

  // A flag's value is checked against the limit of the config key it stands for, and the refusal
  // names the flag: the config file said nothing wrong, and restore, verify and drill passed any
  // --concurrency on (100,000 reads at once).
  for (const args of [['backup', '--concurrency', '1000'], ['restore', 'latest', '--concurrency', '100000'], ['verify', 'latest', '--concurrency', '100000'], ['drill', 'latest', '--concurrency', '100000'], ['restore', 'latest', '--jobs', '100'], ['drill', 'latest', '--pg-port', '70000']]) {
    test(`a flag beyond its limit is refused naming the flag: pachbackup ${args.join(' ')}`, () => {
      const run = cli(['--config', 'no-such-config.yaml', ...args]);
      assert.equal(run.status, EXIT_USAGE, `${run.stdout}${run.stderr}`);
      assert.match(run.stderr, new RegExp(`option '${args[args.length - 2]} <[a-z]+>' argument '${args[args.length - 1]}' is invalid\\. must be an integer from 1 to \\d+`));
    });
  }

  test('control: help and version exit 0', () => {
    for (const args of [['--help'], ['help'], ['help', 'backup'], ['key', '--help'], ['--version']]) assert.equal(cli(args).status, 0, args.join(' '));
  });

  // Commands that pause nothing and hold no lock end at the first Ctrl-C; they did not watch the
  // abort signal, so they ran on to the end of their request timeouts and retries (minutes).
  test('SIGINT ends list, status and key list at once (exit 130) while the repository does not answer', { timeout: 120_000 }, async (t) => {
    const blackhole = await startFaultProxy({ target: { host: '127.0.0.1', port: 9 }, mode: { kind: 'blackhole' } });
    try {
      await withTempDir(async (dir) => {
        const config = join(dir, 'pachbackup.yaml');
        await writeFile(config, [
          'cluster:',
          '  postgres: { user: u }',
          `  objectStore: { url: ${pathToFileURL(dir).href} }`,
          'repository:',
          `  { url: "s3://pachbackup-repo", endpoint: "http://${blackhole.address}", requestTimeoutSeconds: 60, accessKeyId: { env: PBT_SIGINT_AK }, secretAccessKey: { env: PBT_SIGINT_SK }, encryption: { key: { env: PBT_SIGINT_KEK } } }`,
          '',
        ].join('\n'));
        for (const args of [['list'], ['status'], ['key', 'list']]) {
          const child = spawn(process.execPath, [CLI, '--config', config, ...args], { env: { ...process.env, CI: 'true', PBT_SIGINT_AK: 'access', PBT_SIGINT_SK: 'secret-key', PBT_SIGINT_KEK: 'a passphrase of enough characters' }, stdio: ['ignore', 'pipe', 'pipe'] });
          let stderr = '';
          child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
          await new Promise((resolve) => setTimeout(resolve, 1500));
          const sent = Date.now();
          child.kill('SIGINT');
          const code = await Promise.race([exited, new Promise<'running'>((resolve) => setTimeout(() => resolve('running'), 10_000))]);
          if (code === 'running') child.kill('SIGKILL');
          record(t, { category: 'bad input', fault: `SIGINT during ${args.join(' ')} (repository not answering)`, runs: 1, detail: code === 'running' ? 'still running 10 s after SIGINT' : `exit ${code} after ${Date.now() - sent} ms` });
          assert.equal(code, 130, `pachbackup ${args.join(' ')}: ${stderr}`);
          assert.match(stderr, /interrupted by SIGINT/);
        }
      });
    } finally {
      await blackhole.close();
    }
  });
});
