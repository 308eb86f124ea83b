/**
 * Parallel dumps and restores with real PostgreSQL 15 tools: a backup with backup.dumpJobs 3
 * (pg_dump --format=directory --jobs=3 from the exported snapshot, each file uploaded, one of
 * them after a transient store fault) restores with restore.jobs 3 to the same rows, table by
 * table; a custom-format backup (dumpJobs 1, the format of every older repository) still restores,
 * also with pg_restore --jobs; verify and restore name a missing or damaged file of a directory
 * dump; drill restores a directory dump; prune deletes all its files; bad dumpJobs values are one
 * clear config error.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { validateConfig } from '../src/config/load.js';
import { sha256Hex } from '../src/repository/digest.js';
import { compareFingerprints, describeRun, TestCluster, withFaults, type Fingerprints, type RawConfig } from './helpers/cluster.js';

const EXIT_FAILED = 1;
const EXIT_USAGE = 2;
const BULK_TABLES = ['alpha', 'beta', 'gamma', 'delta'];

function escape(text: string): RegExp {
  return new RegExp(text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
}

describe('parallel dumps (backup.dumpJobs) and parallel restores (restore.jobs)', () => {
  let cluster: TestCluster;
  let source: Fingerprints;
  let dirId: string;
  let customId: string;
  let config: string;

  const jobs = (dumpJobs: number, restoreJobs: number) => (raw: RawConfig) => {
    raw.backup.dumpJobs = dumpJobs;
    raw.restore.jobs = restoreJobs;
  };
  const manifest = async (id: string) => JSON.parse(await readFile(join(cluster.repositoryDir!, 'backups', id, 'manifest.json'), 'utf8'));

  /** Drops the restored databases and empties the restore store, for the next restore. */
  async function resetTarget(): Promise<void> {
    for (const name of await cluster.targetDatabases()) await cluster.target!.query('postgres', `DROP DATABASE "${name}" WITH (FORCE)`);
    for (const entry of await readdir(cluster.dirs!.restored)) await rm(join(cluster.dirs!.restored, entry), { recursive: true, force: true });
  }

  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 20 })) as TestCluster;
    // Several tables of some size besides the fixture's, so the three pg_dump workers share work.
    for (const [i, table] of BULK_TABLES.entries()) {
      await cluster.source.query('pachyderm', `CREATE TABLE public.bulk_${table} (id bigint PRIMARY KEY, payload text, n numeric)`);
      await cluster.source.query('pachyderm', `INSERT INTO public.bulk_${table} SELECT g, repeat(md5(g::text), ${i + 2}), g * 1.5 FROM generate_series(1, ${5000 * (i + 1)}) g`);
    }
    source = await cluster.sourceFingerprints();
    // Two uploads of dump files fail with a transient fault: each is uploaded again from the scratch copy.
    await withFaults([{ store: 'repository', op: 'put', keyContains: '.dump.d/', kind: 'transient', limit: 2 }], async () => {
      dirId = (await cluster.backup(jobs(3, 3))).id;
    });
    customId = (await cluster.backup(jobs(1, 1))).id;
    config = await cluster.writeConfig((raw) => {
      jobs(1, 3)(raw);
      raw.drill = { objectStore: { url: pathToFileURL(join(cluster.work, 'drill-scratch')).href } };
    });
  });
  after(async () => {
    await cluster?.cleanup();
  });

  test('the manifest records each directory dump file by file; a custom dump is recorded as before', async () => {
    const dir = await manifest(dirId);
    assert.equal(dir.formatVersion, 3, 'a manifest with a directory dump is format 3, which older releases refuse instead of misreading');
    assert.equal(dir.databases.length, 2);
    for (const db of dir.databases) {
      assert.equal(db.format, 'directory');
      assert.equal(db.file, `backups/${dirId}/db/${db.name}.dump.d/`);
      const names = db.files.map((f: { file: string }) => f.file.slice(db.file.length));
      assert.ok(names.includes('toc.dat'), `toc.dat among ${names.join(', ')}`);
      assert.ok(names.some((n: string) => /^\d+\.dat\.gz$/.test(n)), `table data files among ${names.join(', ')}`);
      let total = 0;
      const lines: string[] = [];
      for (const f of db.files) {
        const bytes = await readFile(join(cluster.repositoryDir!, f.file));
        assert.equal(bytes.length, f.size, f.file);
        assert.equal(sha256Hex(bytes), f.sha256, f.file);
        total += f.size;
        lines.push(`${f.sha256}  ${f.file.slice(db.file.length)}\n`);
      }
      assert.equal(db.size, total, 'size is the total of the files');
      assert.equal(db.sha256, sha256Hex(lines.sort((a, b) => a.slice(66).localeCompare(b.slice(66))).join('')), 'sha256 is the digest of the file list');
      assert.ok(db.tables.length > 0);
    }
    const pach = dir.databases.find((d: { role: string }) => d.role === 'pachyderm');
    for (const table of BULK_TABLES) assert.ok(pach.tables.some((t: { table: string }) => t.table === `bulk_${table}`), `row count of bulk_${table} recorded`);

    const show = await cluster.runCli(['--config', config, 'show', dirId]);
    assert.equal(show.code, 0, describeRun(show));
    assert.match(show.stdout, /format 3/, describeRun(show));
    assert.match(show.stdout, /\(directory, \d+ files\)/, describeRun(show));

    const custom = await manifest(customId);
    assert.equal(custom.formatVersion, 1, 'a manifest of custom dumps stays format 1, readable by older releases');
    for (const db of custom.databases) {
      assert.equal(db.format, undefined, 'no format field: custom, as older releases wrote it');
      assert.equal(db.files, undefined);
      assert.equal(db.file, `backups/${customId}/db/${db.name}.dump`);
    }
  });

  test('a directory dump restores with restore.jobs 3: every table equal, row by row', { timeout: 300_000 }, async () => {
    await resetTarget();
    const restored = await cluster.restore(dirId, jobs(1, 3));
    assert.deepEqual(compareFingerprints(source, await cluster.restoredFingerprints()), []);
    assert.ok(restored.checks.some((c) => /all counts equal the backup/.test(c)));
  });

  test('a directory dump restores with restore.jobs 1 too (pg_restore from the downloaded directory)', { timeout: 300_000 }, async () => {
    await resetTarget();
    await cluster.restore(dirId, jobs(1, 1));
    assert.deepEqual(compareFingerprints(source, await cluster.restoredFingerprints()), []);
  });

  test('a custom-format backup restores, streamed (jobs 1) and downloaded for pg_restore --jobs 2', { timeout: 300_000 }, async () => {
    for (const restoreJobs of [1, 2]) {
      await resetTarget();
      await cluster.restore(customId, jobs(1, restoreJobs));
      assert.deepEqual(compareFingerprints(source, await cluster.restoredFingerprints()), [], `restore.jobs ${restoreJobs}`);
    }
  });

  test('verify checks every file of a directory dump and names a missing or damaged one; restore refuses', { timeout: 300_000 }, async () => {
    await resetTarget();
    const ok = await cluster.runCli(['--config', config, '--json', 'verify', dirId]);
    assert.equal(ok.code, 0, describeRun(ok));
    assert.equal(ok.result?.ok, true);

    const db = (await manifest(dirId)).databases.find((d: { role: string }) => d.role === 'pachyderm');
    const parts = db.files.map((f: { file: string }) => f.file).filter((f: string) => /\d+\.dat\.gz$/.test(f));
    const [missing, damaged] = [parts[0] as string, parts[1] as string];
    const missingFile = join(cluster.repositoryDir!, missing);
    const damagedFile = join(cluster.repositoryDir!, damaged);
    const original = await readFile(damagedFile);
    await rename(missingFile, `${missingFile}.aside`);
    const flipped = Buffer.from(original);
    flipped[Math.floor(flipped.length / 2)]! ^= 0xff;
    await writeFile(damagedFile, flipped);
    try {
      const run = await cluster.runCli(['--config', config, 'verify', dirId]);
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stdout, /FAILED verification: 2 problem/, describeRun(run));
      assert.match(run.stdout, new RegExp(`${escape(missing).source}\\): missing`), describeRun(run));
      assert.match(run.stdout, new RegExp(`${escape(damaged).source}\\): checksum mismatch`), describeRun(run));

      const restore = await cluster.runCli(['--config', config, '--yes', 'restore', dirId], { timeoutMs: 120_000 });
      assert.equal(restore.code, EXIT_FAILED, describeRun(restore));
      assert.match(restore.stderr, escape(missing), describeRun(restore));
      assert.match(restore.stderr, /refused, nothing was changed/, describeRun(restore));
      assert.deepEqual(await cluster.targetDatabases(), [], 'no target database created');
      assert.deepEqual(await cluster.restoredKeys(), [], 'the target store is empty');
    } finally {
      await rename(`${missingFile}.aside`, missingFile);
      await writeFile(damagedFile, original);
    }
  });

  test('drill restores a directory dump and removes its scratch targets', { timeout: 300_000 }, async () => {
    await resetTarget();
    await mkdir(join(cluster.work, 'drill-scratch'), { recursive: true });
    const run = await cluster.runCli(['--config', config, '--json', 'drill', dirId]);
    assert.equal(run.code, 0, describeRun(run));
    assert.equal(run.result?.ok, true, describeRun(run));
    assert.equal(run.result?.cleanup.ok, true);
    assert.deepEqual(await cluster.targetDatabases(), []);
  });

  test('bad backup.dumpJobs / restore.jobs values are one clear config error', async () => {
    for (const [key, value] of [
      ['dumpJobs', 0],
      ['dumpJobs', 2.5],
      ['dumpJobs', 'three'],
      ['jobs', 0],
    ] as const) {
      const section = key === 'dumpJobs' ? 'backup' : 'restore';
      assert.throws(
        () => cluster.config((raw) => void (raw[section][key] = value)),
        (err: Error) => {
          assert.match(err.message, new RegExp(`${section}\\.${key}`), err.message);
          assert.equal(err.message.match(/\bjobs\b|dumpJobs/gi)?.length, 1, `one problem named: ${err.message}`);
          return true;
        },
        `${section}.${key}: ${JSON.stringify(value)}`,
      );
    }
    const bad = await cluster.writeConfig((raw) => void (raw.backup.dumpJobs = 0));
    const run = await cluster.runCli(['--config', bad, '--yes', 'backup']);
    assert.equal(run.code, EXIT_USAGE, describeRun(run));
    assert.match(run.stderr, /backup\.dumpJobs/, describeRun(run));
    assert.equal(run.stderr.trim().split('\n').filter((l) => l.includes('pachbackup: error')).length, 1, describeRun(run));
    assert.deepEqual((await cluster.sealedBackups()).sort(), [dirId, customId].sort(), 'nothing sealed');
    assert.equal(validateConfig(cluster.rawConfig(), 'default').backup.dumpJobs, 1, 'default 1');
  });

  test('a scratch directory too small for pg_dump: one clear error naming TMPDIR and dumpJobs, nothing sealed', { timeout: 300_000 }, async (t) => {
    // A 256 KiB tmpfs as $TMPDIR (needs root with mount rights; skipped elsewhere).
    const small = join(cluster.work, 'small-tmp');
    await mkdir(small);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', small], { stdio: 'ignore' });
    } catch {
      t.skip('cannot mount a small tmpfs here (not root, or no mount rights)');
      return;
    }
    try {
      const bad = await cluster.writeConfig((raw) => void (raw.backup.dumpJobs = 2));
      const run = await cluster.runCli(['--config', bad, '--yes', 'backup'], { env: { TMPDIR: small } });
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stderr, /backup\.dumpJobs > 1 dumps to .* free for databases of/, `preflight warned about the free space: ${describeRun(run)}`);
      assert.match(run.stderr, /pg_dump --format=directory of database \w+ into .* failed: .*No space left on device/s, describeRun(run));
      assert.match(run.stderr, /TMPDIR/, describeRun(run));
      assert.match(run.stderr, /backup\.dumpJobs: 1/, describeRun(run));
      assert.deepEqual((await cluster.sealedBackups()).sort(), [dirId, customId].sort(), 'nothing sealed');
      assert.deepEqual(await readdir(small), [], 'the scratch directory was removed');
    } finally {
      execFileSync('umount', [small], { stdio: 'ignore' });
    }
  });

  test('prune removes every file of a directory dump with its backup', { timeout: 300_000 }, async () => {
    const run = await cluster.runCli(['--config', config, '--yes', 'prune', '--keep-last', '1']);
    assert.equal(run.code, 0, describeRun(run));
    assert.deepEqual(await cluster.sealedBackups(), [customId]);
    const left: string[] = [];
    for await (const info of cluster.repositoryStore().list(`backups/${dirId}/`)) left.push(info.key);
    assert.deepEqual(left, [], 'no file of the directory-dump backup is left');
  });
});

test('an encrypted repository: the files of a directory dump are stored encrypted and restore with restore.jobs 2', { timeout: 300_000 }, async () => {
  const cluster = (await TestCluster.create({ kind: 'fs', chunks: 5 })) as TestCluster;
  const KEK = 'PB_PDUMP_TEST_KEK';
  process.env[KEK] = 'a parallel dump test passphrase';
  try {
    const encrypted = (raw: RawConfig): void => {
      raw.repository.encryption = { key: { env: KEK } };
      raw.backup.dumpJobs = 2;
      raw.restore.jobs = 2;
    };
    const source = await cluster.sourceFingerprints();
    const { id } = await cluster.backup(encrypted);
    const toc = await readFile(join(cluster.repositoryDir!, 'backups', id, 'db', 'pachyderm.dump.d', 'toc.dat'));
    assert.ok(!toc.subarray(0, 5).equals(Buffer.from('PGDMP')), 'toc.dat is not stored in the clear');
    await cluster.restore(id, encrypted);
    assert.deepEqual(compareFingerprints(source, await cluster.restoredFingerprints()), []);
  } finally {
    delete process.env[KEK];
    await cluster.cleanup();
  }
});
