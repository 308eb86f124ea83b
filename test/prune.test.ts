/**
 * Prune against repositories of dated backups built directly (Repository + sealManifest): each
 * retention policy keeps the right backups, every kept backup still verifies, objects shared with
 * kept backups survive, and the bytes reported freed are the bytes gone. Then kill -9 inside prune
 * (the CLI in a child process, PACHBACKUP_CRASH_AT) at several points: every remaining backup
 * verifies and a second prune completes.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { applyRetention, parseDuration, runPrune, type PruneReport, type RetentionPolicy } from '../src/engine/prune.js';
import type { EngineEvent } from '../src/engine/events.js';
import { verifyBackup } from '../src/engine/verify.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { StoreError, type ObjectStore } from '../src/objectstore/store.js';
import { listLocks } from '../src/repository/lock.js';
import { MANIFEST_FORMAT_VERSION, sealManifest } from '../src/repository/manifest.js';
import { layout, newBackupId, Repository, type IndexEntry } from '../src/repository/repository.js';
import { withTempDir } from './helpers/servers.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'src', 'cli', 'main.js');

/**
 * Fourteen backups over two months (12 five days apart, two more on the last day, one in the same
 * hour as the other), named b0..b13 oldest first. Backup i holds objects 2i..2i+11, so each object
 * is shared by up to six neighbouring backups.
 */
const TIMES = [
  '2025-01-05T02:00:00Z', // b0  Sun, ISO week 2025-W01
  '2025-01-10T02:00:00Z', // b1  Fri, W02
  '2025-01-15T02:00:00Z', // b2  Wed, W03
  '2025-01-20T02:00:00Z', // b3  Mon, W04
  '2025-01-25T02:00:00Z', // b4  Sat, W04
  '2025-01-30T02:00:00Z', // b5  Thu, W05
  '2025-02-04T02:00:00Z', // b6  Tue, W06
  '2025-02-09T02:00:00Z', // b7  Sun, W06
  '2025-02-14T02:00:00Z', // b8  Fri, W07
  '2025-02-19T02:00:00Z', // b9  Wed, W08
  '2025-02-24T02:00:00Z', // b10 Mon, W09
  '2025-03-01T02:00:00Z', // b11 Sat, W09
  '2025-03-01T10:00:00Z', // b12 same day
  '2025-03-01T10:40:00Z', // b13 same hour as b12
];
const WINDOW = 12;
const objectKey = (n: number) => `chunk/${createHash('sha256').update(`object ${n}`).digest('hex').slice(0, 32)}.${String(n).padStart(16, '0')}`;
const objectBytes = (n: number) => Buffer.from(`object ${n} `.repeat(20 + n * 3));
const windowOf = (i: number) => Array.from({ length: WINDOW }, (_, k) => 2 * i + k);

/** Expected survivors per policy, as b-indexes; worked out by hand from TIMES. */
const POLICIES: Array<{ name: string; policy: RetentionPolicy; cli: string[]; keep: number[] }> = [
  { name: 'keep-last 3', policy: { last: 3 }, cli: ['--keep-last', '3'], keep: [11, 12, 13] },
  { name: 'keep-hourly 3', policy: { hourly: 3 }, cli: ['--keep-hourly', '3'], keep: [10, 11, 13] },
  { name: 'keep-daily 4', policy: { daily: 4 }, cli: ['--keep-daily', '4'], keep: [8, 9, 10, 13] },
  { name: 'keep-weekly 3', policy: { weekly: 3 }, cli: ['--keep-weekly', '3'], keep: [8, 9, 13] },
  { name: 'keep-monthly 2', policy: { monthly: 2 }, cli: ['--keep-monthly', '2'], keep: [10, 13] },
  { name: 'keep-within 10d', policy: { within: parseDuration('10d') }, cli: ['--keep-within', '10d'], keep: [10, 11, 12, 13] },
  { name: 'keep-last 2 and keep-monthly 3', policy: { last: 2, monthly: 3 }, cli: ['--keep-last', '2', '--keep-monthly', '3'], keep: [5, 10, 12, 13] },
];

