/**
 * Issue 6: secrets never leak. A cluster whose PostgreSQL roles have distinctive passwords, whose
 * S3 keys are random (Ceph RGW, the real S3 server; the filesystem when Ceph is not installed),
 * whose Helm values hold the database password where Pachyderm users put it, and an encrypted
 * second repository with a distinctive passphrase. Then backups, restores, verify, list, show,
 * status — succeeding and failing, human and --json, with PACHBACKUP_DEBUG stack traces — and a
 * search of everything they wrote for every secret: stdout, stderr, every file of the repository
 * (unencrypted, so its files are readable), the restore target, the local state directory (pause
 * ledger), the rewritten Helm values, the metrics file, the PostgreSQL server logs, and the
 * command lines of every process started meanwhile. None may contain a secret.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, before, describe, test, type TestContext } from 'node:test';
import { FsObjectStore } from '../src/objectstore/fs.js';
import type { ObjectStore } from '../src/objectstore/store.js';
import { Repository } from '../src/repository/repository.js';
import { describeRun, TestCluster, type CliResult, type StoreKind } from './helpers/cluster.js';
import { cephRgwSkipReason, withTempDir } from './helpers/servers.js';

function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

const tag = randomBytes(6).toString('hex');
const SECRETS = {
  sourcePassword: `Sup3r-Secret-PG-src-${tag}`,
  targetPassword: `Sup3r-Secret-PG-dst-${tag}`,
  wrongPassword: `Wr0ng-Secret-PG-${tag}`,
  wrongS3Secret: `Wr0ng-Secret-S3-${tag}`,
  passphrase: `Sup3r-Secret-passphrase-${tag}`,
  wrongPassphrase: `Wr0ng-Secret-passphrase-${tag}`,
};
const ROLE = 'pbsecret';

/** Every form a secret could take in output: as is, base64 and percent-encoded. */
function needlesOf(secrets: Record<string, string>): Array<{ name: string; text: string }> {
  const out: Array<{ name: string; text: string }> = [];
  for (const [name, value] of Object.entries(secrets)) {
    out.push({ name, text: value });
    out.push({ name: `${name} (base64)`, text: Buffer.from(value).toString('base64') });
    if (encodeURIComponent(value) !== value) out.push({ name: `${name} (percent-encoded)`, text: encodeURIComponent(value) });
  }
  return out;
}

/** Command lines of processes seen while a CLI runs (pg_dump, pg_restore, pause commands…). */
class CommandLineWatcher {
  readonly seen = new Set<string>();
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;
  start(): void {
    const poll = async (): Promise<void> => {
      for (const pid of await readdir('/proc').catch(() => [] as string[])) {
        if (!/^\d+$/.test(pid)) continue;
        const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
        if (cmdline) this.seen.add(cmdline.replace(/\0/g, ' ').trim());
      }
      // A poll still running when stop() is called must not schedule another.
      if (!this.#stopped) this.#timer = setTimeout(() => void poll(), 25).unref();
    };
    void poll();
  }
  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
  }
}

