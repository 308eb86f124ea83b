/**
 * Issue 4: pre-copy, online mode with proven completeness, resumable copies and server-side copy,
 * against real PostgreSQL 15 servers and real stores (filesystem and s3rver).
 */
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { readdir, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runBackup } from '../src/engine/backup.js';
import type { EngineEvent } from '../src/engine/events.js';
import { openRepository } from '../src/engine/context.js';
import { verifyBackup } from '../src/engine/verify.js';
import { addChunks } from '../src/demo/pachydermFixture.js';
import { REFERENCED_KEYS_SQL } from '../src/postgres/snapshot.js';
import type { PauseRecord, QuiesceEvents, QuiesceStrategy } from '../src/quiesce/strategy.js';
import { NoPause } from '../src/quiesce/none.js';
import { TestCluster, describeRun, withFaults } from './helpers/cluster.js';

/** A pause strategy that runs a hook inside pause(): writes that land after the pre-copy, before the pause. */
class HookPause implements QuiesceStrategy {
  readonly name = 'test-hook';
  readonly needsConfirmation = false;
  constructor(
    private readonly onPause: () => Promise<void>,
    private readonly onResume: () => Promise<void> = async () => undefined,
  ) {}
  async describeTarget(): Promise<string> {
    return 'a test hook';
  }
  async plan(): Promise<PauseRecord> {
    return { strategy: this.name, target: 'test', startedAt: new Date().toISOString(), state: {} };
  }
  async pause(record: PauseRecord, _events: QuiesceEvents): Promise<PauseRecord> {
    await this.onPause();
    return record;
  }
  async resume(): Promise<void> {
    await this.onResume();
  }
}

async function backupIndexKeys(cluster: TestCluster, id: string): Promise<Set<string>> {
  const repo = openRepository(cluster.config());
  await repo.open(false);
  const manifest = await repo.readManifest(id);
  return new Set((await repo.readIndex(manifest.objects.index)).map((e) => e.key));
}

async function referencedKeys(cluster: TestCluster, on: 'source' | 'target'): Promise<string[]> {
  const pg = on === 'source' ? cluster.source : cluster.target!;
  const { rows } = await pg.query<Record<string, string>>('pachyderm', REFERENCED_KEYS_SQL);
  return rows.map((r) => Object.values(r)[0]!);
}

