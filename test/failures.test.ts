/**
 * Failures during a backup or a restore, through the real CLI process with faults injected into
 * its stores (PACHBACKUP_FAULTS): once a pause began, the resume command always runs — on an
 * error, on Ctrl-C and on a hangup — and nothing that looks like a complete backup is left
 * behind; a restore that fails takes back what it created.
 */
import assert from 'node:assert/strict';
import { addChunks } from '../src/demo/pachydermFixture.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { describeRun, TestCluster, withFaults, type CliResult, type StoreKind } from './helpers/cluster.js';

const EXIT_FAILED = 1;
const EXIT_INTERRUPTED = 130;

function faults(rules: unknown[]): Record<string, string> {
  return { PACHBACKUP_FAULTS: JSON.stringify(rules) };
}

/**
 * No backup was sealed since `sealedBefore` (the tests of a group share one repository, where an
 * earlier test's mistake must not fail the next), and no pause is recorded. `leftFiles`: the
 * failed backup wrote files, so it is listed as incomplete.
 */
async function assertNothingSealed(cluster: TestCluster, config: string, sealedBefore: string[], leftFiles = true): Promise<void> {
  assert.deepEqual(await cluster.sealedBackups(), sealedBefore, 'no new manifest in the repository');
  const list = await cluster.runCli(['--config', config, '--json', 'list']);
  assert.equal(list.code, 0, describeRun(list));
  assert.deepEqual(list.result?.backups.map((b: { id: string }) => b.id), sealedBefore, `list shows no new complete backup: ${list.stdout}`);
  if (leftFiles) assert.ok(list.result?.incomplete.length >= 1, `the interrupted backup is listed as incomplete: ${list.stdout}`);
  const status = await cluster.runCli(['--config', config, '--json', 'status']);
  assert.equal(status.code, 0, describeRun(status));
  assert.equal(status.result?.paused, false, 'no pause left in the ledger');
}

// With s3rver the repository is a directory: objects then stream through pachbackup (a repository in
// the same S3 service would get server-side copies, which only fault rules of op `copy` reach).
for (const kind of ['fs', 's3rver'] as StoreKind[]) {
  describe(`backup failures (${kind} cluster store)`, () => {
    let cluster: TestCluster;
    before(async () => {
      cluster = (await TestCluster.create({ kind, target: false, chunks: 30, repositoryKind: 'fs' })) as TestCluster;
    });
    after(async () => {
      await cluster?.cleanup();
    });

    test('the object store fails permanently mid-copy (while paused): resume still runs, nothing sealed', { timeout: 300_000 }, async () => {
      await cluster.resetMarker();
      const sealedBefore = await cluster.sealedBackups();
      const config = await cluster.writeConfig();
      const run = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy', '--concurrency', '2'], {
        env: faults([{ store: 'cluster.objectStore', op: 'get', after: 5, kind: 'permanent' }]),
      });
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stderr, /pachbackup: error: .*(injected fault|AccessDenied)/, describeRun(run));
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
      await assertNothingSealed(cluster, config, sealedBefore);
    });

    test('the repository fails while a database dump streams into it: resume still runs, nothing sealed', { timeout: 300_000 }, async () => {
      await cluster.resetMarker();
      const sealedBefore = await cluster.sealedBackups();
      const config = await cluster.writeConfig();
      const run = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy'], {
        env: faults([{ store: 'repository', op: 'put', keyContains: '/db/', kind: 'permanent' }]),
      });
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      // The real cause (the repository refused the write), not pg_dump being killed because of it.
      assert.match(run.stderr, /pachbackup: error: .*(injected fault|AccessDenied).*\.dump/, describeRun(run));
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
      await assertNothingSealed(cluster, config, sealedBefore);
    });

    test('one database dump fails: the other dump is stopped with it, and nothing of the backup is written after it failed', { timeout: 300_000 }, async () => {
      await cluster.resetMarker();
      const sealedBefore = await cluster.sealedBackups();
      const dumpKeys = async (): Promise<string[]> => {
        const keys: string[] = [];
        for await (const info of cluster.repositoryStore().list('backups/')) if (info.key.includes('/db/')) keys.push(info.key);
        return keys;
      };
      const before = await dumpKeys();
      // The dex dump's upload is refused at once; the pachyderm dump's upload starts 3 s late.
      const error = await withFaults(
        [
          { store: 'repository', op: 'put', keyContains: '/db/dex', kind: 'permanent' },
          { store: 'repository', op: 'put', keyContains: '/db/pachyderm', kind: 'delay', ms: 3000 },
        ],
        () => cluster.backup((raw) => void (raw.backup.precopy = false)).then(() => undefined, (err: Error) => err),
      );
      assert.match(error?.message ?? 'the backup succeeded', /injected fault|AccessDenied/);
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
      // Past the delay: a pachyderm dump still running would have written its file by now.
      await sleep(4000);
      assert.deepEqual(await dumpKeys(), before, 'no dump file appeared after the backup failed');
      assert.deepEqual(await cluster.sealedBackups(), sealedBefore);
    });

    test('a failure before the pause (during pre-copy) never pauses the cluster, nothing sealed', { timeout: 300_000 }, async () => {
      await cluster.resetMarker();
      // The earlier tests' copies are held (journaled) by now: new objects give the pre-copy work.
      await addChunks(cluster.source, cluster.clusterStore(), 6, { seed: 31 });
      const sealedBefore = await cluster.sealedBackups();
      const config = await cluster.writeConfig();
      const run = await cluster.runCli(['--config', config, '--yes', 'backup'], {
        env: faults([{ store: 'cluster.objectStore', op: 'get', after: 3, kind: 'permanent' }]),
      });
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.deepEqual(await cluster.markerLines(), [], 'never paused');
      await assertNothingSealed(cluster, config, sealedBefore);
    });

    // SIGHUP: the terminal closed (an ssh session dropped); Node's default for it is to die at once.
    for (const signal of ['SIGINT', 'SIGHUP'] as const) {
      test(`${signal} while paused: exit 130, resume runs after the pause, nothing sealed`, { timeout: 300_000 }, async () => {
        await cluster.resetMarker();
        const sealedBefore = await cluster.sealedBackups();
        const config = await cluster.writeConfig();
        // Every object read waits a second, so the paused copy phase lasts long enough to interrupt.
        const { child, done } = cluster.spawnCli(['--config', config, '--yes', 'backup', '--no-precopy', '--concurrency', '1'], {
          env: faults([{ store: 'cluster.objectStore', op: 'get', kind: 'delay', ms: 1000 }]),
        });
        let finished: CliResult | undefined;
        void done.then((r) => (finished = r), () => undefined);
        const deadline = Date.now() + 120_000;
        while (!(await cluster.markerLines()).includes('paused')) {
          if (finished) assert.fail(`the backup ended before pausing: ${describeRun(finished)}`);
          if (Date.now() > deadline) assert.fail('the backup did not pause within 120 s');
          await sleep(100);
        }
        assert.deepEqual(await cluster.markerLines(), ['paused'], 'paused and not yet resumed when interrupted');
        child.kill(signal);
        const run = await done;
        assert.equal(run.code, EXIT_INTERRUPTED, describeRun(run));
        assert.match(run.stderr, new RegExp(signal), describeRun(run));
        assert.match(run.stderr, /interrupted/, describeRun(run));
        assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'resumed after the pause');
        await assertNothingSealed(cluster, config, sealedBefore);
      });
    }

    test('the repository refuses the copy journal (written in the background) while paused: a failure of the backup, resume still runs, nothing sealed', { timeout: 300_000 }, async () => {
      await cluster.resetMarker();
      // New objects, so the paused copy phase has work, each read slowed down: it outlasts the
      // journal's 2 s flush interval, so a journal is written while objects are still copied.
      await addChunks(cluster.source, cluster.clusterStore(), 12, { seed: 41 });
      const sealedBefore = await cluster.sealedBackups();
      const config = await cluster.writeConfig();
      const run = await cluster.runCli(['--config', config, '--yes', 'backup', '--no-precopy', '--concurrency', '1'], {
        env: faults([
          { store: 'cluster.objectStore', op: 'get', kind: 'delay', ms: 400 },
          { store: 'repository', op: 'put', keyContains: '/journal/', kind: 'permanent' },
        ]),
      });
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stderr, /pachbackup: error: .*(injected fault|AccessDenied).*journal/, describeRun(run));
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'paused once, then resumed');
      // Its only files would have been journals.
      await assertNothingSealed(cluster, config, sealedBefore, false);
    });
  });
}