describe('secrets never leak', () => {
  let cluster: TestCluster;
  let kind: StoreKind;
  const outputs: Array<{ label: string; text: string }> = [];
  const watcher = new CommandLineWatcher();
  const runs: string[] = [];
  let secrets: Record<string, string> = { ...SECRETS };

  before(async () => {
    kind = cephRgwSkipReason() === undefined ? 'ceph' : 'fs';
    cluster = (await TestCluster.create({ kind, chunks: 12 })) as TestCluster;
    // Roles with distinctive passwords on both servers; pachbackup connects as them.
    await cluster.source.query('postgres', `CREATE ROLE ${ROLE} LOGIN SUPERUSER PASSWORD '${SECRETS.sourcePassword}'`);
    await cluster.target!.query('postgres', `CREATE ROLE ${ROLE} LOGIN SUPERUSER PASSWORD '${SECRETS.targetPassword}'`);
    secrets = { ...SECRETS, fixtureSourcePassword: cluster.source.password, fixtureTargetPassword: cluster.target!.password };
    if (kind === 'ceph') secrets.s3SecretKey = cluster.s3!.secretAccessKey;
    watcher.start();
  });
  after(async () => {
    watcher.stop();
    await cluster?.cleanup();
  });

  const env = {
    PBT_SECRET_SRC_PG: SECRETS.sourcePassword,
    PBT_SECRET_DST_PG: SECRETS.targetPassword,
    PBT_SECRET_WRONG_PG: SECRETS.wrongPassword,
    PBT_SECRET_WRONG_S3: SECRETS.wrongS3Secret,
    PBT_SECRET_PASSPHRASE: SECRETS.passphrase,
    PBT_SECRET_WRONG_PASSPHRASE: SECRETS.wrongPassphrase,
  };

  const base = (raw: Record<string, any>): void => {
    raw.cluster.postgres.user = ROLE;
    raw.cluster.postgres.password = { env: 'PBT_SECRET_SRC_PG' };
    raw.restore.postgres.user = ROLE;
    raw.restore.postgres.password = { env: 'PBT_SECRET_DST_PG' };
    raw.cluster.helmValues = join(cluster.work, 'values.yaml');
    raw.restore.helmValuesOut = join(cluster.work, 'restored-values.yaml');
  };

  async function cli(label: string, args: string[], extraEnv: Record<string, string> = {}): Promise<CliResult> {
    const result = await cluster.runCli(args, { env: { ...env, ...extraEnv, PACHBACKUP_STATE_DIR: join(cluster.work, 'state') } });
    outputs.push({ label: `${label}: stdout`, text: result.stdout }, { label: `${label}: stderr`, text: result.stderr });
    runs.push(label);
    return result;
  }

  test('backup, restore, verify, list, show, status (human and --json, succeeding and failing): no secret in any output, file or command line', { timeout: 600_000 }, async (t) => {
    await writeFile(
      join(cluster.work, 'values.yaml'),
      [
        'global:',
        '  postgresql:',
        `    postgresqlHost: ${cluster.source.host}`,
        `    postgresqlPort: "${cluster.source.port}"`,
        `    postgresqlUsername: ${ROLE}`,
        `    postgresqlPassword: ${SECRETS.sourcePassword}`,
        'pachd:',
        '  storage:',
        '    backend: MINIO',
        '',
      ].join('\n'),
    );
    const config = await cluster.writeConfig(base);
    const debug = { PACHBACKUP_DEBUG: '1' };

    // Succeeding runs.
    const backup = await cli('backup --json', ['--config', config, '--json', '--yes', '--metrics-file', join(cluster.work, 'metrics.prom'), 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    const id = backup.result!.id as string;
    const human = await cli('backup (human)', ['--config', config, '--yes', 'backup']);
    assert.equal(human.code, 0, describeRun(human));
    for (const [label, args] of [
      ['verify', ['verify', id]],
      ['verify --json', ['--json', 'verify', id]],
      ['list', ['list']],
      ['list --json', ['--json', 'list']],
      ['show', ['show', id]],
      ['show --json', ['--json', 'show', id]],
      ['status --json', ['--json', 'status']],
    ] as Array<[string, string[]]>) {
      const r = await cli(label, ['--config', config, ...args]);
      assert.equal(r.code, 0, describeRun(r));
    }
    const restore = await cli('restore --json', ['--config', config, '--json', '--yes', '--metrics-file', join(cluster.work, 'metrics.prom'), 'restore', id]);
    assert.equal(restore.code, 0, describeRun(restore));

    // Failing runs, with stack traces on.
    const wrongPg = await cli('backup, wrong database password (debug)', ['--config', await cluster.writeConfig((raw) => {
      base(raw);
      raw.cluster.postgres.password = { env: 'PBT_SECRET_WRONG_PG' };
    }), '--yes', 'backup'], debug);
    assert.equal(wrongPg.code, 1, describeRun(wrongPg));
    assert.match(wrongPg.stderr, /password authentication failed/);
    if (kind === 'ceph') {
      const wrongS3 = await cli('backup --json, wrong S3 secret key (debug)', ['--config', await cluster.writeConfig((raw) => {
        base(raw);
        raw.repository.secretAccessKey = { env: 'PBT_SECRET_WRONG_S3' };
      }), '--json', '--yes', 'backup'], debug);
      assert.equal(wrongS3.code, 1, describeRun(wrongS3));
    }
    const midway = await cli('backup, object store fails mid-copy while paused (debug)', ['--config', config, '--yes', 'backup', '--no-precopy'], {
      ...debug,
      PACHBACKUP_FAULTS: JSON.stringify([{ store: 'repository', op: 'put', keyContains: 'objects/', kind: 'permanent' }, { store: 'repository', op: 'put', keyContains: '/index', kind: 'permanent' }]),
    });
    assert.equal(midway.code, 1, describeRun(midway));
    const restoreWrongPg = await cli('restore --json, wrong target password (debug)', ['--config', await cluster.writeConfig((raw) => {
      base(raw);
      raw.restore.postgres.password = { env: 'PBT_SECRET_WRONG_PG' };
      raw.restore.databases = { pachyderm: 'pachyderm_again', dex: 'dex_again' };
    }), '--json', '--yes', 'restore', id], debug);
    assert.equal(restoreWrongPg.code, 1, describeRun(restoreWrongPg));
    if (kind === 'fs') await mkdir(join(cluster.work, 'restored-again'), { recursive: true });
    const restoreMidway = await cli('restore, target store fails mid-copy (debug)', ['--config', await cluster.writeConfig((raw) => {
      base(raw);
      raw.restore.databases = { pachyderm: 'pachyderm_again', dex: 'dex_again' };
      raw.restore.objectStore.url = kind === 'fs' ? pathToFileURL(join(cluster.work, 'restored-again')).href : 's3://pachyderm-restored/again';
    }), '--yes', 'restore', id], { ...debug, PACHBACKUP_FAULTS: JSON.stringify([{ store: 'restore.objectStore', op: 'put', after: 3, kind: 'permanent' }]) });
    assert.equal(restoreMidway.code, 1, describeRun(restoreMidway));

    // An encrypted repository: its passphrase is a secret too, right or wrong.
    const encrypted = (raw: Record<string, any>): void => {
      base(raw);
      raw.repository = kind === 'fs' ? { url: `${raw.repository.url}-encrypted` } : { ...raw.repository, url: `${raw.repository.url}/encrypted` };
      raw.repository.encryption = { key: { env: 'PBT_SECRET_PASSPHRASE' } };
    };
    if (kind === 'fs') await mkdir(join(cluster.work, 'repository-encrypted'), { recursive: true });
    const encBackup = await cli('backup --json, encrypted repository', ['--config', await cluster.writeConfig(encrypted), '--json', '--yes', 'backup']);
    assert.equal(encBackup.code, 0, describeRun(encBackup));
    const encWrong = await cli('verify, encrypted repository, wrong passphrase (debug)', ['--config', await cluster.writeConfig((raw) => {
      encrypted(raw);
      raw.repository.encryption = { key: { env: 'PBT_SECRET_WRONG_PASSPHRASE' } };
    }), 'verify', 'latest'], debug);
    assert.equal(encWrong.code, 1, describeRun(encWrong));
    assert.match(encWrong.stderr, /wrong encryption key/);
    watcher.stop();

    // Files written outside encrypted data.
    const files: Array<{ label: string; text: string }> = [];
    const addStore = async (label: string, store: ObjectStore): Promise<number> => {
      let n = 0;
      for await (const info of store.list()) {
        const body = await store.get(info.key);
        const chunks: Buffer[] = [];
        for await (const c of body) chunks.push(c as Buffer);
        files.push({ label: `${label}/${info.key}`, text: Buffer.concat(chunks).toString('latin1') });
        n++;
      }
      return n;
    };
    const repoFiles = await addStore('repository', cluster.repositoryStore());
    const restoredFiles = await addStore('restore target', cluster.restoredStore());
    const walk = async (dir: string, skip: (path: string) => boolean): Promise<void> => {
      for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
        const path = join(dir, entry.name);
        if (skip(path)) continue;
        if (entry.isDirectory()) await walk(path, skip);
        else if (entry.isFile()) files.push({ label: path, text: (await readFile(path)).toString('latin1') });
      }
    };
    // The work directory: configs, state dir, rewritten Helm values, metrics; not the cluster's own bucket or the Helm values input.
    await walk(cluster.work, (p) => p.endsWith('/cluster-bucket') || p === join(cluster.work, 'values.yaml'));
    files.push({ label: 'source PostgreSQL log', text: await readFile(cluster.source.logFile, 'utf8') });
    files.push({ label: 'target PostgreSQL log', text: await readFile(cluster.target!.logFile, 'utf8') });
    const restoredValues = await readFile(join(cluster.work, 'restored-values.yaml'), 'utf8');
    assert.match(restoredValues, /postgresqlPassword/, 'the restored Helm values were written (with the password key redacted)');

    const haystacks = [...outputs, ...files, ...[...watcher.seen].map((c) => ({ label: 'command line', text: c }))];
    const leaks = findLeaks(secrets, haystacks);
    // Controls: the search finds a secret where one is (the Helm values input), and the watcher saw the PostgreSQL tools run.
    assert.equal(findLeaks(secrets, [{ label: 'values.yaml', text: await readFile(join(cluster.work, 'values.yaml'), 'utf8') }]).length, 1, 'the search finds the password in the Helm values input');
    assert.ok([...watcher.seen].some((c) => /pg_dump|pg_restore/.test(c)), 'the command-line watcher saw pg_dump or pg_restore');
    t.diagnostic(`searched ${outputs.length} output streams of ${runs.length} runs, ${files.length} files (${repoFiles} in the repository, ${restoredFiles} in the restore target), ${watcher.seen.size} command lines, for ${Object.keys(secrets).length} secrets (${kind} stores)`);
    record(t, {
      category: 'secrets',
      fault: `distinctive database passwords, ${kind === 'ceph' ? 'S3 secret key, ' : ''}encryption passphrase, wrong ones of each, the password in the Helm values`,
      runs: runs.length,
      detail: `${runs.length} runs (${runs.filter((r) => /wrong|fails/.test(r)).length} failing, stack traces on); searched ${outputs.length} output streams, ${files.length} files and ${watcher.seen.size} command lines: ${leaks.length === 0 ? 'no secret found' : `${leaks.length} leaks`}`,
    });
    assert.deepEqual(leaks, [], 'no secret appears anywhere');
  });
});

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

describe('secrets never leak from refused input (no cluster needed)', () => {
  const secret = `Sup3r-Secret-refused-${tag}`;

  /** Runs `pachbackup list` with a config of these cluster and repository lines, in `dir` (REPOSITORY stands for a directory there). */
  async function listWith(dir: string, cluster: string, repository: string): Promise<{ code: number | null; output: string }> {
    const config = join(dir, 'pachbackup.yaml');
    const lines = ['cluster:', cluster, `  objectStore: { url: ${pathToFileURL(join(dir, 'cluster')).href} }`, 'repository:', repository.replace('REPOSITORY', pathToFileURL(join(dir, 'repository')).href), ''];
    await writeFile(config, lines.join('\n'));
    const run = spawnSync(process.execPath, [CLI, '--config', config, 'list'], { encoding: 'utf8', env: { ...process.env, CI: 'true', PBT_REFUSED_AK: 'ak', PBT_REFUSED_SK: 'sk' } });
    return { code: run.status, output: `${run.stdout}${run.stderr}` };
  }

  const pg = '  postgres: { user: u }';
  const s3 = 'accessKeyId: { env: PBT_REFUSED_AK }, secretAccessKey: { env: PBT_REFUSED_SK }';
  const cases: Array<{ input: string; cluster: string; repository: string; message: RegExp }> = [
    { input: 'the passphrase written as repository.encryption itself', cluster: pg, repository: `  url: REPOSITORY\n  encryption: "${secret}"`, message: /repository\.encryption: expected object, got a string/ },
    { input: 'a connection URL with its password as cluster.postgres', cluster: `  postgres: "postgresql://pachyderm:${secret}@db.example.com:5432/pachyderm"`, repository: '  url: REPOSITORY', message: /cluster\.postgres: expected object, got a string/ },
    { input: 'S3 credentials in repository.url', cluster: pg, repository: `  { url: "s3://AKIAEXAMPLE:${secret}@pachbackup-repo", ${s3} }`, message: /repository\.url: must not hold credentials/ },
    { input: 'S3 credentials in repository.endpoint', cluster: pg, repository: `  { url: "s3://pachbackup-repo", endpoint: "http://minio:${secret}@127.0.0.1:1", ${s3} }`, message: /repository\.endpoint: must not hold credentials/ },
  ];
  for (const { input, cluster, repository, message } of cases) {
    test(`a config error does not echo the secret: ${input}`, async () => {
      await withTempDir(async (dir) => {
        const run = await listWith(dir, cluster, repository);
        assert.equal(run.code, 2, run.output);
        assert.match(run.output, message);
        assert.deepEqual(findLeaks({ secret }, [{ label: 'output', text: run.output }]), []);
      });
    });
  }

  test('Helm values that are not YAML because of their password: the refusal names the line, not the password', async () => {
    const repo = new Repository(new FsObjectStore(tmpdir()));
    const values = ['global:', '  postgresql:', `    postgresqlPassword: pa: ${secret}`, ''].join('\n');
    await assert.rejects(repo.helmValuesForStorage(Buffer.from(values), false), (err: Error) => {
      assert.match(err.message, /cannot be parsed to redact their secrets .*not valid YAML: .* at line 3, column \d+/);
      assert.deepEqual(findLeaks({ secret }, [{ label: 'error', text: err.message }]), []);
      return true;
    });
  });
});

/** Every place a secret, in any of its forms, appears. */
function findLeaks(secrets: Record<string, string>, haystacks: Array<{ label: string; text: string }>): string[] {
  const leaks: string[] = [];
  for (const { name, text: needle } of needlesOf(secrets)) {
    for (const { label, text } of haystacks) {
      if (text.includes(needle)) leaks.push(`${name} found in ${label}: …${excerpt(text, needle)}…`);
    }
  }
  return leaks;
}

function excerpt(text: string, needle: string): string {
  const at = text.indexOf(needle);
  return text.slice(Math.max(0, at - 80), at + needle.length + 40).replace(/\s+/g, ' ');
}