interface Fixture {
  dir: string;
  store: ObjectStore;
  repo: Repository;
  /** Sealed backup ids, b0..b13. */
  ids: string[];
  /** An incomplete backup three days old (past the 24h grace) and one an hour old. */
  oldIncomplete: string;
  youngIncomplete: string;
  oldIncompleteObject: string;
  youngIncompleteObject: string;
  orphanObject: string;
  config: string;
}

async function putObject(repo: Repository, n: number): Promise<IndexEntry> {
  const data = objectBytes(n);
  const key = objectKey(n);
  if (!(await repo.store.stat(layout.object(key)))) await repo.writeBuffer(layout.object(key), data);
  return { key, size: data.length, checksum: createHash('sha256').update(data).digest('hex') };
}

async function addSealedBackup(repo: Repository, startedAt: string, objects: number[]): Promise<string> {
  const id = newBackupId(new Date(startedAt));
  const entries: IndexEntry[] = [];
  for (const n of objects) entries.push(await putObject(repo, n));
  entries.sort((a, b) => a.key.localeCompare(b.key));
  const dump = await repo.writeBuffer(layout.dump(id, 'pachyderm'), Buffer.from(`PGDMP fake dump of ${id}\n`.repeat(50)));
  const index = await repo.writeIndex(layout.index(id), entries);
  const referenced = await repo.writeReferenced(id, entries.map((e) => e.key));
  await repo.seal(
    sealManifest({
      format: 'pachbackup-manifest',
      formatVersion: MANIFEST_FORMAT_VERSION,
      id,
      repositoryId: repo.id,
      toolVersion: 'test',
      mode: 'online',
      startedAt: new Date(startedAt).toISOString(),
      finishedAt: new Date(Date.parse(startedAt) + 60_000).toISOString(),
      source: { postgres: { host: 'db', port: 5432, user: 'pachyderm', sslmode: 'disable' }, objectStore: 'file:///bucket' },
      databases: [{ ...dump, role: 'pachyderm', name: 'pachyderm', serverVersion: '16.4', pgDumpVersion: '16.4', tables: [] }],
      objects: { index, count: entries.length, bytes: entries.reduce((s, e) => s + e.size, 0), newCount: 0, newBytes: 0, copyPath: 'none' },
      referenced,
      helmValues: null,
      pause: null,
      phases: [],
    }),
  );
  return id;
}

/** An unsealed backup: a dump and one journal naming object `n`, as a crashed backup leaves. */
async function addIncompleteBackup(repo: Repository, startedAt: Date, n: number): Promise<string> {
  const id = newBackupId(startedAt);
  const entry = await putObject(repo, n);
  await repo.writeBuffer(layout.dump(id, 'pachyderm'), Buffer.from('PGDMP partial'));
  await repo.writeBuffer(layout.journal(id, 0), gzipSync(Buffer.from(`${JSON.stringify([entry.key, entry.size, entry.checksum])}\n`)));
  return id;
}

async function buildFixture(dir: string): Promise<Fixture> {
  const repoDir = join(dir, 'repo');
  const store = new FsObjectStore(repoDir);
  const repo = new Repository(store);
  await repo.open(true);
  const ids: string[] = [];
  for (const [i, time] of TIMES.entries()) ids.push(await addSealedBackup(repo, time, windowOf(i)));
  const now = Date.now();
  const oldIncomplete = await addIncompleteBackup(repo, new Date(now - 3 * 86_400_000), 100);
  const youngIncomplete = await addIncompleteBackup(repo, new Date(now - 3_600_000), 101);
  await putObject(repo, 102); // in no index or journal: an orphan
  const config = join(dir, 'pachbackup.yaml');
  await writeFile(config, `cluster:\n  postgres: {user: pachyderm}\n  objectStore: {url: "file://${join(dir, 'bucket')}"}\nrepository: {url: "file://${repoDir}"}\n`);
  return {
    dir,
    store,
    repo,
    ids,
    oldIncomplete,
    youngIncomplete,
    oldIncompleteObject: objectKey(100),
    youngIncompleteObject: objectKey(101),
    orphanObject: objectKey(102),
    config,
  };
}

