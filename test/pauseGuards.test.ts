/**
 * Issue 3 refusals at the engine and CLI level: no terminal and no --yes, the downtime budget,
 * a wrong expectedContext, and a quiescence failure; each resumes what it paused and seals nothing.
 * Real PostgreSQL 15 servers and a filesystem store; the pause is a command that writes a marker.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { mkdtemp, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { openRepository } from '../src/engine/context.js';
import { LEDGER_KEY, PauseLedger } from '../src/quiesce/ledger.js';
import { TestCluster, describeRun } from './helpers/cluster.js';

describe('pause guards', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 30, target: false })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('no terminal and no --yes: refused before anything is paused', async () => {
    const config = await cluster.writeConfig();
    const before = await cluster.markerLines();
    const run = await cluster.runCli(['--config', config, 'backup']);
    assert.equal(run.code, 1, describeRun(run));
    assert.match(run.stderr, /no terminal/);
    assert.match(run.stderr, /--yes/);
    assert.deepEqual(await cluster.markerLines(), before, 'nothing was paused');
    assert.deepEqual(await cluster.sealedBackups(), []);
  });

  test('a wrong expectedContext: refused before anything is paused', async () => {
    const config = await cluster.writeConfig((raw) => {
      raw.pause.expectedContext = 'prod-eu';
    });
    const before = await cluster.markerLines();
    const run = await cluster.runCli(['--config', config, '--yes', 'backup']);
    assert.equal(run.code, 1, describeRun(run));
    assert.match(run.stderr, /prod-eu/);
    assert.deepEqual(await cluster.markerLines(), before, 'nothing was paused');
    assert.deepEqual(await cluster.sealedBackups(), []);
  });

  test('the downtime budget exceeded: stopped, resumed, nothing sealed', async () => {
    const config = await cluster.writeConfig((raw) => {
      raw.backup.concurrency = 1;
      raw.pause.quiescence = { settleSeconds: 0 };
    });
    // Without pre-copy every object is copied while paused, each read slowed down: far over 2 s.
    const faults = JSON.stringify([{ store: 'cluster.objectStore', op: 'get', kind: 'delay', ms: 300 }]);
    const before = (await cluster.markerLines()).length;
    const run = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy', '--max-downtime', '2'], { env: { PACHBACKUP_FAULTS: faults } });
    assert.equal(run.code, 1, describeRun(run));
    assert.match(run.stderr, /downtime budget of 2s/);
    assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed']);
    assert.deepEqual(await cluster.sealedBackups(), []);
  });

  test('a client still connected to the pachyderm database after the pause: resumed, nothing sealed, the client named', async () => {
    const writer = new pg.Client({ host: cluster.source.host, port: cluster.source.port, user: cluster.source.user, password: cluster.source.password, database: 'pachyderm', application_name: 'still-writing-pachd' });
    writer.on('error', () => undefined);
    await writer.connect();
    // An active session: what a pachd that did not stop looks like to the check.
    const busy = writer.query('SELECT pg_sleep(60)').catch(() => undefined);
    try {
      const before = (await cluster.markerLines()).length;
      await assert.rejects(cluster.backup((raw) => (raw.pause.quiescence = { settleSeconds: 0.2 })), (err: Error) => /not quiet/.test(err.message) && /still-writing-pachd/.test(err.message));
      assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed']);
      assert.deepEqual(await cluster.sealedBackups(), []);
    } finally {
      await cluster.source.query('postgres', "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'still-writing-pachd'");
      await busy;
      await writer.end();
    }
  });

  test('with the cluster quiet, the same backup succeeds', async () => {
    const summary = await cluster.backup();
    assert.ok(summary.downtimeMs !== null);
    assert.equal((await cluster.sealedBackups()).length, 1);
  });

  test('a resume that fails once (e.g. the API server answers 503 during a leader election) is retried: the cluster is not left paused', async () => {
    const flag = join(cluster.work, 'resume-failed-once');
    const before = (await cluster.markerLines()).length;
    const resumeOnce = ['/bin/sh', '-c', 'if [ -e "$1" ]; then echo resumed >> "$0"; else : > "$1"; echo "Error from server: etcdserver: leader changed" >&2; exit 1; fi', cluster.marker, flag];
    let error: unknown;
    const stateDir = await mkdtemp(join(cluster.work, 'state-'));
    const previous = process.env['PACHBACKUP_STATE_DIR'];
    process.env['PACHBACKUP_STATE_DIR'] = stateDir;
    try {
      await cluster.backup((raw) => (raw.pause.command.resume = resumeOnce));
    } catch (err) {
      error = err;
    } finally {
      if (previous === undefined) delete process.env['PACHBACKUP_STATE_DIR'];
      else process.env['PACHBACKUP_STATE_DIR'] = previous;
      // Leave no ledger behind for the next test, whatever happened.
      const repo = openRepository(cluster.config());
      await repo.open(false);
      await repo.store.remove([LEDGER_KEY]);
    }
    assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed'], `the cluster was left paused after one failed resume attempt: ${(error as Error | undefined)?.message ?? ''}`);
    assert.equal(error, undefined, 'the backup succeeds once the retried resume succeeded');
  });

  test('a pause ledger left by an earlier crashed backup is not overwritten by the next backup', async () => {
    const stateDir = await mkdtemp(join(cluster.work, 'state-'));
    const previous = process.env['PACHBACKUP_STATE_DIR'];
    process.env['PACHBACKUP_STATE_DIR'] = stateDir;
    try {
      const repo = openRepository(cluster.config());
      await repo.open(true);
      const ledger = new PauseLedger(repo.store, repo.id);
      // An earlier "pachbackup backup --pause-strategy kubernetes" was killed (kill -9, OOM, node
      // lost) while pachd was scaled to 0; its ledger is the only record of it.
      const stale = {
        strategy: 'kubernetes',
        target: 'kubernetes context prod, namespace pachyderm: deployments pachd (1), pachw (2), 0 worker RCs (0 replicas)',
        startedAt: '2024-01-01T00:00:00.000Z',
        state: { context: 'prod', namespace: 'pachyderm', deployments: ['pachd', 'pachw'], workerSelector: 'suite=pachyderm,component=worker', workloads: [{ kind: 'Deployment', name: 'pachd', replicas: 1 }, { kind: 'Deployment', name: 'pachw', replicas: 2 }] },
      };
      await ledger.write({ record: stale, backupId: 'crashed-backup', host: 'cronjob-pod', pid: 4242, phase: 'paused', writtenAt: '2024-01-01T00:00:01.000Z' });

      // The next scheduled backup uses the config's own (command) strategy.
      const before = (await cluster.markerLines()).length;
      let error: Error | undefined;
      try {
        await cluster.backup();
      } catch (err) {
        error = err as Error;
      }
      const after = await ledger.read();
      assert.equal(after?.backupId, 'crashed-backup', `the record of the cluster the crashed run paused is gone (the backup ${error ? `failed: ${error.message}` : 'succeeded'}); "pachbackup status" now says not paused and "pachbackup resume" has nothing to resume`);
      assert.match(error?.message ?? '', /pachbackup resume/, 'the backup refuses and says how to get unstuck');
      assert.deepEqual((await cluster.markerLines()).slice(before), [], 'nothing was paused');
      assert.equal(JSON.parse(await readFile(ledger.localFile, 'utf8')).backupId, 'crashed-backup');
    } finally {
      await openRepository(cluster.config()).store.remove([LEDGER_KEY]);
      if (previous === undefined) delete process.env['PACHBACKUP_STATE_DIR'];
      else process.env['PACHBACKUP_STATE_DIR'] = previous;
    }
  });
});