describe('pre-copy and paused backups', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 40 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('objects written during the pre-copy are in the backup, objects written after the seal are not, and the restore is consistent', async () => {
    const events: EngineEvent[] = [];
    let duringPrecopy: string[] = [];
    let writing: Promise<void> | undefined;
    let beforePause: string[] = [];
    const config = cluster.config();
    const summary = await runBackup({
      config,
      strategy: new HookPause(async () => {
        await writing;
        beforePause = (await addChunks(cluster.source, cluster.clusterStore(), 5, { seed: 7 })).keys;
      }),
      emit: (e) => {
        events.push(e);
        // Writes that race the pre-copy: started as it starts.
        if (e.type === 'phase-start' && e.phase === 'precopy') {
          writing = addChunks(cluster.source, cluster.clusterStore(), 5, { seed: 5 }).then((r) => {
            duringPrecopy = r.keys;
          });
        }
      },
    });
    const afterSeal = (await addChunks(cluster.source, cluster.clusterStore(), 5, { seed: 9 })).keys;
    assert.equal(duringPrecopy.length, 5);
    const held = await backupIndexKeys(cluster, summary.id);
    for (const key of [...duringPrecopy, ...beforePause]) assert.ok(held.has(key), `${key} written before the pause is in the backup`);
    for (const key of afterSeal) assert.ok(!held.has(key), `${key} written after the seal is not in the backup`);
    assert.ok(summary.downtimeMs !== null && summary.downtimeMs >= 0);
    assert.ok(summary.objects.newCount >= 40, 'the pre-copy copied the initial objects');

    await cluster.restore(summary.id);
    const restoredKeys = new Set(await cluster.restoredKeys());
    const referenced = await referencedKeys(cluster, 'target');
    assert.equal(referenced.length, 40 + 10, 'the restored database references the objects written before the pause');
    for (const key of referenced) assert.ok(restoredKeys.has(key), `restored bucket holds referenced ${key}`);
  });

  test('a bucket that lacks the referenced objects (a wrong bucket or prefix): the downtime budget still stops the backup, which resumes at once', async () => {
    const chunks = join(cluster.dirs!.cluster, 'chunk');
    let resumedAt = 0;
    let pausedAt = 0;
    const started = Date.now();
    const sealedBefore = await cluster.sealedBackups();
    await assert.rejects(
      // Every referenced key is then looked up one by one, each lookup slowed down: over 15 s in all.
      withFaults([{ store: 'cluster.objectStore', op: 'stat', kind: 'delay', ms: 300 }], () =>
        runBackup({
          config: cluster.config((raw) => {
            raw.backup.precopy = false;
            raw.pause.maxDowntimeSeconds = 2;
            raw.pause.quiescence = { settleSeconds: 0 };
          }),
          strategy: new HookPause(
            async () => {
              pausedAt = Date.now();
              // The objects vanish from the bucket the backup reads while paused.
              await rename(chunks, `${chunks}.away`);
            },
            async () => {
              resumedAt = Date.now();
              await rename(`${chunks}.away`, chunks);
            },
          ),
          emit: () => undefined,
        }),
      ),
      (err: Error) => /downtime budget of 2s/.test(err.message),
    );
    assert.ok(pausedAt > started && resumedAt > 0, 'paused, then resumed');
    assert.ok(resumedAt - pausedAt < 5000, `resumed ${resumedAt - pausedAt} ms after the pause, within the 2 s budget and a lookup or two`);
    assert.deepEqual(await cluster.sealedBackups(), sealedBefore);

    // Without a budget: once ten are known missing, the others are counted without a lookup each
    // (an eleventh lookup of the cluster bucket would fail the backup with an injected fault).
    await assert.rejects(
      withFaults([{ store: 'cluster.objectStore', op: 'stat', after: 10, kind: 'permanent' }], () =>
        runBackup({
          config: cluster.config((raw) => {
            raw.backup.precopy = false;
            raw.pause.quiescence = { settleSeconds: 0 };
          }),
          strategy: new HookPause(
            async () => rename(chunks, `${chunks}.away`),
            async () => rename(`${chunks}.away`, chunks),
          ),
          emit: () => undefined,
        }),
      ),
      // Only the ten looked up are said to be missing from the bucket; the others were missing from its listing.
      (err: Error) => /^\d+ object\(s\) the pachyderm database references are not in the backup, so it would not restore: the first 10 are not in the bucket \(chunk\/.*\), the other \d+ were not in its listing/.test(err.message) && /check that cluster\.objectStore/.test(err.message),
    );
  });
});

describe('the dump after the resume', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 20 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('rows and objects written after the resume, while pg_dump reads the snapshot, are not in the backup; the restore matches the paused state', async () => {
    const phases: string[] = [];
    let atPause: string[] = [];
    let afterResume: string[] = [];
    const summary = await runBackup({
      config: cluster.config(),
      strategy: new HookPause(
        async () => {
          atPause = await referencedKeys(cluster, 'source');
        },
        async () => {
          // The cluster runs again before pg_dump starts: these commits are newer than the snapshot.
          afterResume = (await addChunks(cluster.source, cluster.clusterStore(), 6, { seed: 11 })).keys;
        },
      ),
      emit: (e) => {
        if (e.type === 'phase-start') phases.push(e.phase);
      },
    });
    assert.ok(phases.indexOf('resume') < phases.indexOf('dump'), `the dump runs after the resume: ${phases.join(',')}`);
    assert.equal(afterResume.length, 6);
    assert.ok(summary.downtimeMs !== null && summary.downtimeMs < summary.totalMs);
    const dumpMs = summary.phases.find((p) => p.name === 'dump')!.ms;
    assert.ok(summary.downtimeMs! + dumpMs <= summary.totalMs, 'the dump is not inside the pause');

    await cluster.restore(summary.id);
    const restoredReferenced = await referencedKeys(cluster, 'target');
    assert.deepEqual(restoredReferenced, atPause, 'the restored database is the database as it was paused');
    for (const key of afterResume) assert.ok(!restoredReferenced.includes(key), `${key}, committed after the resume, is not in the dump`);
    const restoredKeys = new Set(await cluster.restoredKeys());
    for (const key of restoredReferenced) assert.ok(restoredKeys.has(key), `restored bucket holds referenced ${key}`);
    // Row counts recorded in the manifest were counted in the snapshot, and the restored tables match them.
    const repo = openRepository(cluster.config());
    await repo.open(false);
    const manifest = await repo.readManifest(summary.id);
    const pachyderm = manifest.databases.find((d) => d.role === 'pachyderm')!;
    for (const t of pachyderm.tables) {
      const { rows } = await cluster.target!.query<{ n: string }>('pachyderm', `SELECT count(*) AS n FROM "${t.schema}"."${t.table}"`);
      assert.equal(Number(rows[0]!.n), t.rows, `${t.schema}.${t.table} restored with the snapshot's row count`);
    }
  });
});

