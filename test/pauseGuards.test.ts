/**
 * Issue 3 refusals at the engine and CLI level: no terminal and no --yes, the downtime budget,
 * a wrong expectedContext, and a quiescence failure; each resumes what it paused and seals nothing.
 * Then the pause ledger: a dead run's pause, `pachbackup resume`, and a backup that stalls while
 * paused until its lock goes stale.
 * Real PostgreSQL 15 servers and a filesystem store; the pause is a command that writes a marker.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { openRepository } from '../src/engine/context.js';
import { findPgTool } from '../src/postgres/tools.js';
import type { EngineEvent } from '../src/engine/events.js';
import { createStrategy, resumeLedgerEntry } from '../src/quiesce/factory.js';
import { LEDGER_KEY, PauseLedger, type LedgerEntry } from '../src/quiesce/ledger.js';
import type { QuiesceStrategy } from '../src/quiesce/strategy.js';
import { acquireLock, listLocks } from '../src/repository/lock.js';
import { TestCluster, describeRun, type CliResult } from './helpers/cluster.js';

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

  /**
   * Runs `fn` with a fresh local state directory (PACHBACKUP_STATE_DIR, where the local copy of the
   * pause ledger lives) and the repository's ledger; afterwards no ledger is left for the next test.
   */
  async function withLedger(fn: (ledger: PauseLedger, stateDir: string) => Promise<void>): Promise<void> {
    const stateDir = await mkdtemp(join(cluster.work, 'state-'));
    const previous = process.env['PACHBACKUP_STATE_DIR'];
    process.env['PACHBACKUP_STATE_DIR'] = stateDir;
    const repo = openRepository(cluster.config());
    try {
      await repo.open(true);
      await fn(new PauseLedger(repo.store, repo.id), stateDir);
    } finally {
      await repo.store.remove([LEDGER_KEY]);
      if (previous === undefined) delete process.env['PACHBACKUP_STATE_DIR'];
      else process.env['PACHBACKUP_STATE_DIR'] = previous;
    }
  }

  test('a resume that fails once (e.g. the API server answers 503 during a leader election) is retried: the cluster is not left paused', async () => {
    const flag = join(cluster.work, 'resume-failed-once');
    const before = (await cluster.markerLines()).length;
    const resumeOnce = ['/bin/sh', '-c', 'if [ -e "$1" ]; then echo resumed >> "$0"; else : > "$1"; echo "Error from server: etcdserver: leader changed" >&2; exit 1; fi', cluster.marker, flag];
    let error: unknown;
    await withLedger(async () => {
      await cluster.backup((raw) => (raw.pause.command.resume = resumeOnce)).catch((err: unknown) => (error = err));
    });
    assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed'], `the cluster was left paused after one failed resume attempt: ${(error as Error | undefined)?.message ?? ''}`);
    assert.equal(error, undefined, 'the backup succeeds once the retried resume succeeded');
  });

  test('a pause ledger left by an earlier crashed backup is not overwritten by the next backup: when resuming it fails, the backup stops before pausing and the ledger stays', async () => {
    await withLedger(async (ledger) => {
      // An earlier "pachbackup backup --pause-strategy kubernetes" was killed (kill -9, OOM, node
      // lost) while pachd was scaled to 0; its ledger is the only record of it. There is no
      // Kubernetes API here, so resuming it fails.
      const stale = {
        strategy: 'kubernetes',
        target: 'kubernetes context prod, namespace pachyderm: deployments pachd (1), pachw (2), 0 worker RCs (0 replicas)',
        startedAt: '2024-01-01T00:00:00.000Z',
        state: { context: 'prod', namespace: 'pachyderm', deployments: ['pachd', 'pachw'], workerSelector: 'suite=pachyderm,component=worker', workloads: [{ kind: 'Deployment', name: 'pachd', replicas: 1 }, { kind: 'Deployment', name: 'pachw', replicas: 2 }] },
      };
      await ledger.write({ record: stale, backupId: 'crashed-backup', host: 'cronjob-pod', pid: 4242, phase: 'paused', writtenAt: '2024-01-01T00:00:01.000Z' });
      // The next scheduled backup uses the config's own (command) strategy.
      const before = (await cluster.markerLines()).length;
      const error = await cluster.backup().then(
        () => undefined,
        (err: Error) => err,
      );
      assert.equal((await ledger.read())?.backupId, 'crashed-backup', `the record of the cluster the crashed run paused is gone (the backup ${error ? `failed: ${error.message}` : 'succeeded'}); "pachbackup status" now says not paused and "pachbackup resume" has nothing to resume`);
      assert.match(error?.message ?? '', /RESUME FAILED.*crashed-backup.*Nothing was paused by this run.*pachbackup resume/s, 'the backup stops and says how to get unstuck');
      assert.deepEqual((await cluster.markerLines()).slice(before), [], 'nothing was paused');
      assert.equal(JSON.parse(await readFile(ledger.localFile, 'utf8')).backupId, 'crashed-backup');
    });
  });

  test('"pachbackup resume" refuses while a backup holds its live lock (it would end that backup\'s pause mid-copy), and --force overrides', async () => {
    await withLedger(async (ledger, stateDir) => {
      const env = { PACHBACKUP_STATE_DIR: stateDir };
      const configFile = await cluster.writeConfig();
      // A backup in this process holds the lock and has the cluster paused.
      const lock = await acquireLock(openRepository(cluster.config()).store, 'backup', { command: 'pachbackup backup' });
      try {
        const before = (await cluster.markerLines()).length;
        await ledger.write({ record: { strategy: 'command', target: 'the cluster (pause.command)', startedAt: new Date().toISOString(), state: {} }, backupId: 'running-backup', host: 'here', pid: process.pid, phase: 'paused', writtenAt: new Date().toISOString() });
        const refused = await cluster.runCli(['--config', configFile, 'resume'], { env });
        assert.notEqual(refused.code, 0, describeRun(refused));
        assert.match(refused.stderr, /a backup may still be running: backup lock .*--force/s, describeRun(refused));
        assert.deepEqual((await cluster.markerLines()).slice(before), [], 'nothing was resumed');
        assert.equal((await ledger.read())?.backupId, 'running-backup', 'the ledger stays');
        const forced = await cluster.runCli(['--config', configFile, '--json', 'resume', '--force'], { env });
        assert.equal(forced.code, 0, describeRun(forced));
        assert.equal(forced.result?.resumed, true);
        assert.deepEqual((await cluster.markerLines()).slice(before), ['resumed']);
        assert.equal(await ledger.read(), undefined);
      } finally {
        await lock.release();
      }
    });
  });

  test('"pachbackup resume" holds the backup lock while it resumes: a backup starting meanwhile is refused, so its pause and ledger cannot be undone by the resume', async () => {
    await withLedger(async (ledger, stateDir) => {
      const env = { PACHBACKUP_STATE_DIR: stateDir };
      const started = join(cluster.work, 'resume-started');
      await rm(started, { force: true });
      // A slow resume command: it says it started, then takes 3 s.
      const configFile = await cluster.writeConfig((raw) => (raw.pause.command.resume = ['/bin/sh', '-c', 'touch "$1"; sleep 3; echo resumed >> "$0"', cluster.marker, started]));
      await ledger.write({ record: { strategy: 'command', target: 'the cluster (pause.command)', startedAt: '2024-01-01T00:00:00.000Z', state: {} }, backupId: 'killed-backup', host: 'cronjob-pod', pid: 4242, phase: 'paused', writtenAt: '2024-01-01T00:00:01.000Z' });
      const before = (await cluster.markerLines()).length;
      const resume = cluster.spawnCli(['--config', configFile, '--json', 'resume'], { env });
      while (!(await stat(started).then(() => true, () => false))) await sleep(50);
      const error = await cluster.backup().then(
        () => undefined,
        (err: Error) => err,
      );
      const done = await resume.done;
      assert.equal(done.code, 0, describeRun(done));
      assert.match(error?.message ?? 'the backup ran during the resume', /is locked: cannot take the backup lock while the backup lock .* held by "pachbackup resume"/);
      assert.deepEqual((await cluster.markerLines()).slice(before), ['resumed'], 'the backup did not pause during the resume');
      assert.equal(await ledger.read(), undefined, 'the resumed ledger is gone');
      assert.deepEqual(await listLocks(openRepository(cluster.config()).store), [], 'the resume released its lock');
    });
  });

  test('a backup that finds the pause ledger of a run that died resumes that pause first, then backs up (the cluster is not left paused until someone notices)', async () => {
    await withLedger(async (ledger) => {
      // A scheduled "pachbackup backup" (the command strategy of this config) was killed while paused.
      const before = (await cluster.markerLines()).length;
      await ledger.write({ record: { strategy: 'command', target: 'the cluster (pause.command)', startedAt: '2024-01-01T00:00:00.000Z', state: {} }, backupId: 'killed-backup', host: 'cronjob-pod', pid: 4242, phase: 'paused', writtenAt: '2024-01-01T00:00:01.000Z' });
      const backupsBefore = (await cluster.sealedBackups()).length;
      const summary = await cluster.backup();
      assert.deepEqual((await cluster.markerLines()).slice(before), ['resumed', 'paused', 'resumed'], "the dead run's pause is resumed before this backup pauses, and this backup resumes its own");
      assert.equal(await ledger.read(), undefined, 'no ledger is left: nothing is paused');
      assert.equal((await cluster.sealedBackups()).length, backupsBefore + 1, `the backup was sealed (${summary.id})`);
    });
  });

  test('the pause ledger is replaced and removed only by the backup it names; another backup\'s entry is left, in the repository and in the local file alike', async () => {
    await withLedger(async (ledger) => {
      const now = new Date().toISOString();
      const entry = (backupId: string, host: string): LedgerEntry => ({ record: { strategy: 'command', target: 'the cluster (pause.command)', startedAt: now, state: {} }, backupId, host, pid: 4242, phase: 'paused', writtenAt: now });
      // Backup B took the pause over from backup A, whose lock went stale while it was stalled.
      await ledger.write(entry('backup-b', 'host-b'));
      // A wakes up: it may neither replace B's ledger nor remove it; both name B as the owner.
      assert.equal((await ledger.write(entry('backup-a', 'host-a')))?.backupId, 'backup-b', 'a write over another backup\'s ledger is refused, naming it');
      assert.equal((await ledger.clear('backup-a'))?.backupId, 'backup-b', 'a clear of another backup\'s ledger is refused, naming it');
      assert.equal((await ledger.read())?.backupId, 'backup-b');
      assert.equal(JSON.parse(await readFile(ledger.localFile, 'utf8')).backupId, 'backup-b');
      // B runs on another host: A's own local copy is here, and the repository names B.
      await writeFile(ledger.localFile, JSON.stringify(entry('backup-a', 'host-a')));
      assert.equal((await ledger.clear('backup-a'))?.backupId, 'backup-b');
      await assert.rejects(readFile(ledger.localFile), { code: 'ENOENT' }, "A's own local copy is removed");
      assert.equal((await ledger.read())?.backupId, 'backup-b', "B's ledger stays in the repository");
      assert.equal(await ledger.clear('backup-b'), undefined);
      assert.equal(await ledger.read(), undefined);
    });
  });

  /** The marker's lines, read without giving the event loop a turn (while this process is stalled). */
  function markerLinesNow(): string[] {
    try {
      return readFileSync(cluster.marker, 'utf8').split('\n').filter((l) => l !== '');
    } catch {
      return [];
    }
  }

  /**
   * Blocks this whole process, its timers too (so the lock of a backup running here stops
   * heartbeating), as SIGSTOP or a hung VM would, until `until` holds.
   */
  function stallProcess(until: () => boolean, what: string): void {
    const cell = new Int32Array(new SharedArrayBuffer(4));
    const deadline = Date.now() + 120_000;
    while (!until()) {
      if (Date.now() > deadline) throw new Error(`stalled for 120 s waiting for ${what}`);
      Atomics.wait(cell, 0, 0, 20);
    }
  }

  /** The config's strategy, whose pause, once the cluster is paused, runs `stall`. */
  async function stallingStrategy(stall: () => void): Promise<QuiesceStrategy> {
    const inner = await createStrategy(cluster.config().pause);
    const pause: QuiesceStrategy['pause'] = async (...args) => {
      const record = await inner.pause(...args);
      stall();
      return record;
    };
    return Object.create(inner, { pause: { value: pause } }) as QuiesceStrategy;
  }

  /** The backups' lock lease here: the stalled backup's lock is stale 1.5 s after its last heartbeat. */
  const LEASE_SECONDS = 1.5;
  const quickSettle = (raw: Record<string, any>): void => {
    raw.pause.quiescence = { settleSeconds: 0 };
  };

  test('a backup stalled while paused until its lock went stale and a second backup took the pause over: it stops with the lock lost, does not resume the cluster under the second backup and leaves its ledger', async () => {
    await withLedger(async (ledger) => {
      // Backup B pauses with a command that returns only once the test opens the gate.
      const gate = join(cluster.work, 'gate-stalled-backup');
      const configB = await cluster.writeConfig((raw) => {
        raw.pause.command.pause = ['/bin/sh', '-c', 'echo paused >> "$0"; while [ ! -e "$1" ]; do sleep 0.05; done', cluster.marker, gate];
      });
      const before = (await cluster.markerLines()).length;
      const sealedBefore = await cluster.sealedBackups();
      let idA: string | undefined;
      let b: { child: { pid?: number | undefined }; done: Promise<CliResult> } | undefined;
      // Backup A (this process) pauses the cluster, then stalls: no heartbeat. Once its lease has
      // run out, B starts, takes the stale lock over, resumes A's pause as a dead run's (its
      // ledger) and pauses the cluster itself; then A wakes up.
      const strategy = await stallingStrategy(() => {
        idA = (JSON.parse(readFileSync(ledger.localFile, 'utf8')) as LedgerEntry).backupId;
        const stalledAt = Date.now();
        stallProcess(() => Date.now() > stalledAt + LEASE_SECONDS * 1000 + 100, "backup A's lock to go stale");
        b = cluster.spawnCli(['--config', configB, '--json', '--yes', 'backup']);
        stallProcess(() => markerLinesNow().length >= before + 3, 'backup B to pause the cluster');
      });
      const events: EngineEvent[] = [];
      let runB: CliResult | undefined;
      try {
        const errorA = await cluster.backup(quickSettle, events, { strategy, leaseSeconds: LEASE_SECONDS }).then(
          () => undefined,
          (err: Error) => err,
        );
        assert.ok(b && idA, 'A stalled while paused and B started');
        assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed', 'paused'], `A paused, B resumed that pause and paused the cluster itself; A must not resume it while B is paused (A ${errorA ? `failed: ${errorA.message}` : 'succeeded'})`);
        const owner = await ledger.read();
        assert.ok(owner && owner.backupId !== idA && owner.pid === b.child.pid, `B's ledger, the only record of B's pause, is still there (found ${JSON.stringify(owner)})`);
        assert.equal((JSON.parse(await readFile(ledger.localFile, 'utf8')) as LedgerEntry).backupId, owner.backupId, "the local copy names B too");
        assert.match(errorA?.message ?? 'A succeeded', /lost lock/, 'A fails naming the lock loss');
        assert.match(errorA?.message ?? '', new RegExp(`backup ${owner.backupId}`), 'and the backup that owns the pause now');
        assert.ok(events.some((e) => e.type === 'warning' && e.message.includes(owner.backupId) && /not resum/.test(e.message)), `a warning says A does not resume B's pause: ${JSON.stringify(events.filter((e) => e.type === 'warning'))}`);
        assert.deepEqual(await cluster.sealedBackups(), sealedBefore, 'A sealed nothing');
      } finally {
        await writeFile(gate, '');
        runB = await b?.done;
      }
      assert.ok(runB);
      assert.equal(runB.code, 0, describeRun(runB));
      assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed', 'paused', 'resumed'], 'B resumes its own pause');
      assert.equal(await ledger.read(), undefined);
      assert.deepEqual((await cluster.sealedBackups()).filter((id) => !sealedBefore.includes(id)), [runB.result?.id]);
    });
  });

  test('a backup stalled while paused until its lock went stale, whose pause "pachbackup resume" resumed meanwhile (clearing its ledger entry): it does not resume a second time, which could end a pause another backup is starting', async () => {
    await withLedger(async (ledger) => {
      const before = (await cluster.markerLines()).length;
      const sealedBefore = await cluster.sealedBackups();
      const configFile = await cluster.writeConfig();
      let resume: { done: Promise<CliResult> } | undefined;
      const strategy = await stallingStrategy(() => {
        const stalledAt = Date.now();
        stallProcess(() => Date.now() > stalledAt + LEASE_SECONDS * 1000 + 100, "the backup's lock to go stale");
        // The operator (or a scheduled job) resumes the pause from the ledger, taking the stale lock over.
        resume = cluster.spawnCli(['--config', configFile, '--json', 'resume']);
        stallProcess(() => !existsSync(ledger.localFile), 'the resume to clear the ledger');
      });
      const events: EngineEvent[] = [];
      const error = await cluster.backup(quickSettle, events, { strategy, leaseSeconds: LEASE_SECONDS }).then(
        () => undefined,
        (err: Error) => err,
      );
      const resumed = await resume?.done;
      assert.ok(resumed, 'the resume ran while the backup stalled');
      assert.equal(resumed.code, 0, describeRun(resumed));
      assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed'], 'resumed once, by "pachbackup resume"; the woken backup did not resume again');
      assert.match(error?.message ?? 'the backup succeeded', /lost lock.*another run resumed its pause/s);
      assert.equal(await ledger.read(), undefined);
      assert.deepEqual(await cluster.sealedBackups(), sealedBefore);
    });
  });

  test('a backup stalled while paused until its lock went stale, with no other backup about: it stops at once with the lock lost, resumes its own pause, removes its ledger and seals nothing', async () => {
    await withLedger(async (ledger) => {
      const before = (await cluster.markerLines()).length;
      const sealedBefore = await cluster.sealedBackups();
      const strategy = await stallingStrategy(() => {
        const stalledAt = Date.now();
        stallProcess(() => Date.now() > stalledAt + LEASE_SECONDS * 1000 + 100, "the backup's lock to go stale");
      });
      const events: EngineEvent[] = [];
      const error = await cluster.backup(quickSettle, events, { strategy, leaseSeconds: LEASE_SECONDS }).then(
        () => undefined,
        (err: Error) => err,
      );
      assert.match(error?.message ?? 'the backup succeeded', /lost lock/);
      assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed'], 'its own pause is resumed: the cluster is not left paused');
      assert.equal(await ledger.read(), undefined);
      const phases = events.flatMap((e) => (e.type === 'phase-start' ? [e.phase] : []));
      assert.deepEqual(phases.slice(phases.indexOf('pause')), ['pause', 'resume'], 'nothing but the resume runs once the lock is lost');
      assert.deepEqual(await cluster.sealedBackups(), sealedBefore);
    });
  });
  test('a backup whose resume fails while its lock is lost (a network outage reaching both the cluster and the repository) says RESUME FAILED: the lock loss does not hide that the cluster is still paused', async () => {
    await withLedger(async (ledger) => {
      const before = (await cluster.markerLines()).length;
      const sealedBefore = await cluster.sealedBackups();
      const inner = await createStrategy(cluster.config().pause);
      // Every resume attempt fails; the first stalls this process past the lease, as a resume
      // waiting on an API server that does not answer (and a heartbeat that cannot be written) would.
      let attempts = 0;
      const resume: QuiesceStrategy['resume'] = async () => {
        if (attempts++ === 0) {
          const stalledAt = Date.now();
          stallProcess(() => Date.now() > stalledAt + LEASE_SECONDS * 1000 + 100, "the backup's lock to go stale");
        }
        throw new Error('Unable to connect to the server: dial tcp 10.0.0.1:443: i/o timeout');
      };
      const strategy = Object.create(inner, { resume: { value: resume } }) as QuiesceStrategy;
      const events: EngineEvent[] = [];
      const error = await cluster.backup(quickSettle, events, { strategy, leaseSeconds: LEASE_SECONDS }).then(
        () => undefined,
        (err: Error) => err,
      );
      assert.equal(attempts, 3, 'the resume was tried three times');
      assert.deepEqual((await cluster.markerLines()).slice(before), ['paused'], 'the cluster is still paused');
      assert.ok((await ledger.read())?.backupId, 'the ledger, the record of that pause, stays');
      assert.match(error?.message ?? 'the backup succeeded', /RESUME FAILED.*pachbackup resume/s, `the error says the cluster may still be paused and how to resume it (warnings: ${JSON.stringify(events.filter((e) => e.type === 'warning'))})`);
      assert.deepEqual(await cluster.sealedBackups(), sealedBefore);
      // The cluster is resumed for the tests that follow.
      await resumeLedgerEntry(cluster.config().pause, ledger, (await ledger.read())!, { info: () => undefined, warn: () => undefined });
    });
  });
  test('holdDuringDump, dumpJobs 2: when one dump fails, a pg_dump that does not exit on SIGTERM (stuck sending its cancel requests to a server it cannot reach) does not keep the failed backup, and the paused cluster, waiting for it', async () => {
    await withLedger(async () => {
      const bin = join(cluster.work, 'stubborn-pg-dump');
      await mkdir(bin, { recursive: true });
      await writeFile(
        join(bin, 'pg_dump'),
        [
          '#!/bin/sh',
          `case "$*" in *--version*) exec "${findPgTool('pg_dump')}" "$@";; esac`,
          'case "$*" in *--dbname=dex*) echo "pg_dump: error: connection to server was lost" >&2; exit 1;; esac',
          "trap '' TERM",
          'exec sleep 90',
          '',
        ].join('\n'),
        { mode: 0o755 },
      );
      const before = (await cluster.markerLines()).length;
      const started = Date.now();
      const error = await cluster
        .backup((raw) => {
          raw.cluster.postgres.binDir = bin;
          raw.backup.dumpJobs = 2;
          raw.pause.holdDuringDump = true;
          raw.pause.quiescence = { settleSeconds: 0 };
        })
        .then(
          () => undefined,
          (err: Error) => err,
        );
      const took = Date.now() - started;
      assert.match(error?.message ?? 'the backup succeeded', /database dex .*connection to server was lost/);
      assert.ok(took < 45_000, `the backup failed ${Math.round(took / 1000)} s after it started: it waited for the pg_dump that ignores SIGTERM`);
      assert.deepEqual((await cluster.markerLines()).slice(before), ['paused', 'resumed']);
    });
  });
});
