/**
 * Issue 6: object-store and database faults during real backups and restores, against real
 * PostgreSQL 15 servers and real stores. Faults come from the PACHBACKUP_FAULTS store decorator
 * (503 SlowDown, AccessDenied, bodies that break mid-stream; its `copy` rules reach server-side
 * copies, which bypass the decorator) and from the TCP fault proxy in front
 * of s3rver and PostgreSQL (connection resets, truncated responses). Each test proves the three
 * promises: no data lost (restored fingerprints equal the source), the cluster never left paused,
 * and nothing that fails is sealed.
 *
 * Every test records what it tried with `t.diagnostic('reliability …')`, which
 * scripts/reliability-report.mjs turns into docs/reliability.md.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test, type TestContext } from 'node:test';
import { addChunks } from '../src/demo/pachydermFixture.js';
import { openRepository } from '../src/engine/context.js';
import type { EngineEvent } from '../src/engine/events.js';
import { RestoreError, restoreTargetsFromConfig, runRestore } from '../src/engine/restore.js';
import { findPgTool } from '../src/postgres/tools.js';
import { verifyBackup } from '../src/engine/verify.js';
import { startFaultProxy, type FaultProxy } from '../src/objectstore/faultProxy.js';
import { FaultStore, faultsFromEnv, withCopyFaults, type FaultRule } from '../src/objectstore/faults.js';
import { StoreError } from '../src/objectstore/store.js';
import { compareFingerprints, describeRun, TestCluster, type CliResult, type StoreKind } from './helpers/cluster.js';
import { cephRgwSkipReason } from './helpers/servers.js';

const EXIT_FAILED = 1;
const exec = promisify(execFile);

/** One line of docs/reliability.md; the report adds the test's outcome. */
function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

function faultsEnv(rules: Array<Partial<FaultRule> & Pick<FaultRule, 'store' | 'op' | 'kind'>>): Record<string, string> {
  return { PACHBACKUP_FAULTS: JSON.stringify(rules) };
}

/**
 * Counts the faults the PACHBACKUP_FAULTS decorator injects in this process, per store: every
 * FaultStore the engine opens is remembered the first time one of its methods runs, and its
 * public `injected` counter is read at the end.
 */
function countInjectedFaults(): { byStore(): Map<string, number>; restore(): void } {
  const seen = new Set<FaultStore>();
  const proto = FaultStore.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const originals = new Map<string, (...args: unknown[]) => unknown>();
  for (const method of ['check', 'list', 'stat', 'get', 'put', 'remove']) {
    const original = proto[method]!;
    originals.set(method, original);
    proto[method] = function (this: FaultStore, ...args: unknown[]) {
      seen.add(this);
      return original.apply(this, args);
    };
  }
  return {
    byStore() {
      const out = new Map<string, number>();
      for (const store of seen) out.set(store.description, (out.get(store.description) ?? 0) + store.injected);
      return out;
    },
    restore() {
      for (const [method, original] of originals) proto[method] = original;
    },
  };
}

/**
 * Sets PACHBACKUP_FAULTS in this process for `fn` (in-process engine runs), then removes it.
 * `faultsClosed` stops a test body that outlived its test (failed by an uncaught error while
 * still running) from setting it again for the tests after it.
 */
let faultsClosed = false;
async function withFaults<T>(rules: unknown[], fn: () => Promise<T>): Promise<T> {
  if (faultsClosed) throw new Error('fault injection in this process is closed');
  process.env.PACHBACKUP_FAULTS = JSON.stringify(rules);
  try {
    return await fn();
  } finally {
    delete process.env.PACHBACKUP_FAULTS;
  }
}
function closeFaults(): void {
  faultsClosed = true;
  delete process.env.PACHBACKUP_FAULTS;
}

/** The repository lists no sealed backup, `list` agrees, and `status` says nothing is paused. */
async function assertNothingSealedNorPaused(cluster: TestCluster, config: string): Promise<void> {
  assert.deepEqual(await cluster.sealedBackups(), [], 'no manifest in the repository');
  const list = await cluster.runCli(['--config', config, '--json', 'list']);
  assert.equal(list.code, 0, describeRun(list));
  assert.deepEqual(list.result?.backups, [], `list shows no complete backup: ${list.stdout}`);
  const status = await cluster.runCli(['--config', config, '--json', 'status']);
  assert.equal(status.code, 0, describeRun(status));
  assert.equal(status.result?.paused, false, 'status: not paused');
}

/** Repository keys under objects/ (what a run managed to copy, whether or not it was journaled). */
async function repositoryObjectKeys(cluster: TestCluster): Promise<Set<string>> {
  const keys = new Set<string>();
  for await (const info of cluster.repositoryStore().list('objects/')) keys.add(info.key);
  return keys;
}

// Every operation of every store fails with probability 5% (503 SlowDown, retryable), and 5% of
// reads break mid-body (ECONNRESET): the cluster's objects, and every read of the repository.
// Dump uploads are left out here: a dump streams from pg_dump and is the subject of its own test
// below.
const TRANSIENT_RATE = 0.05;
const REPOSITORY_PUT_KEYS = ['objects/', '/journal/', '/index', '/referenced', '/manifest', 'ledger/', 'tmp/', 'locks/', 'pachbackup.json'];

function fivePercentRules(): FaultRule[] {
  const rules: FaultRule[] = [];
  const rule = (r: Partial<FaultRule> & Pick<FaultRule, 'store' | 'op' | 'kind'>): FaultRule => ({ after: 0, rate: TRANSIENT_RATE, ms: 0, ...r });
  for (const store of ['cluster.objectStore', 'repository', 'restore.objectStore']) {
    for (const op of ['list', 'stat', 'get', 'remove', 'check'] as const) rules.push(rule({ store, op, kind: 'transient' }));
    if (store === 'repository') for (const keyContains of REPOSITORY_PUT_KEYS) rules.push(rule({ store, op: 'put', keyContains, kind: 'transient' }));
    else rules.push(rule({ store, op: 'put', kind: 'transient' }));
  }
  rules.push(rule({ store: 'cluster.objectStore', op: 'get', kind: 'reset' }));
  // Every read of the repository: objects, and its own files (indexes, manifests, journals, locks, dumps).
  rules.push(rule({ store: 'repository', op: 'get', kind: 'reset' }));
  return rules;
}