describe('online mode', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 60 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('a writer inserting rows and objects the Pachyderm way during the backup: the restore holds every referenced object', async () => {
    let stop = false;
    let written = 0;
    const writer = (async () => {
      for (let round = 0; !stop && round < 200; round++) {
        written += (await addChunks(cluster.source, cluster.clusterStore(), 3, { seed: 100 + round })).keys.length;
      }
    })();
    let summary;
    try {
      summary = await runBackup({ config: cluster.config((raw) => (raw.backup.mode = 'online')), strategy: new NoPause(), emit: () => undefined });
    } finally {
      stop = true;
      await writer;
    }
    assert.equal(summary.mode, 'online');
    assert.equal(summary.downtimeMs, null);
    assert.ok(written > 0, 'the writer wrote during the backup');
    const repo = openRepository(cluster.config());
    await repo.open(false);
    const report = await verifyBackup({ repo, manifest: await repo.readManifest(summary.id), emit: () => undefined, concurrency: 4 });
    assert.deepEqual(report.problems, []);

    await cluster.restore(summary.id);
    const restoredKeys = new Set(await cluster.restoredKeys());
    const referenced = await referencedKeys(cluster, 'target');
    assert.ok(referenced.length >= 60);
    for (const key of referenced) assert.ok(restoredKeys.has(key), `restored bucket holds referenced ${key}`);
  });

  // Pachyderm's garbage collector deletes unreferenced chunks while the cluster runs, and pachd
  // writes and deletes a test/<uuid> object at start-up: objects listed, then gone before their copy.
  for (const mode of ['online', 'paused'] as const) {
    test(`${mode}: unreferenced objects deleted between the listing and their copy are left out; the backup seals and verifies`, async () => {
      const gone = ['chunk/' + 'e'.repeat(64) + '.00000000000fffff', 'test/6f1c0d3e-8a7b-4c2d-9e1f-0a1b2c3d4e5f'];
      for (const key of gone) await cluster.clusterStore().put(key, Buffer.alloc(512, 7));
      const events: EngineEvent[] = [];
      const summary = await runBackup({
        config: cluster.config((raw) => (raw.backup.mode = mode)),
        strategy: mode === 'online' ? new NoPause() : new HookPause(async () => undefined),
        emit: (e) => {
          events.push(e);
          // Listed in preflight; deleted (synchronously) before the pre-copy copies anything.
          if (e.type === 'phase-start' && e.phase === 'precopy') for (const key of gone) rmSync(join(cluster.dirs!.cluster, key));
        },
      });
      const held = await backupIndexKeys(cluster, summary.id);
      for (const key of gone) assert.ok(!held.has(key), `${key}, gone before its copy, is not in the index`);
      for (const key of await referencedKeys(cluster, 'source')) assert.ok(held.has(key), `referenced ${key} is held`);
      assert.ok(events.some((e) => e.type === 'warning' && /2 object\(s\) listed in the cluster bucket were deleted before they were copied/.test(e.message)), 'the operator is told');
      const repo = openRepository(cluster.config());
      await repo.open(false);
      const report = await verifyBackup({ repo, manifest: await repo.readManifest(summary.id), emit: () => undefined, concurrency: 4 });
      assert.deepEqual(report.problems, []);
    });
  }

  test("the backup role's idle_in_transaction_session_timeout (shorter than the copy) does not end the exported snapshot before pg_dump reads it", async () => {
    // A common server or role setting; the snapshot's session waits idle in its transaction while
    // the copy phase runs, as pg_dump's own sessions do while it works (pg_dump turns it off).
    const role = cluster.source.user;
    await cluster.source.query('postgres', `ALTER ROLE "${role}" SET idle_in_transaction_session_timeout = '1s'`);
    try {
      // The copy phase's listing (the second of the cluster bucket) takes longer than the timeout.
      const summary = await withFaults([{ store: 'cluster.objectStore', op: 'list', after: 1, limit: 1, kind: 'delay', ms: 2500 }], () =>
        runBackup({ config: cluster.config((raw) => (raw.backup.mode = 'online')), strategy: new NoPause(), emit: () => undefined }),
      );
      const repo = openRepository(cluster.config());
      await repo.open(false);
      const report = await verifyBackup({ repo, manifest: await repo.readManifest(summary.id), emit: () => undefined, concurrency: 4 });
      assert.deepEqual(report.problems, []);
    } finally {
      await cluster.source.query('postgres', `ALTER ROLE "${role}" RESET idle_in_transaction_session_timeout`);
    }
  });

  test('a referenced object deleted from the bucket before it is copied: not sealed, the key named', async () => {
    const keys = await referencedKeys(cluster, 'source');
    const victim = keys[keys.length - 1]!;
    // Simulates a garbage collector deleting a chunk the snapshot still references.
    await cluster.clusterStore().remove([victim]);
    const before = await cluster.sealedBackups();
    await assert.rejects(
      runBackup({ config: cluster.config((raw) => (raw.backup.mode = 'online')), strategy: new NoPause(), emit: () => undefined }),
      (err: Error) => err.message.includes(victim) && /not sealed|Nothing was sealed/i.test(err.message),
    );
    assert.deepEqual(await cluster.sealedBackups(), before, 'no new sealed backup');
  });
});