async function snapshot(store: ObjectStore): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for await (const info of store.list()) out.set(info.key, info.size);
  return out;
}

const total = (files: Map<string, number>) => [...files.values()].reduce((s, n) => s + n, 0);
const objectsIn = (files: Map<string, number>) => [...files.keys()].filter((k) => k.startsWith(layout.objectsPrefix)).map((k) => k.slice(layout.objectsPrefix.length));

/** Every sealed backup verifies; returns their ids. */
async function verifyAll(repo: Repository): Promise<string[]> {
  const listing = await repo.listBackups();
  assert.deepEqual(listing.damaged, [], 'no damaged backups');
  for (const manifest of listing.sealed) {
    const report = await verifyBackup({ repo, manifest, emit: () => undefined, concurrency: 8 });
    assert.ok(report.ok, `backup ${manifest.id} verifies: ${JSON.stringify(report.problems)}`);
  }
  return listing.sealed.map((m) => m.id);
}

/** Checks the repository after a completed prune keeping `keep` (b-indexes). */
async function assertPrunedTo(f: Fixture, keep: number[]): Promise<void> {
  const remaining = await verifyAll(f.repo);
  assert.deepEqual(remaining, keep.map((i) => f.ids[i]), 'the sealed backups left are exactly those the policy keeps');
  const files = await snapshot(f.store);
  const expectedObjects = new Set([...keep.flatMap(windowOf).map(objectKey), f.youngIncompleteObject]);
  assert.deepEqual(new Set(objectsIn(files)), expectedObjects, 'objects left: exactly those of kept backups and of the young incomplete backup');
  const backupDirs = new Set([...files.keys()].filter((k) => k.startsWith('backups/')).map((k) => k.split('/')[1]));
  assert.deepEqual(backupDirs, new Set([...keep.map((i) => f.ids[i]), f.youngIncomplete]), 'no files of removed backups remain');
  assert.deepEqual(await listLocks(f.store), [], 'the prune lock was released');
}

describe('retention policies (restic semantics, UTC)', () => {
  test('applyRetention keeps what each policy should, with reasons', () => {
    const backups = TIMES.map((t, i) => ({ id: `b${i}`, time: new Date(t) }));
    for (const { name, policy, keep } of POLICIES) {
      const kept = applyRetention(backups, policy).filter((d) => d.keep).map((d) => Number(d.id.slice(1))).sort((a, b) => a - b);
      assert.deepEqual(kept, keep, name);
    }
    const reasons = applyRetention(backups, { last: 1, daily: 2, within: parseDuration('36h') });
    assert.deepEqual(reasons[0]?.reasons, ['last', 'daily', 'within 36h']);
    assert.deepEqual(reasons.find((d) => d.id === 'b10')?.reasons, ['daily']);
  });

  test('durations', () => {
    assert.equal(parseDuration('7d').ms, 7 * 86_400_000);
    assert.equal(parseDuration('36h').ms, 36 * 3_600_000);
    assert.equal(parseDuration('2w').ms, 14 * 86_400_000);
    assert.equal(parseDuration('1d12h').ms, 36 * 3_600_000);
    assert.throws(() => parseDuration('7 days'), /not a duration/);
    assert.throws(() => parseDuration('0d'), /zero/);
  });
});