describe('transient object-store faults (s3rver)', () => {
  let cluster: TestCluster;
  let clusterPath: FaultProxy;
  let repositoryPath: FaultProxy;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 's3rver', chunks: 120, chunkSize: 16 * 1024 })) as TestCluster;
    clusterPath = await proxyTo(cluster);
    repositoryPath = await proxyTo(cluster);
  });
  after(async () => {
    closeFaults();
    // Closing the proxies ends every connection the in-process engine may still hold, so s3rver can stop.
    await clusterPath?.close();
    await repositoryPath?.close();
    await cluster?.cleanup();
  });

  /**
   * The cluster bucket and the repository are reached through two pass-through proxies: different
   * endpoints, so objects stream through pachbackup (and its fault decorator) instead of being
   * copied server-side.
   */
  const streamed = (raw: Record<string, any>): void => {
    raw.cluster.objectStore.endpoint = `http://${clusterPath.address}`;
    raw.repository.endpoint = `http://${repositoryPath.address}`;
    raw.restore.objectStore.endpoint = `http://${repositoryPath.address}`;
    raw.backup.concurrency = 4;
  };

  test('backup, restore and verify complete with 5% of requests failing (503) and 5% of reads (objects and repository files) reset mid-body; data equal', { timeout: 600_000 }, async (t) => {
    const counter = countInjectedFaults();
    let injected: Map<string, number>;
    try {
      await withFaults(fivePercentRules(), async () => {
        // Two backups: the second one reads the first one's index and copies only new objects, under faults too.
        await cluster.backup(streamed);
        await addChunksTo(cluster, 40);
        const second = await cluster.backup(streamed);
        assert.equal(second.objects.newCount, 40, 'the second backup copies only the 40 new objects');
        // The summary says the run was throttled, and by what.
        assert.ok(second.retries.count > 0 && (second.retries.causes['SlowDown'] ?? 0) > 0, `the second backup counted its retries: ${JSON.stringify(second.retries)}`);
        const restored = await cluster.restore(second.id, streamed);
        assert.ok(restored.retries.count > 0 && (restored.retries.causes['SlowDown'] ?? 0) > 0, `the restore counted its retries: ${JSON.stringify(restored.retries)}`);
      });
      // verify under the same faults: a read that breaks mid-body is read again, not reported as damage.
      await withFaults(
        fivePercentRules(),
        async () => {
          const repo = openRepository(cluster.config(streamed));
          await repo.open(false);
          const { sealed } = await repo.listBackups();
          assert.equal(sealed.length, 2);
          let resets = 0;
          for (const manifest of sealed) {
            const report = await verifyBackup({ repo, manifest, emit: () => undefined, concurrency: 4 });
            assert.equal(report.ok, true, JSON.stringify(report.problems));
            resets += report.retries.causes['ECONNRESET'] ?? 0;
          }
          assert.ok(resets > 0, 'the verifies read again the objects whose reads were reset, and counted them');
        },
      );
    } finally {
      injected = counter.byStore();
      counter.restore();
    }
    const differences = compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints());
    assert.deepEqual(differences, [], 'the restored cluster equals the source');
    assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed', 'paused', 'resumed'], 'each backup paused once and resumed');
    const total = [...injected.values()].reduce((a, b) => a + b, 0);
    const perStore = ['pachyderm-cluster', 'pachbackup-repo', 'pachyderm-restored'].map((bucket) => {
      const n = [...injected].filter(([store]) => store.includes(`s3://${bucket}`)).reduce((a, [, v]) => a + v, 0);
      return { bucket, n };
    });
    const shown = perStore.map((p) => `${p.bucket} ${p.n}`).join(', ');
    t.diagnostic(`faults injected: ${total} (${shown})`);
    for (const { bucket, n } of perStore) assert.ok(n > 0, `faults were injected into ${bucket} (${shown})`);
    record(t, {
      category: 'object store',
      fault: '5% of requests fail with 503 SlowDown (list, stat, get, put, remove, check of the cluster bucket, the repository and the restore target); 5% of reads reset mid-body (cluster objects; repository objects, indexes, manifests, journals, locks, dumps)',
      runs: 5,
      detail: `2 backups, 1 restore, 2 verifies (resets included) completed; ${total} faults injected (${shown}); restored data equal; resumed after each pause`,
    });
  });

  test('the read of a database dump breaks twice while pg_restore reads it: that database is restored again from the start, the retries counted, data equal', { timeout: 300_000 }, async (t) => {
    // The first read of the pachyderm dump (the preflight's check) passes; the next two, the ones
    // pg_restore is fed from, break mid-body. Before the fix, the first break failed the restore.
    const rules = [{ store: 'repository', op: 'get', keyContains: 'db/pachyderm.dump', kind: 'reset', after: 1, limit: 2, rate: 1, ms: 0 }];
    const config = cluster.config(streamed);
    await cluster.backup(streamed);
    const events: EngineEvent[] = [];
    const restored = await withFaults(rules, () =>
      runRestore({ config, backup: 'latest', targets: restoreTargetsFromConfig(config), force: true, dryRun: false, noOwner: true, concurrency: 4, emit: (e) => events.push(e) }),
    );
    assert.equal(restored.retries.causes['ECONNRESET'], 2, `both breaks retried and counted: ${JSON.stringify(restored.retries)}`);
    assert.equal(events.filter((e) => e.type === 'warning' && /transient object-store fault \(ECONNRESET\).*reading the dump of pachyderm/.test(String(e.message))).length, 1, 'the first retry is warned, naming the dump');
    assert.deepEqual(compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints()), [], 'the restored cluster equals the source');
    record(t, {
      category: 'object store',
      fault: 'the read of a database dump breaks mid-body (ECONNRESET) twice while pg_restore is fed from it',
      runs: 1,
      detail: `restore completed: the database was created again and the dump streamed a third time; retries ${JSON.stringify(restored.retries.causes)}; restored data equal`,
    });
  });

  test('pg_restore fails on its own while the dump streams into it: one attempt, its own error reported, not taken for a broken read', { timeout: 300_000 }, async (t) => {
    // A stand-in pg_restore that answers --version as the real one, then closes its stdin (our
    // writes fail with EPIPE, which breaks the dump's read) and fails as a missing role would.
    await cluster.backup(streamed);
    const bin = join(cluster.work, `failing-pg-restore-${Date.now()}`);
    await mkdir(bin, { recursive: true });
    const runs = join(bin, 'runs');
    const script = [
      '#!/bin/sh',
      `if [ "$1" = "--version" ]; then exec "${findPgTool('pg_restore')}" --version; fi`,
      `echo run >> "${runs}"`,
      'exec 0<&-',
      'sleep 0.2',
      `echo 'pg_restore: error: could not execute query: ERROR:  role "nobody" does not exist' >&2`,
      'exit 1',
    ].join('\n');
    await writeFile(join(bin, 'pg_restore'), `${script}\n`, { mode: 0o755 });
    const config = cluster.config((raw) => {
      streamed(raw);
      raw.restore.postgres.binDir = bin;
    });
    const events: EngineEvent[] = [];
    await assert.rejects(
      runRestore({ config, backup: 'latest', targets: restoreTargetsFromConfig(config), force: true, dryRun: false, noOwner: true, concurrency: 4, emit: (e) => events.push(e) }),
      (err: unknown) => err instanceof RestoreError && /role "nobody" does not exist/.test(err.message) && !/EPIPE|read \d+ times/.test(err.message),
    );
    assert.equal((await readFile(runs, 'utf8')).trim().split('\n').length, 1, 'pg_restore ran once');
    // (The clean-up's removal of the restored objects may meet s3rver's own 500s; those are retried and not this test's subject.)
    assert.ok(!events.some((e) => e.type === 'warning' && /transient object-store fault.*(dump|EPIPE)/.test(String(e.message))), `the dump's read was not reported as a store fault: ${JSON.stringify(events.filter((e) => e.type === 'warning'))}`);
    record(t, {
      category: 'process',
      fault: 'pg_restore fails on its own (closes its input, exits 1) while the dump streams into it',
      runs: 1,
      detail: 'restore refused with pg_restore\'s own error; pg_restore ran once; not retried as a broken read',
    });
  });

});