describe('restore failures take back what they created (fs)', () => {
  let cluster: TestCluster;
  let config: string;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 30 })) as TestCluster;
    await cluster.backup();
    config = await cluster.writeConfig();
  });
  after(async () => {
    await cluster?.cleanup();
  });

  async function assertTargetUntouched(): Promise<void> {
    assert.deepEqual(await cluster.targetDatabases(), [], 'no database left on the target server');
    assert.deepEqual(await cluster.restoredKeys(), [], 'no object left in the target store');
  }

  test('the target store fails while objects are restored: no objects, no databases left', { timeout: 300_000 }, async () => {
    const run = await cluster.runCli(['--config', config, '--yes', 'restore', 'latest', '--concurrency', '2'], {
      env: faults([{ store: 'restore.objectStore', op: 'put', after: 10, kind: 'permanent' }]),
      timeoutMs: 120_000,
    });
    assert.equal(run.code, EXIT_FAILED, describeRun(run));
    assert.match(run.stderr, /pachbackup: error: /, describeRun(run));
    await assertTargetUntouched();
  });

  test('reading the second dump fails after the first database was restored: both databases dropped, objects removed', { timeout: 300_000 }, async () => {
    // The first read of the dex dump is the preflight checksum check; the second is pg_restore's input.
    const run = await cluster.runCli(['--config', config, '--yes', 'restore', 'latest'], {
      env: faults([{ store: 'repository', op: 'get', keyContains: '/db/dex.dump', after: 1, kind: 'permanent' }]),
      timeoutMs: 60_000,
    });
    assert.equal(run.code, EXIT_FAILED, describeRun(run));
    assert.match(run.stderr, /pachbackup: error: .*dex.*(injected fault|AccessDenied)/, describeRun(run));
    await assertTargetUntouched();
  });

  test('a dump whose bytes break mid-stream (connection reset): both databases dropped, objects removed', { timeout: 300_000 }, async () => {
    const run = await cluster.runCli(['--config', config, '--yes', 'restore', 'latest'], {
      env: faults([{ store: 'repository', op: 'get', keyContains: '/db/dex.dump', after: 1, kind: 'reset' }]),
      timeoutMs: 120_000,
    });
    assert.equal(run.code, EXIT_FAILED, describeRun(run));
    await assertTargetUntouched();
  });

  test('after the failures, the same restore succeeds into the same targets', { timeout: 300_000 }, async () => {
    const run = await cluster.runCli(['--config', config, '--yes', 'restore', 'latest'], { timeoutMs: 120_000 });
    assert.equal(run.code, 0, describeRun(run));
    assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm']);
  });
});