describe('prune of a repository of dated backups', () => {
  for (const { name, policy, keep } of POLICIES) {
    test(`${name}: keeps the right backups, shared objects survive, every kept backup verifies, freed bytes are the bytes gone`, async () => {
      await withTempDir(async (dir) => {
        const f = await buildFixture(dir);
        const before = await snapshot(f.store);
        const dry = await runPrune({ repo: new Repository(f.store), policy, grace: parseDuration('24h'), dryRun: true, emit: () => undefined });
        assert.deepEqual(await snapshot(f.store), before, 'a dry run changes nothing');

        const events: EngineEvent[] = [];
        const report = await runPrune({ repo: new Repository(f.store), policy, grace: parseDuration('24h'), dryRun: false, emit: (e) => events.push(e) });
        const after = await snapshot(f.store);

        const removedIndexes = TIMES.map((_, i) => i).filter((i) => !keep.includes(i));
        assert.deepEqual(report.kept.map((k) => k.id).sort(), keep.map((i) => f.ids[i]));
        assert.deepEqual(report.removed.map((r) => r.id).sort(), removedIndexes.map((i) => f.ids[i]));
        assert.deepEqual(report.incomplete.removed.map((r) => r.id), [f.oldIncomplete]);
        assert.deepEqual(report.incomplete.kept.map((r) => r.id), [f.youngIncomplete]);
        await assertPrunedTo(f, keep);

        // The report says exactly what went.
        const gone = [...before.keys()].filter((k) => !after.has(k));
        assert.equal(report.bytesFreed, total(before) - total(after), 'bytes freed as reported = bytes gone');
        assert.equal(report.objects.removed, gone.filter((k) => k.startsWith('objects/')).length);
        assert.equal(report.objects.removedBytes, gone.filter((k) => k.startsWith('objects/')).reduce((s, k) => s + before.get(k)!, 0));
        assert.ok(gone.includes(layout.object(f.orphanObject)) && gone.includes(layout.object(f.oldIncompleteObject)), 'orphans and objects of old incomplete backups are swept');
        for (const r of report.removed) assert.equal(r.bytes, gone.filter((k) => k.startsWith(`backups/${r.id}/`)).reduce((s, k) => s + before.get(k)!, 0));

        // The dry run predicted exactly this.
        const comparable = (r: PruneReport) => ({ ...r, dryRun: undefined, ms: undefined, lockId: undefined });
        assert.deepEqual(comparable(dry), comparable(report));
        assert.ok(events.some((e) => e.type === 'phase-end' && e.phase === 'prune' && e.ok));
      });
    });
  }

  test('refuses a prune without a keep option, deleting nothing', async () => {
    await withTempDir(async (dir) => {
      const f = await buildFixture(dir);
      const before = await snapshot(f.store);
      await assert.rejects(runPrune({ repo: f.repo, policy: {}, grace: parseDuration('24h'), dryRun: false, emit: () => undefined }), /without a keep option.*delete every backup/);
      const cli = spawnSync(process.execPath, [CLI, '-c', f.config, 'prune'], { encoding: 'utf8' });
      assert.equal(cli.status, 2, cli.stderr);
      assert.match(cli.stderr, /at least one keep option/);
      assert.deepEqual(await snapshot(f.store), before);
    });
  });

  test('is refused while a backup holds the repository, naming it', async () => {
    await withTempDir(async (dir) => {
      const f = await buildFixture(dir);
      const { acquireLock } = await import('../src/repository/lock.js');
      const backup = await acquireLock(f.store, 'backup', { command: 'pachbackup backup --yes' });
      try {
        await assert.rejects(runPrune({ repo: f.repo, policy: { last: 1 }, grace: parseDuration('24h'), dryRun: false, emit: () => undefined }), /locked.*pachbackup backup --yes/);
        assert.equal((await f.repo.listBackups()).sealed.length, TIMES.length);
      } finally {
        await backup.release();
      }
    });
  });

  test('the CLI: --dry-run lists what would go and the bytes, --json gives the report', async () => {
    await withTempDir(async (dir) => {
      const f = await buildFixture(dir);
      const before = await snapshot(f.store);
      const human = spawnSync(process.execPath, [CLI, '-c', f.config, 'prune', '--keep-last', '3', '--dry-run'], { encoding: 'utf8' });
      assert.equal(human.status, 0, human.stderr);
      assert.match(human.stdout, /dry run: nothing was changed/);
      assert.match(human.stdout, new RegExp(`would remove 11 backup\\(s\\):[\\s\\S]*${f.ids[0]}`));
      assert.match(human.stdout, /would free .* \(\d+ bytes\)/);
      const json = spawnSync(process.execPath, [CLI, '-c', f.config, '--json', 'prune', '--keep-last', '3', '--dry-run'], { encoding: 'utf8' });
      const result = json.stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string } & Partial<PruneReport>).find((l) => l.type === 'result');
      assert.equal(result?.removed?.length, 11);
      assert.ok(result?.bytesFreed && result.bytesFreed > 0);
      assert.deepEqual(await snapshot(f.store), before);
    });
  });
});