describe('faults on the upload of a dump and on server-side copies (s3rver)', () => {
  let cluster: TestCluster;
  let passThrough: FaultProxy;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 's3rver', target: false, chunks: 20, chunkSize: 16 * 1024 })) as TestCluster;
    passThrough = await proxyTo(cluster);
  });
  after(async () => {
    await passThrough?.close();
    await cluster?.cleanup();
  });

  const streamed = (raw: Record<string, any>): void => {
    raw.cluster.objectStore.endpoint = `http://${passThrough.address}`;
  };

  test('a 503 on the upload of a database dump is retried: the backup succeeds', { timeout: 300_000 }, async (t) => {
    const config = await cluster.writeConfig(streamed);
    const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], {
      env: faultsEnv([{ store: 'repository', op: 'put', keyContains: '/db/pachyderm.dump', kind: 'transient', limit: 1 }]),
    });
    record(t, {
      category: 'object store',
      fault: 'one 503 SlowDown on the upload of the pachyderm dump (streamed from pg_dump)',
      runs: 1,
      detail: run.code === 0 ? 'retried; backup sealed' : `backup failed: "${errorLine(run)}"`,
    });
    assert.equal(run.code, 0, `a transient fault on the dump upload must be retried (the snapshot is still open, pg_dump can run again): ${describeRun(run)}`);
    assert.deepEqual(run.result?.retries, { count: 1, causes: { SlowDown: 1 } }, `the summary counts the one retry: ${describeRun(run)}`);
    assert.ok(run.events.some((e) => e.type === 'warning' && /transient object-store fault \(SlowDown\).*retrying/.test(String(e.message))), 'the retry was reported as it happened');
  });

  test('the repository refuses the upload of a dump (403): the error names the repository failure, not a killed pg_dump', { timeout: 300_000 }, async (t) => {
    await cluster.resetMarker();
    const config = await cluster.writeConfig(streamed);
    const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], {
      env: faultsEnv([{ store: 'repository', op: 'put', keyContains: '/db/pachyderm.dump', kind: 'permanent' }]),
    });
    record(t, {
      category: 'object store',
      fault: 'the repository refuses the upload of the pachyderm dump (403 AccessDenied)',
      runs: 1,
      detail: `"${errorLine(run)}"`,
    });
    assert.equal(run.code, EXIT_FAILED, describeRun(run));
    assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
    assert.match(errorLine(run), /AccessDenied/, `the error says what failed (the upload was refused), not only that pg_dump was killed: ${describeRun(run)}`);
  });

  test('server-side copy: a read-back of a copied object that breaks mid-body is retried', { timeout: 300_000 }, async (t) => {
    await addChunksTo(cluster, 10);
    const config = await cluster.writeConfig();
    const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], {
      env: faultsEnv([{ store: 'repository', op: 'get', keyContains: 'objects/', kind: 'reset', limit: 1 }]),
    });
    record(t, {
      category: 'object store',
      fault: 'the read-back of an object copied server-side (CopyObject) resets mid-body, once',
      runs: 1,
      detail: run.code === 0 ? `retried; backup sealed (copy path ${run.result?.copyPath})` : `backup failed: "${errorLine(run)}"`,
    });
    assert.equal(run.code, 0, `a reset while reading back a server-side copy must be retried like any other read: ${describeRun(run)}`);
    assert.equal(run.result?.copyPath, 'server-side');
  });
});