describe('resumable copies', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 300, chunkSize: 1024 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('kill -9 during the object copy, then backup again: only the remainder is copied, and the result verifies', async () => {
    const configFile = await cluster.writeConfig((raw) => {
      raw.backup.concurrency = 2;
    });
    // Slow every read so the copy is still running when the process is killed.
    const faults = JSON.stringify([{ store: 'cluster.objectStore', op: 'get', kind: 'delay', ms: 40 }]);
    const run = cluster.spawnCli(['--config', configFile, '--json', '--yes', 'backup'], { env: { PACHBACKUP_FAULTS: faults } });
    const repoDir = cluster.dirs!.repository;
    const journaled = async (): Promise<number> => {
      let n = 0;
      try {
        for (const id of await readdir(join(repoDir, 'backups'))) {
          n += (await readdir(join(repoDir, 'backups', id, 'journal')).catch(() => [])).length;
        }
      } catch {
        // not created yet
      }
      return n;
    };
    const deadline = Date.now() + 120_000;
    while ((await journaled()) < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    run.child.kill('SIGKILL');
    const killed = await run.done;
    assert.equal(killed.signal, 'SIGKILL', describeRun(killed));
    assert.deepEqual(await cluster.sealedBackups(), [], 'the killed backup is not sealed');
    const copiedBefore = await cluster.repositoryObjectCount();
    assert.ok(copiedBefore > 0 && copiedBefore < 300, `killed mid-copy (${copiedBefore} of 300 copied)`);
    // Objects the killed run copied and journaled (checked, with their checksums).
    const repo = openRepository(cluster.config());
    await repo.open(false);
    const { incomplete } = await repo.listBackups();
    let journaledEntries = 0;
    for (const b of incomplete) for await (const _ of repo.streamJournals(b.id)) journaledEntries++;
    assert.ok(journaledEntries > 0);

    const second = await cluster.runCli(['--config', configFile, '--json', '--yes', 'backup']);
    assert.equal(second.code, 0, describeRun(second));
    const summary = second.result!;
    assert.equal(summary.objects.count, 300);
    assert.equal(summary.objects.newCount, 300 - journaledEntries, 'exactly the objects not journaled as copied are copied again');
    const verify = await cluster.runCli(['--config', configFile, '--json', 'verify', summary.id]);
    assert.equal(verify.code, 0, describeRun(verify));
  });
});

describe('server-side copy', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 's3rver', chunks: 25 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('the bucket and the repository on one S3 service: objects copied server-side, shown in the summary, and the backup verifies', async () => {
    const summary = await cluster.backup();
    assert.equal(summary.copyPath, 'server-side');
    assert.equal(summary.objects.newCount, 25);
    const repo = openRepository(cluster.config());
    await repo.open(false);
    const report = await verifyBackup({ repo, manifest: await repo.readManifest(summary.id), emit: () => undefined, concurrency: 4 });
    assert.deepEqual(report.problems, []);
    await cluster.restore(summary.id);
    const before = await cluster.sourceFingerprints();
    const after = await cluster.restoredFingerprints();
    assert.deepEqual([...after.objects], [...before.objects]);
  });
});