/** The store, but every GET of a key under `failing` prefixes fails as S3 does under a SlowDown storm (after its retries). */
function throttled(store: ObjectStore, failing: string[]): ObjectStore & { storm: boolean } {
  const wrapper = {
    storm: true,
    description: store.description,
    list: (prefix?: string) => store.list(prefix),
    stat: (key: string) => store.stat(key),
    get: (key: string, signal?: AbortSignal) =>
      wrapper.storm && failing.some((p) => key.startsWith(p)) ? Promise.reject(new StoreError(`GET ${key}: HTTP 503 SlowDown: Please reduce your request rate`, true, { code: 'SlowDown' })) : store.get(key, signal),
    put: (...args: Parameters<ObjectStore['put']>) => store.put(...args),
    remove: (keys: string[]) => store.remove(keys),
    check: () => store.check(),
  };
  return wrapper;
}

describe('backups prune cannot read', () => {
  test('a backup whose manifest and index cannot be read (a throttled prefix) is kept by prune with every object it names', async () => {
    await withTempDir(async (dir) => {
      const f = await buildFixture(dir);
      const b5 = f.ids[5]!;
      const store = throttled(f.store, [layout.backupPrefix(b5)]);
      const events: EngineEvent[] = [];
      const report = await runPrune({ repo: new Repository(store), policy: { last: 3 }, grace: parseDuration('24h'), dryRun: false, emit: (e) => events.push(e) }).catch((err: Error) => err);
      // Refusing (nothing deleted) would keep the promise too; deleting b5's objects does not.
      if (!(report instanceof Error)) assert.deepEqual(report.damaged.map((d) => d.id), [b5], 'prune saw b5 as damaged and promised to keep it and its objects');
      store.storm = false;
      const listing = await f.repo.listBackups();
      assert.ok(listing.sealed.some((m) => m.id === b5), 'b5 is a sealed backup again once its prefix is readable');
      const manifest = listing.sealed.find((m) => m.id === b5)!;
      const verified = await verifyBackup({ repo: f.repo, manifest, emit: () => undefined, concurrency: 8 });
      assert.ok(verified.ok, `backup b5 still verifies after prune: ${JSON.stringify(verified.problems).slice(0, 400)}`);
    });
  });
});

describe('kill -9 inside prune', () => {
  const policy = POLICIES.find((p) => p.name === 'keep-monthly 2')!;
  for (const point of ['after-manifests-deleted', 'mid-backup-files', 'mid-sweep']) {
    test(`at ${point}: every remaining backup verifies, and a second prune completes`, async () => {
      await withTempDir(async (dir) => {
        const f = await buildFixture(dir);
        const before = await snapshot(f.store);
        const crashed = spawnSync(process.execPath, [CLI, '-c', f.config, 'prune', ...policy.cli], { encoding: 'utf8', env: { ...process.env, PACHBACKUP_CRASH_AT: point } });
        assert.equal(crashed.signal, 'SIGKILL', `prune was killed at ${point}: ${crashed.stderr}`);
        const during = await snapshot(f.store);
        assert.ok(total(during) < total(before), 'the crash came after something was deleted');

        // Every backup still listed as complete verifies; the kept ones are all there.
        const remaining = await verifyAll(f.repo);
        for (const i of policy.keep) assert.ok(remaining.includes(f.ids[i]!), `kept backup b${i} survived the crash`);
        assert.equal((await listLocks(f.store)).length, 1, 'the killed prune left its lock behind');

        const second = spawnSync(process.execPath, [CLI, '-c', f.config, '--json', 'prune', ...policy.cli], { encoding: 'utf8' });
        assert.equal(second.status, 0, second.stdout + second.stderr);
        const lines = second.stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string; message?: string });
        assert.ok(lines.some((l) => l.type === 'warning' && /took over stale exclusive lock .*no longer runs/.test(l.message ?? '')), 'the dead prune\'s lock is taken over, with a warning');
        await assertPrunedTo(f, policy.keep);
      });
    });
  }
});