describe('permanent object-store failure mid-copy, then the next backup (fs)', () => {
  let cluster: TestCluster;
  const total = 60;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: total, chunkSize: 8192 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('AccessDenied on the 20th object read while paused: clear error, resumed, nothing sealed; the next backup copies only what is missing', { timeout: 300_000 }, async (t) => {
    const config = await cluster.writeConfig();
    const failed = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy', '--concurrency', '2'], {
      env: faultsEnv([{ store: 'cluster.objectStore', op: 'get', after: 20, kind: 'permanent' }]),
    });
    assert.equal(failed.code, EXIT_FAILED, describeRun(failed));
    assert.match(failed.stderr, /pachbackup: error: .*chunk\/[0-9a-f]+\.[0-9a-f]{16}.*AccessDenied/, `the error names the operation, the key and the cause: ${describeRun(failed)}`);
    assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
    await assertNothingSealedNorPaused(cluster, config);
    const copiedBefore = await repositoryObjectKeys(cluster);
    assert.ok(copiedBefore.size >= 18 && copiedBefore.size < total, `stopped mid-copy (${copiedBefore.size} of ${total} copied)`);

    await cluster.resetMarker();
    const next = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(next.code, 0, describeRun(next));
    const summary = next.result!;
    assert.equal(summary.objects.count, total);
    record(t, {
      category: 'object store',
      fault: 'permanent failure (403 AccessDenied) of the cluster bucket mid-copy, while paused; then a backup without the fault',
      runs: 2,
      detail: `failed run: clear error, resumed, nothing sealed, ${copiedBefore.size} of ${total} objects copied; next backup copied ${summary.objects.newCount}`,
    });
    assert.ok(summary.objects.newCount < total, `the next backup copies fewer than all ${total} objects (copied ${summary.objects.newCount})`);
    assert.equal(
      summary.objects.newCount,
      total - copiedBefore.size,
      `the next backup copies exactly what the failed one did not (${total} - ${copiedBefore.size}); objects the failed run copied were not journaled`,
    );
    const verify = await cluster.runCli(['--config', config, '--json', 'verify', summary.id]);
    assert.equal(verify.code, 0, describeRun(verify));
  });
});

describe('object reads that break (fs)', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 40, chunkSize: 8192 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('truncated object bodies are never stored as the object: the backup either retries or fails, and anything sealed verifies', { timeout: 300_000 }, async (t) => {
    assert.equal(process.env.PACHBACKUP_FAULTS, undefined, `no fault rules left over in this process: ${process.env.PACHBACKUP_FAULTS}`);
    const config = await cluster.writeConfig();
    const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup', '--concurrency', '2'], {
      env: faultsEnv([{ store: 'cluster.objectStore', op: 'get', kind: 'truncate', rate: 0.2 }]),
    });
    const sealed = await cluster.sealedBackups();
    if (run.code === 0) {
      const verify = await cluster.runCli(['--config', config, '--json', 'verify', run.result!.id]);
      assert.equal(verify.code, 0, describeRun(verify));
    } else {
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.deepEqual(sealed, [], 'a failed backup seals nothing');
      // The object did not change: a truncated read is tried again, and fails only after every attempt.
      assert.match(run.stderr + run.stdout, /copying chunk\/\S+: read \d+ of its \d+ bytes/, describeRun(run));
    }
    const status = await cluster.runCli(['--config', config, '--json', 'status']);
    assert.equal(status.result?.paused, false);
    record(t, {
      category: 'object store',
      fault: '20% of object reads end early (truncated body, clean end of stream)',
      runs: 1,
      detail: run.code === 0 ? 'retried; sealed backup verifies' : `refused: "${errorLine(run)}"; nothing sealed, not paused`,
    });
    // Whatever happened, a later backup without faults completes and verifies.
    const clean = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(clean.code, 0, describeRun(clean));
    const verify = await cluster.runCli(['--config', config, '--json', 'verify', clean.result!.id]);
    assert.equal(verify.code, 0, describeRun(verify));
  });
});

describe('connection resets and truncated responses from a TCP proxy in front of s3rver', () => {
  let cluster: TestCluster;
  let proxy: FaultProxy;
  before(async () => {
    // 60 × 256 KiB: ~120 draws of the reset below per direction, so a run without any reset (which
    // would test nothing and fail the test) has a chance of 0.9^120 ≈ 3·10⁻⁶; 30 chunks left it at
    // 0.2 %, and it happened.
    cluster = (await TestCluster.create({ kind: 's3rver', chunks: 60, chunkSize: 256 * 1024 })) as TestCluster;
    proxy = await proxyTo(cluster);
  });
  after(async () => {
    await proxy?.close();
    await cluster?.cleanup();
  });

  /** The backup reads the cluster bucket through the proxy; the restore reads the repository through it. */
  const backupViaProxy = (raw: Record<string, any>): void => {
    raw.cluster.objectStore.endpoint = `http://${proxy.address}`;
  };
  const restoreViaProxy = (raw: Record<string, any>): void => {
    raw.repository.endpoint = `http://${proxy.address}`;
  };

  test('connections reset mid-object (10% chance per 128 KiB of response) during backup and restore: both complete, data equal', { timeout: 600_000 }, async (t) => {
    proxy.setMode({ kind: 'reset', rate: 0.1, afterBytes: 128 * 1024 });
    const backup = await cluster.runCli(['--config', await cluster.writeConfig(backupViaProxy), '--json', '--yes', 'backup', '--concurrency', '4'], { timeoutMs: 90_000 });
    const backupResets = proxy.stats.resets;
    assert.equal(backup.code, 0, describeRun(backup));
    const restore = await cluster.runCli(['--config', await cluster.writeConfig(restoreViaProxy), '--json', '--yes', 'restore', 'latest', '--concurrency', '4'], { timeoutMs: 90_000 });
    const restoreResets = proxy.stats.resets - backupResets;
    proxy.setMode({ kind: 'pass' });
    assert.equal(restore.code, 0, describeRun(restore));
    assert.ok(backupResets > 0 && restoreResets > 0, `connections were reset during the backup (${backupResets}) and the restore (${restoreResets})`);
    const verify = await cluster.runCli(['--config', await cluster.writeConfig(), '--json', 'verify', backup.result!.id]);
    assert.equal(verify.code, 0, describeRun(verify));
    assert.deepEqual(compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints()), []);
    record(t, {
      category: 'network (TCP proxy)',
      fault: 'S3 connections reset (RST) mid-response: 10% chance at every 128 KiB a connection carries',
      runs: 3,
      detail: `backup, restore and verify completed; ${backupResets + restoreResets} connections reset (${backupResets} in the backup, ${restoreResets} in the restore); restored data equal`,
    });
  });

  test('responses truncated mid-object (a clean close; 10% chance per 100 KiB) during a backup: completes and verifies', { timeout: 600_000 }, async (t) => {
    // 60 new objects, ~150 draws: no truncation at all (0.9^150 ≈ 10⁻⁷) is out of reach. An object
    // crosses 2–3 draws per attempt (bytes count per keep-alive connection), so one truncated at
    // all 8 of its attempts is 0.19^8–0.27^8 each, 10⁻⁴–10⁻³ for the run. With 10 objects at 20 %,
    // no truncation at all was 1 %.
    await addChunksTo(cluster, 60, 256 * 1024);
    proxy.setMode({ kind: 'truncate', rate: 0.1, afterBytes: 100 * 1024 });
    const before = proxy.stats.truncations;
    const backup = await cluster.runCli(['--config', await cluster.writeConfig(backupViaProxy), '--json', '--yes', 'backup', '--concurrency', '4'], { timeoutMs: 90_000 });
    const truncations = proxy.stats.truncations - before;
    proxy.setMode({ kind: 'pass' });
    assert.equal(backup.code, 0, describeRun(backup));
    assert.ok(truncations > 0, 'responses were truncated');
    assert.equal(backup.result!.objects.newCount, 60);
    const verify = await cluster.runCli(['--config', await cluster.writeConfig(), '--json', 'verify', backup.result!.id]);
    assert.equal(verify.code, 0, describeRun(verify));
    record(t, {
      category: 'network (TCP proxy)',
      fault: 'S3 responses truncated (clean close) mid-response: 10% chance at every 100 KiB a connection carries',
      runs: 2,
      detail: `backup completed and verified; ${truncations} responses truncated`,
    });
  });
});

