/**
 * Issue 3 refusals at the engine and CLI level: no terminal and no --yes, the downtime budget,
 * a wrong expectedContext, and a quiescence failure; each resumes what it paused and seals nothing.
 * Real PostgreSQL 15 servers and a filesystem store; the pause is a command that writes a marker.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
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
});