describe('the database connection dies during pg_dump (fs)', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: 5 })) as TestCluster;
    // ~40 MB of incompressible-ish rows, so pg_dump is mid-COPY long enough to be caught.
    await cluster.source.query(
      'pachyderm',
      `CREATE TABLE public.bulk AS SELECT g AS id, md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) AS filler
         FROM generate_series(1, 300000) g`,
    );
  });
  after(async () => cluster?.cleanup());

  async function dumpCopyBackends(): Promise<number[]> {
    const { rows } = await cluster.source.query<{ pid: number }>(
      'postgres',
      `SELECT pid FROM pg_stat_activity WHERE application_name = 'pachbackup' AND datname = 'pachyderm' AND query ILIKE 'COPY%' AND state = 'active'`,
    );
    return rows.map((r) => r.pid);
  }

  test('pg_terminate_backend of the pg_dump session mid-COPY: clear error, resumed, nothing sealed', { timeout: 300_000 }, async (t) => {
    await cluster.resetMarker();
    const config = await cluster.writeConfig();
    // The dump upload waits 4 s before reading, so pg_dump blocks mid-COPY on a full pipe meanwhile.
    const { done } = cluster.spawnCli(['--config', config, '--yes', 'backup', '--no-precopy'], {
      env: faultsEnv([{ store: 'repository', op: 'put', keyContains: '/db/pachyderm.dump', kind: 'delay', ms: 4000 }]),
    });
    let finished: CliResult | undefined;
    void done.then((r) => (finished = r), () => undefined);
    let terminated = 0;
    const deadline = Date.now() + 120_000;
    while (terminated === 0) {
      if (finished) assert.fail(`the backup ended before pg_dump was caught: ${describeRun(finished)}`);
      if (Date.now() > deadline) assert.fail('pg_dump was not seen running COPY within 120 s');
      for (const pid of await dumpCopyBackends()) {
        const { rows } = await cluster.source.query<{ ok: boolean }>('postgres', 'SELECT pg_terminate_backend($1) AS ok', [pid]);
        if (rows[0]?.ok) terminated++;
      }
      await sleep(50);
    }
    const run = await done;
    assert.equal(run.code, EXIT_FAILED, describeRun(run));
    assert.match(run.stderr, /pachbackup: error: .*pg_dump/, `the error names pg_dump: ${describeRun(run)}`);
    assert.match(run.stderr, /terminating connection due to administrator command|server closed the connection/, `and says why: ${describeRun(run)}`);
    assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
    await assertNothingSealedNorPaused(cluster, config);
    record(t, {
      category: 'database',
      fault: 'pg_terminate_backend() of the pg_dump session while it streams COPY data',
      runs: 1,
      detail: `"${errorLine(run)}"; resumed; nothing sealed`,
    });
  });

  test('the pg_dump connection reset by a TCP proxy after 2 MiB: clear error, resumed, nothing sealed; then a backup succeeds', { timeout: 300_000 }, async (t) => {
    await cluster.resetMarker();
    const proxy = await startFaultProxy({ target: { host: cluster.source.host, port: cluster.source.port } });
    try {
      const config = await cluster.writeConfig((raw) => {
        raw.cluster.postgres.port = proxy.port;
      });
      proxy.setMode({ kind: 'reset', afterBytes: 2 * 1024 * 1024 });
      const run = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy']);
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.ok(proxy.stats.resets >= 1, 'the proxy reset a connection');
      assert.match(run.stderr, /pachbackup: error: .*pg_dump/, describeRun(run));
      assert.match(run.stderr, /connection|server closed|reset/i, describeRun(run));
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
      await assertNothingSealedNorPaused(cluster, config);
      record(t, {
        category: 'database',
        fault: 'the PostgreSQL connection of pg_dump reset (RST) by a TCP proxy after 2 MiB',
        runs: 2,
        detail: `"${errorLine(run)}"; resumed; nothing sealed; the next backup through the proxy succeeds`,
      });
      proxy.setMode({ kind: 'pass' });
      await cluster.resetMarker();
      const next = await cluster.runCli(['--config', config, '--json', '--yes', 'backup', '--no-precopy']);
      assert.equal(next.code, 0, describeRun(next));
    } finally {
      await proxy.close();
    }
  });
});

describe('a full disk under a filesystem repository (tmpfs)', () => {
  let cluster: TestCluster;
  let disk: string;
  let mounted = false;
  let skipReason: string | undefined;
  before(async () => {
    // 40 objects of 64 KiB: 2.5 MiB, more than the 2 MiB disk holds.
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: 40, chunkSize: 64 * 1024 })) as TestCluster;
    disk = join(cluster.work, 'small-disk');
    await mkdir(disk, { recursive: true });
  });
  after(async () => {
    if (mounted) await exec('umount', [disk]).catch(() => undefined);
    await cluster?.cleanup();
  });

  /** A fresh, empty 2 MiB filesystem at `disk`; false (with a skip reason) where mounting is not allowed. */
  async function freshDisk(): Promise<boolean> {
    if (skipReason) return false;
    if (mounted) {
      await exec('umount', [disk]);
      mounted = false;
    }
    try {
      await exec('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', disk]);
      mounted = true;
      return true;
    } catch (err) {
      skipReason = `cannot mount a 2 MiB tmpfs here (needs root): ${(err as Error).message.split('\n')[0]}`;
      return false;
    }
  }

  async function leftoverTempFiles(): Promise<string[]> {
    const out: string[] = [];
    const walk = async (dir: string): Promise<void> => {
      for (const entry of await readdir(dir, { withFileTypes: true })) {
        if (entry.isDirectory()) await walk(join(dir, entry.name));
        else if (entry.name.includes('.pbtmp-')) out.push(join(dir, entry.name));
      }
    };
    await walk(disk);
    return out;
  }

  const onSmallDisk = (raw: Record<string, any>): void => {
    raw.repository.url = pathToFileURL(disk).href;
  };

  test('the disk fills during the pre-copy: "no space left", never paused, nothing sealed, no partial files', { timeout: 300_000 }, async (t) => {
    if (!(await freshDisk())) return t.skip(skipReason);
    await cluster.resetMarker();
    const config = await cluster.writeConfig(onSmallDisk);
    const backup = await cluster.runCli(['--config', config, '--yes', 'backup']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    assert.match(errorLine(backup), /no space left/, describeRun(backup));
    assert.deepEqual(await cluster.markerLines(), [], 'never paused');
    await assertNothingSealedNorPaused(cluster, config);
    assert.deepEqual(await leftoverTempFiles(), [], 'no partial files left behind');
    record(t, { category: 'disk', fault: 'a 2 MiB filesystem under the repository fills during the pre-copy (2.5 MiB of objects)', runs: 1, detail: `"${errorLine(backup)}"; never paused; nothing sealed; no partial files` });
  });

  test('the disk fills while paused (no pre-copy): "no space left", resumed, nothing sealed', { timeout: 300_000 }, async (t) => {
    if (!(await freshDisk())) return t.skip(skipReason);
    await cluster.resetMarker();
    const config = await cluster.writeConfig(onSmallDisk);
    const backup = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    assert.match(errorLine(backup), /no space left/, describeRun(backup));
    assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
    await assertNothingSealedNorPaused(cluster, config);
    assert.deepEqual(await leftoverTempFiles(), [], 'no partial files left behind');
    record(t, { category: 'disk', fault: 'the repository filesystem fills while the cluster is paused', runs: 1, detail: `"${errorLine(backup)}"; resumed; nothing sealed; no partial files` });
  });

  test('a disk already full: refused in preflight before pausing; with room again, the backup succeeds', { timeout: 300_000 }, async (t) => {
    if (!(await freshDisk())) return t.skip(skipReason);
    await cluster.resetMarker();
    await exec('dd', ['if=/dev/zero', `of=${join(disk, 'filler')}`, 'bs=64k', 'count=64']).catch(() => undefined);
    const config = await cluster.writeConfig(onSmallDisk);
    const backup = await cluster.runCli(['--config', config, '--yes', 'backup']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    assert.match(errorLine(backup), /no space left/, describeRun(backup));
    assert.deepEqual(await cluster.markerLines(), [], 'never paused');
    assert.deepEqual(await cluster.sealedBackups(), []);
    await exec('mount', ['-o', 'remount,size=16m', disk]);
    const again = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(again.code, 0, describeRun(again));
    const verify = await cluster.runCli(['--config', config, '--json', 'verify', again.result!.id]);
    assert.equal(verify.code, 0, describeRun(verify));
    record(t, { category: 'disk', fault: 'the repository filesystem is already full when the backup starts; then grown', runs: 3, detail: `refused before pausing: "${errorLine(backup)}"; after growing the filesystem the backup succeeds and verifies` });
  });
});

describe('the TCP fault proxy itself', () => {
  test('pass, delay, reset after N bytes, truncate and blackhole behave as documented, and close() ends everything', { timeout: 60_000 }, async (t) => {
    const { createServer, connect } = await import('node:net');
    const payload = Buffer.alloc(300_000, 7);
    const echo = createServer((s) => s.on('error', () => undefined).once('data', () => s.end(payload)));
    await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
    const port = (echo.address() as { port: number }).port;
    const proxy = await startFaultProxy({ target: { host: '127.0.0.1', port } });
    const fetchOnce = (): Promise<{ bytes: number; error?: string; ms: number }> =>
      new Promise((resolve) => {
        const started = Date.now();
        let bytes = 0;
        const s = connect(proxy.port, '127.0.0.1', () => s.write('hi'));
        s.on('data', (d: Buffer) => (bytes += d.length));
        s.on('error', (err: NodeJS.ErrnoException) => resolve({ bytes, error: err.code ?? err.message, ms: Date.now() - started }));
        s.on('end', () => resolve({ bytes, ms: Date.now() - started }));
        s.setTimeout(1500, () => {
          s.destroy();
          resolve({ bytes, error: 'timeout', ms: Date.now() - started });
        });
      });
    try {
      assert.deepEqual((await fetchOnce()).bytes, payload.length, 'pass');
      proxy.setMode({ kind: 'delay', ms: 300 });
      const delayed = await fetchOnce();
      assert.equal(delayed.bytes, payload.length);
      assert.ok(delayed.ms >= 550, `delayed both ways (${delayed.ms} ms)`);
      proxy.setMode({ kind: 'reset', afterBytes: 100_000 });
      const reset = await fetchOnce();
      assert.equal(reset.error, 'ECONNRESET');
      assert.ok(reset.bytes <= 100_000, `at most 100000 bytes before the reset (${reset.bytes})`);
      proxy.setMode({ kind: 'truncate', afterBytes: 100_000 });
      const truncated = await fetchOnce();
      assert.deepEqual([truncated.bytes, truncated.error], [100_000, undefined], 'exactly 100000 bytes, then a clean end');
      proxy.setMode({ kind: 'reset', rate: 0 });
      assert.equal((await fetchOnce()).bytes, payload.length, 'rate 0 resets nothing');
      proxy.setMode({ kind: 'blackhole' });
      const black = await fetchOnce();
      assert.deepEqual([black.bytes, black.error], [0, 'timeout'], 'blackhole: connected, never answered');
      assert.deepEqual(
        { resets: proxy.stats.resets, truncations: proxy.stats.truncations, blackholed: proxy.stats.blackholed },
        { resets: 1, truncations: 1, blackholed: 1 },
      );
      const hanging = connect(proxy.port, '127.0.0.1');
      const closedByProxy = new Promise<void>((r) => hanging.on('close', () => r()));
      await new Promise((r) => hanging.on('connect', r));
      await sleep(50);
      await proxy.close();
      await closedByProxy;
      assert.equal(proxy.stats.active, 0, 'close() ended every connection');
    } finally {
      await proxy.close();
      echo.close();
    }
    record(t, { category: 'network (TCP proxy)', fault: 'the fault proxy: pass, delay, reset after N bytes, truncate, blackhole, close', runs: 7, detail: 'each mode observed from a client' });
  });
});

// Server-side copies (CopyObject) do not pass through the store decorator: rules of op `copy` apply
// to each copy call instead, under the ServerSideCopier, so the copier classifies an injected fault
// as it does the service's own errors: a retryable one (503 SlowDown) is retried and counted, any
// other switches server-side copying off for the rest of the run and the objects are streamed.
const copyFaultServers: Array<{ kind: StoreKind; label: string; skip: string | false }> = [
  { kind: 's3rver', label: 's3rver', skip: false },
  { kind: 'ceph', label: 'Ceph RGW', skip: cephRgwSkipReason() ?? false },
];

for (const { kind, label, skip } of copyFaultServers) {
  describe(`faults on server-side copies, op copy (${label})`, { skip }, () => {
    const total = 30;
    let cluster: TestCluster | undefined;
    let skipReason: string | undefined;
    before(async () => {
      const created = await TestCluster.create({ kind, chunks: total, chunkSize: 16 * 1024 });
      if (typeof created === 'string') skipReason = created;
      else cluster = created;
    });
    after(async () => cluster?.cleanup());

    /** The cluster, or undefined with the test marked skipped (Ceph RGW could not start). */
    const ready = (t: TestContext): TestCluster | undefined => {
      if (!cluster) t.skip(skipReason ?? 'the test cluster did not start');
      return cluster;
    };

    test('30% of server-side copies fail with 503 SlowDown: retried and counted; copied server-side; verifies; restored objects equal', { timeout: 600_000 }, async (t) => {
      const cluster = ready(t);
      if (!cluster) return;
      const config = await cluster.writeConfig();
      const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], {
        env: faultsEnv([{ store: 'repository', op: 'copy', kind: 'transient', rate: 0.3 }]),
      });
      assert.equal(run.code, 0, describeRun(run));
      const summary = run.result!;
      assert.equal(summary.objects.newCount, total);
      assert.equal(summary.copyPath, 'server-side', `every object was copied server-side, none streamed: ${describeRun(run)}`);
      const slowDowns: number = summary.retries.causes['SlowDown'] ?? 0;
      assert.ok(slowDowns > 0, `the retried copies are counted as SlowDown: ${JSON.stringify(summary.retries)}`);
      assert.ok(!run.events.some((e) => /server-side copy was not possible/.test(String(e.message))), 'a transient fault does not switch server-side copying off');
      const verify = await cluster.runCli(['--config', config, '--json', 'verify', summary.id]);
      assert.equal(verify.code, 0, describeRun(verify));
      const restore = await cluster.runCli(['--config', config, '--json', '--yes', 'restore', summary.id]);
      assert.equal(restore.code, 0, describeRun(restore));
      assert.deepEqual(compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints()), [], 'the restored cluster equals the source, object by object');
      record(t, {
        category: 'object store',
        fault: `30% of server-side copies (CopyObject) fail with 503 SlowDown (${label})`,
        runs: 3,
        detail: `backup sealed with copy path server-side, ${slowDowns} SlowDown retries counted; verify passed; restored data equal`,
      });
    });

    test('one server-side copy refused (403): server-side copying switches off with the key as reason, the rest is streamed; verifies', { timeout: 300_000 }, async (t) => {
      const cluster = ready(t);
      if (!cluster) return;
      const added = (await addChunksTo(cluster, 10)).sort();
      // In the middle of the key order: the copies before it were started server-side already.
      const refused = added[5]!;
      const config = await cluster.writeConfig();
      const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], {
        env: faultsEnv([{ store: 'repository', op: 'copy', keyContains: refused, kind: 'permanent' }]),
      });
      assert.equal(run.code, 0, `a refused copy falls back to streaming, like a service that refuses CopyObject: ${describeRun(run)}`);
      assert.equal(run.result!.objects.newCount, added.length);
      assert.equal(run.result!.copyPath, 'mixed', `copies before the refusal were server-side, the refused object and those after it streamed: ${describeRun(run)}`);
      const reason = run.events.find((e) => e.type === 'info' && /server-side copy was not possible/.test(String(e.message)));
      assert.ok(reason && String(reason.message).includes(refused) && /AccessDenied/.test(String(reason.message)), `the summary says why, naming the key: ${describeRun(run)}`);
      const verify = await cluster.runCli(['--config', config, '--json', 'verify', run.result!.id]);
      assert.equal(verify.code, 0, describeRun(verify));
      record(t, {
        category: 'object store',
        fault: `one server-side copy refused with 403 AccessDenied (${label})`,
        runs: 2,
        detail: `backup sealed with copy path ${run.result!.copyPath}: "${String(reason.message).slice(0, 200)}"; verify passed`,
      });
    });

    test('a server-side copy that keeps failing with 503 while paused: clear error naming the key, resumed, nothing sealed; the next backup copies only what is missing', { timeout: 300_000 }, async (t) => {
      const cluster = ready(t);
      if (!cluster) return;
      const added = (await addChunksTo(cluster, 10)).sort();
      const failing = added[3]!;
      await cluster.resetMarker();
      const sealedBefore = (await cluster.sealedBackups()).sort();
      const heldBefore = await repositoryObjectKeys(cluster);
      const config = await cluster.writeConfig();
      const failed = await cluster.runCli(['--config', config, '--json', '--yes', 'backup', '--no-precopy', '--concurrency', '2'], {
        env: faultsEnv([{ store: 'repository', op: 'copy', keyContains: failing, kind: 'transient' }]),
      });
      assert.equal(failed.code, EXIT_FAILED, describeRun(failed));
      assert.match(errorLine(failed), new RegExp(`${failing.replace(/[.]/g, '\\.')}.*SlowDown`), `one error, naming the key and the cause: ${describeRun(failed)}`);
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
      assert.deepEqual((await cluster.sealedBackups()).sort(), sealedBefore, 'nothing sealed');
      const status = await cluster.runCli(['--config', config, '--json', 'status']);
      assert.equal(status.result?.paused, false, describeRun(status));
      const copied = [...(await repositoryObjectKeys(cluster))].filter((key) => !heldBefore.has(key));
      assert.ok(!copied.includes(`objects/${failing}`), 'the failing object was not copied');

      await cluster.resetMarker();
      const next = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
      assert.equal(next.code, 0, describeRun(next));
      const summary = next.result!;
      assert.equal(summary.copyPath, 'server-side');
      assert.equal(
        summary.objects.newCount,
        added.length - copied.length,
        `the next backup copies exactly what the failed one did not (${added.length} - ${copied.length}): the failed run journaled its copies`,
      );
      const verify = await cluster.runCli(['--config', config, '--json', 'verify', summary.id]);
      assert.equal(verify.code, 0, describeRun(verify));
      record(t, {
        category: 'object store',
        fault: `one server-side copy fails with 503 SlowDown on every attempt, while paused; then a backup without the fault (${label})`,
        runs: 3,
        detail: `failed run: "${errorLine(failed)}"; resumed, nothing sealed, ${copied.length} of ${added.length} new objects copied; next backup copied ${summary.objects.newCount} server-side and verifies`,
      });
    });

    test('PACHBACKUP_FAULTS with a truncate rule for op copy: refused before anything is paused', { timeout: 120_000 }, async (t) => {
      const cluster = ready(t);
      if (!cluster) return;
      await cluster.resetMarker();
      const sealedBefore = (await cluster.sealedBackups()).sort();
      const run = await cluster.runCli(['--config', await cluster.writeConfig(), '--yes', 'backup'], {
        env: faultsEnv([{ store: 'repository', op: 'copy', kind: 'truncate' }]),
      });
      assert.notEqual(run.code, 0, describeRun(run));
      assert.match(errorLine(run), /PACHBACKUP_FAULTS is not a valid list of fault rules: kind truncate and reset .*op copy.*\(at \[0\]\.kind\)/, describeRun(run));
      assert.deepEqual(await cluster.markerLines(), [], 'never paused');
      assert.deepEqual((await cluster.sealedBackups()).sort(), sealedBefore);
      record(t, { category: 'bad input', fault: `PACHBACKUP_FAULTS rule {op: copy, kind: truncate} (${label})`, runs: 1, detail: `refused before pausing: "${errorLine(run)}"` });
    });
  });
}

test('fault rules of op copy: truncate and reset are refused at parse time, copy rules only for the repository; the others apply to each copy call', async (t) => {
  const parse = (rules: unknown[]): FaultRule[] => faultsFromEnv({ PACHBACKUP_FAULTS: JSON.stringify(rules) });
  for (const kind of ['truncate', 'reset']) {
    assert.throws(
      () => parse([{ store: 'repository', op: 'get', kind: 'transient' }, { store: 'repository', op: 'copy', kind }]),
      /^Error: PACHBACKUP_FAULTS is not a valid list of fault rules: kind truncate and reset break the body of a get; a server-side copy \(op copy\) streams no body through pachbackup: use transient, permanent or delay \(at \[1\]\.kind\)$/,
      kind,
    );
  }
  assert.throws(() => parse([{ store: 'cluster.objectStore', op: 'copy', kind: 'transient' }]), /op copy applies to store "repository".*\(at \[0\]\.store\)/);
  // truncate and reset stay valid for the operations that read a body.
  assert.equal(parse([{ store: 'repository', op: 'get', kind: 'reset' }]).length, 1);
  const rules = parse([
    { store: 'repository', op: 'copy', keyContains: 'slow', kind: 'transient', limit: 1 },
    { store: 'repository', op: 'copy', keyContains: 'denied', kind: 'permanent' },
    { store: 'repository', op: 'copy', keyContains: 'late', kind: 'delay', ms: 150 },
  ]);
  const calls: string[] = [];
  const copy = async (key: string, size: number): Promise<{ key: string; size: number }> => {
    calls.push(key);
    return { key, size };
  };
  assert.equal(withCopyFaults('repository', copy, []), copy, 'without copy rules, the copy is not wrapped');
  assert.equal(withCopyFaults('repository', copy, parse([{ store: 'repository', op: 'put', kind: 'permanent' }])), copy, 'rules of other operations leave the copy alone');
  const faulty = withCopyFaults('repository', copy, rules);
  await assert.rejects(faulty('chunk/slow', 1), (err: unknown) => err instanceof StoreError && err.retryable && err.code === 'SlowDown' && /copy chunk\/slow/.test(err.message));
  assert.deepEqual(await faulty('chunk/slow', 1), { key: 'chunk/slow', size: 1 }, 'limit 1: the second call goes through');
  await assert.rejects(faulty('chunk/denied', 2), (err: unknown) => err instanceof StoreError && !err.retryable && /copy chunk\/denied: AccessDenied/.test(err.message));
  const started = Date.now();
  assert.deepEqual(await faulty('chunk/late', 3), { key: 'chunk/late', size: 3 });
  assert.ok(Date.now() - started >= 140, 'delay waits, then copies');
  assert.deepEqual(calls, ['chunk/slow', 'chunk/late'], 'a faulted call never reaches the service');
  record(t, { category: 'bad input', fault: 'PACHBACKUP_FAULTS rules of op copy with kind truncate or reset, or for another store than the repository', runs: 0, detail: 'refused at parse time with the rule and field named; transient, permanent and delay apply to each copy call' });
});

function errorLine(run: CliResult): string {
  const line = run.stderr.split('\n').find((l) => l.startsWith('pachbackup: error: ')) ?? run.events.find((e) => e.type === 'error')?.message ?? '';
  return line.replace(/^pachbackup: error: /, '').slice(0, 300);
}

/** Writes `count` more chunks the way pachd does (row, object, uploaded), so a backup has new work. */
async function addChunksTo(cluster: TestCluster, count: number, chunkSize = 16 * 1024): Promise<string[]> {
  return (await addChunks(cluster.source, cluster.clusterStore(), count, { chunkSize })).keys;
}

/** A fault proxy (initially passing everything) in front of the cluster's S3 server. */
async function proxyTo(cluster: TestCluster): Promise<FaultProxy> {
  const endpoint = new URL(cluster.s3!.endpoint);
  return startFaultProxy({ target: { host: endpoint.hostname, port: Number(endpoint.port) } });
}
