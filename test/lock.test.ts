/**
 * Lease locks against real stores: the filesystem store (conditional create by link()), s3rver
 * (which ignores If-None-Match, so exclusion must come from write-then-list) and Ceph RGW (which
 * honours it), when installed. Then `pachbackup unlock` through the CLI.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Secret } from '../src/config/secret.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { S3ObjectStore } from '../src/objectstore/s3.js';
import { PreconditionFailedError, type ObjectStore } from '../src/objectstore/store.js';
import {
  acquireLock,
  listLocks,
  lockKindsConflict,
  lockKinds,
  LockConflictError,
  LockLostError,
  removeLocks,
  type LockEvent,
  type LockHandle,
  type LockInfo,
} from '../src/repository/lock.js';
import { Repository } from '../src/repository/repository.js';
import { cephRgwSkipReason, startCephRgw, startS3rver, withTempDir, type S3TestServer } from './helpers/servers.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'src', 'cli', 'main.js');

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Writes a lock file as another run would have: the test decides host, pid and heartbeat. */
async function plantLock(store: ObjectStore, id: string, fields: Partial<LockInfo>): Promise<void> {
  const now = new Date().toISOString();
  const info: LockInfo = { kind: 'exclusive', host: 'other-host', pid: 4242, command: 'pachbackup prune --keep-last 3', createdAt: now, heartbeatAt: now, leaseSeconds: 300, ...fields };
  await store.put(`locks/${id}.json`, Buffer.from(JSON.stringify(info)));
}

async function lockIds(store: ObjectStore): Promise<string[]> {
  return (await listLocks(store)).map((l) => l.id).sort();
}

function s3Store(server: S3TestServer, bucket: string, prefix: string): S3ObjectStore {
  return new S3ObjectStore({
    bucket,
    prefix,
    endpoint: server.endpoint,
    region: server.region,
    forcePathStyle: true,
    accessKeyId: new Secret(server.accessKeyId, 'test'),
    secretAccessKey: new Secret(server.secretAccessKey, 'test'),
    checksums: 'when_required',
    requestTimeoutSeconds: 30,
  });
}

/** The behaviours every store must give; `fresh` returns an empty store each call. */
function lockSuite(name: string, fresh: () => Promise<ObjectStore>, options: { honoursIfNoneMatch: boolean }): void {
  test(`${name}: the compatibility matrix: read/backup/exclusive`, async () => {
    const store = await fresh();
    for (const held of lockKinds) {
      for (const wanted of lockKinds) {
        const holder = await acquireLock(store, held, { command: `test ${held}` });
        try {
          if (lockKindsConflict(held, wanted)) {
            await assert.rejects(acquireLock(store, wanted, { command: `test ${wanted}` }), LockConflictError, `${wanted} while ${held} is held`);
          } else {
            const second = await acquireLock(store, wanted, { command: `test ${wanted}` });
            await second.release();
          }
        } finally {
          await holder.release();
        }
        assert.deepEqual(await lockIds(store), [], 'every lock is removed on release, the refused one too');
      }
    }
  });

  test(`${name}: a second backup is refused with the holder named: host, pid, command, since, last heartbeat`, async () => {
    const store = await fresh();
    const first = await acquireLock(store, 'backup', { command: 'pachbackup backup --mode online' });
    try {
      const [held] = await listLocks(store);
      assert.ok(held?.info);
      const err = await acquireLock(store, 'backup', { command: 'pachbackup backup' }).then(
        () => assert.fail('the second backup got the lock'),
        (e: unknown) => e,
      );
      assert.ok(err instanceof LockConflictError);
      for (const part of [hostname(), `pid ${process.pid}`, 'pachbackup backup --mode online', `since ${held.info.createdAt}`, 'last heartbeat', first.id]) {
        assert.ok(err.message.includes(part), `the message names ${part}: ${err.message}`);
      }
      assert.equal(err.holder.id, first.id);
      assert.deepEqual(await lockIds(store), [first.id]);
    } finally {
      await first.release();
    }
  });

  test(`${name}: a stale lock is taken over once its lease has run out, with a warning naming it`, async () => {
    const store = await fresh();
    await plantLock(store, 'exclusive-00000000000000aa', { leaseSeconds: 2, host: 'crashed-host', pid: 777 });
    await assert.rejects(acquireLock(store, 'backup', { command: 'pachbackup backup' }), /crashed-host/);
    await sleep(2300);
    const events: LockEvent[] = [];
    const lock = await acquireLock(store, 'backup', { command: 'pachbackup backup' }, { onEvent: (e) => events.push(e) });
    try {
      const warning = events.find((e) => e.type === 'warning' && e.message.includes('took over stale'));
      assert.ok(warning, `a takeover warning: ${JSON.stringify(events)}`);
      assert.match(warning.message, /exclusive-00000000000000aa.*crashed-host/);
      assert.deepEqual(await lockIds(store), [lock.id]);
    } finally {
      await lock.release();
    }
  });

  test(`${name}: the heartbeat keeps a lock alive past its lease`, async () => {
    const store = await fresh();
    const lock = await acquireLock(store, 'exclusive', { command: 'pachbackup prune' }, { leaseSeconds: 2 });
    try {
      await sleep(3000);
      const [entry] = await listLocks(store);
      assert.equal(entry?.state, 'live');
      assert.ok(Date.now() - Date.parse(entry.info!.heartbeatAt) < 2000, 'heartbeat refreshed');
      assert.notEqual(entry.info!.heartbeatAt, entry.info!.createdAt);
      await assert.rejects(acquireLock(store, 'read', { command: 'pachbackup verify' }), LockConflictError);
      lock.assertHeld();
    } finally {
      await lock.release();
    }
  });

  test(`${name}: a holder whose lock file was removed notices at its next heartbeat`, async () => {
    const store = await fresh();
    const events: LockEvent[] = [];
    const lock = await acquireLock(store, 'exclusive', { command: 'pachbackup prune' }, { leaseSeconds: 1.5, onEvent: (e) => events.push(e) });
    await removeLocks(store, [lock.id]);
    await sleep(1000);
    assert.ok(lock.signal.aborted, 'the lock is reported lost');
    assert.throws(() => lock.assertHeld(), LockLostError);
    assert.ok(events.some((e) => e.type === 'warning' && e.message.includes('lost lock')));
    assert.deepEqual(await lockIds(store), [], 'a lost lock is not written back');
    await lock.release();
  });

  test(`${name}: many runs racing for the exclusive lock: at most one wins, the losers leave nothing`, async (t) => {
    const store = await fresh();
    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => acquireLock(store, 'exclusive', { command: `racer ${i}` })));
    const won = results.filter((r): r is PromiseFulfilledResult<LockHandle> => r.status === 'fulfilled').map((r) => r.value);
    assert.ok(won.length <= 1, `${won.length} runs hold the exclusive lock at once`);
    t.diagnostic(`${won.length} of 8 racers won`);
    for (const r of results) if (r.status === 'rejected') assert.ok(r.reason instanceof LockConflictError, String(r.reason));
    assert.deepEqual(await lockIds(store), won.map((w) => w.id));
    for (const w of won) await w.release();
    // Backups racing a prune: the same rule across kinds.
    const mixed = await Promise.allSettled([
      acquireLock(store, 'exclusive', { command: 'prune' }),
      acquireLock(store, 'backup', { command: 'backup' }),
      acquireLock(store, 'backup', { command: 'backup 2' }),
    ]);
    const holders = mixed.filter((r): r is PromiseFulfilledResult<LockHandle> => r.status === 'fulfilled').map((r) => r.value);
    for (const a of holders) for (const b of holders) if (a !== b) assert.ok(!lockKindsConflict(a.kind, b.kind), `${a.kind} and ${b.kind} held together`);
    for (const h of holders) await h.release();
  });

  test(`${name}: a lock of a process that is gone from this host is stale at once`, async () => {
    const store = await fresh();
    const child = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    const deadPid = Number(child.stdout.toString());
    await plantLock(store, 'backup-00000000000000bb', { kind: 'backup', host: hostname(), pid: deadPid });
    const events: LockEvent[] = [];
    const lock = await acquireLock(store, 'exclusive', { command: 'pachbackup prune' }, { onEvent: (e) => events.push(e) });
    await lock.release();
    assert.ok(events.some((e) => e.message.includes(`process ${deadPid} no longer runs`)), JSON.stringify(events));
  });

  test(`${name}: the conditional create of a lock key ${options.honoursIfNoneMatch ? 'refuses an existing key' : 'is ignored, and exclusion still holds (above)'}`, async () => {
    const store = await fresh();
    await store.put('locks/exclusive-0000000000000001.json', Buffer.from('{}'), { ifNoneMatch: true });
    const second = store.put('locks/exclusive-0000000000000001.json', Buffer.from('{}'), { ifNoneMatch: true });
    if (options.honoursIfNoneMatch) await assert.rejects(second, PreconditionFailedError);
    else await second;
  });
}

describe('filesystem store', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const dir of dirs) await rm(dir, { recursive: true, force: true });
  });
  lockSuite('fs', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pachbackup-lock-'));
    dirs.push(dir);
    return new FsObjectStore(dir);
  }, { honoursIfNoneMatch: true });
});

describe('a holder that is alive but slow', () => {
  test('a holder whose heartbeat write hangs past its lease no longer believes it holds the lock once another run may take it over', async () => {
    await withTempDir(async (dir) => {
      const fs = new FsObjectStore(dir);
      // Every heartbeat (a put to an existing lock) hangs, as a PUT on a dead keep-alive socket
      // does until the request timeout (120 s by default, with up to 8 attempts) gives up.
      let hang = false;
      const hung: Array<() => void> = [];
      const store: ObjectStore = Object.create(fs, {
        put: {
          value: (key: string, body: Buffer, options?: object) =>
            hang && key.startsWith('locks/exclusive-') ? new Promise<void>((resolve) => hung.push(resolve)) : fs.put(key, body, options),
        },
      }) as ObjectStore;
      const first = await acquireLock(store, 'exclusive', { command: 'pachbackup prune --keep-last 1' }, { leaseSeconds: 1.5 });
      hang = true;
      try {
        // Its lease (1.5 s) runs out: the first heartbeat (after 0.5 s) is stuck in its write.
        await sleep(2200);
        const [entry] = await listLocks(fs);
        assert.equal(entry?.state, 'stale', 'others see the lock as stale');
        // A run that observes its lock's signal (a backup's paused phase) stops without asking.
        assert.ok(first.signal.aborted, 'the signal is not aborted while the heartbeat write hangs, past the age at which the holder gives its lock up');
        assert.ok(first.signal.reason instanceof LockLostError);
        const second = await acquireLock(fs, 'backup', { command: 'pachbackup backup' });
        try {
          assert.throws(() => first.assertHeld(), LockLostError, 'a backup now holds the repository, yet the prune still believes it holds its exclusive lock');
        } finally {
          await second.release();
        }
      } finally {
        hang = false;
        for (const resolve of hung) resolve();
        await first.release();
      }
    });
  });
});

describe('a lock removed with unlock --force while its holder heartbeats', () => {
  test('the holder notices even when the removal lands between its heartbeat\'s check and its write', async () => {
    await withTempDir(async (dir) => {
      const fs = new FsObjectStore(dir);
      let between: (() => Promise<void>) | undefined;
      let holderKey = '';
      const store: ObjectStore = Object.create(fs, {
        put: {
          value: async (key: string, body: Buffer, options?: object) => {
            const hook = key === holderKey ? between : undefined;
            if (hook) {
              between = undefined;
              await hook();
            }
            return fs.put(key, body, options);
          },
        },
      }) as ObjectStore;
      const first = await acquireLock(store, 'exclusive', { command: 'pachbackup prune --keep-last 1' }, { leaseSeconds: 1.5 });
      holderKey = first.key;
      let second: LockHandle | undefined;
      // The heartbeat has seen its file (stat); then an operator forces it away and a backup starts.
      between = async () => {
        await removeLocks(fs, [first.id]);
        // Its holder heartbeats (every 0.5 s): a lock never refreshed is a newcomer that died, not a holder.
        second = await acquireLock(fs, 'backup', { command: 'pachbackup backup' }, { leaseSeconds: 1.5 });
      };
      try {
        await sleep(2500);
        assert.ok(second, 'the backup took the repository after the forced unlock');
        assert.throws(() => first.assertHeld(), LockLostError, 'the prune still believes it holds its exclusive lock while a backup holds the repository');
      } finally {
        await second?.release();
        await first.release();
      }
    });
  });
});

describe('a newcomer that died between writing its lock and withdrawing it', () => {
  test('the holder keeps its lock: a conflicting lock that never heartbeats is not a run holding the repository', async () => {
    await withTempDir(async (dir) => {
      const store = new FsObjectStore(dir);
      const events: LockEvent[] = [];
      const holder = await acquireLock(store, 'backup', { command: 'pachbackup backup' }, { leaseSeconds: 1.5, onEvent: (e) => events.push(e) });
      try {
        // A second backup on another machine (a CronJob pod evicted, a laptop losing its network)
        // wrote its lock, saw ours and was gone before removing its own: that lock stays live for
        // its lease (300 s by default), never refreshed, and its run holds nothing.
        await sleep(100);
        await plantLock(store, 'backup-0123456789abcdef', { kind: 'backup', command: 'pachbackup backup' });
        // Three heartbeats of the holder (every 0.5 s).
        await sleep(1800);
        assert.doesNotThrow(() => holder.assertHeld(), `the holder gave up a lock it holds alone: ${events.map((e) => e.message).join('; ')}`);
      } finally {
        await holder.release();
      }
    });
  });
});

describe('s3rver (ignores If-None-Match)', () => {
  let server: S3TestServer;
  let n = 0;
  before(async () => {
    server = await startS3rver();
    await server.createBucket('locks');
  });
  after(async () => server?.stop());
  lockSuite('s3rver', async () => s3Store(server, 'locks', `repo-${n++}`), { honoursIfNoneMatch: false });
});

describe('Ceph RGW', { skip: cephRgwSkipReason() ?? false, timeout: 600_000 }, () => {
  let server: S3TestServer | undefined;
  let skipReason: string | undefined;
  let n = 0;
  before(async () => {
    const started = await startCephRgw();
    if (typeof started === 'string') {
      skipReason = started;
      return;
    }
    server = started;
    await server.createBucket('locks');
  }, { timeout: 300_000 });
  after(async () => server?.stop());
  lockSuite('Ceph RGW', async () => {
    if (!server) throw new Error(`Ceph RGW did not start: ${skipReason}`);
    return s3Store(server, 'locks', `repo-${n++}`);
  }, { honoursIfNoneMatch: true });
});

describe('pachbackup unlock', () => {
  test('removes stale locks, leaves live ones unless forced, and says what it did', async () => {
    await withTempDir(async (dir) => {
      const repoDir = join(dir, 'repo');
      const store = new FsObjectStore(repoDir);
      await new Repository(store).open(true);
      const config = join(dir, 'pachbackup.yaml');
      await writeFile(config, `cluster:\n  postgres: {user: pachyderm}\n  objectStore: {url: "file://${join(dir, 'bucket')}"}\nrepository: {url: "file://${repoDir}"}\n`);
      const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '-c', config, ...args], { encoding: 'utf8' });

      const old = new Date(Date.now() - 3600_000).toISOString();
      await plantLock(store, 'backup-00000000000000c1', { kind: 'backup', createdAt: old, heartbeatAt: old, host: 'gone-host', pid: 11 });
      await plantLock(store, 'exclusive-00000000000000c2', { host: 'busy-host', pid: 22, command: 'pachbackup prune --keep-daily 7' });

      const first = cli('unlock');
      assert.equal(first.status, 0, first.stderr);
      assert.match(first.stdout, /removed stale backup lock backup-00000000000000c1 .*gone-host/);
      assert.match(first.stdout, /left live exclusive lock exclusive-00000000000000c2 .*busy-host.*--force/);
      assert.deepEqual(await lockIds(store), ['exclusive-00000000000000c2']);

      const refused = cli('unlock', 'exclusive-00000000000000c2');
      assert.equal(refused.status, 1);
      assert.deepEqual(await lockIds(store), ['exclusive-00000000000000c2']);

      assert.equal(cli('unlock', '--force').status, 2, '--force needs a lock id or --all');

      const forced = cli('--json', 'unlock', 'exclusive-00000000000000c2', '--force');
      assert.equal(forced.status, 0, forced.stderr);
      const lines = forced.stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string; message?: string; removed?: Array<{ id: string; state: string }> });
      assert.ok(lines.some((l) => l.type === 'warning' && l.message?.includes('REMOVING A LIVE LOCK') && l.message.includes('busy-host')));
      assert.deepEqual(lines.find((l) => l.type === 'result')?.removed?.map((r) => [r.id, r.state]), [['exclusive-00000000000000c2', 'live']]);
      assert.deepEqual(await lockIds(store), []);

      const none = cli('unlock', '--all');
      assert.equal(none.status, 0);
      assert.match(none.stdout, /no locks/);
    });
  });

  test('a prune blocked by a running holder names it; the holder is another process', async () => {
    await withTempDir(async (dir) => {
      const repoDir = join(dir, 'repo');
      const store = new FsObjectStore(repoDir);
      await new Repository(store).open(true);
      // A real second process holds the backup lock, heartbeating, until told to stop.
      const holder = spawn(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          `import { acquireLock } from ${JSON.stringify(new URL('../src/repository/lock.js', import.meta.url).href)};
           import { FsObjectStore } from ${JSON.stringify(new URL('../src/objectstore/fs.js', import.meta.url).href)};
           const lock = await acquireLock(new FsObjectStore(${JSON.stringify(repoDir)}), 'backup', { command: 'pachbackup backup --yes' });
           process.stdout.write('held\\n');
           process.stdin.once('data', async () => { await lock.release(); process.exit(0); });`,
        ],
        { stdio: ['pipe', 'pipe', 'inherit'] },
      );
      await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
      try {
        const err = await acquireLock(store, 'exclusive', { command: 'pachbackup prune' }).then(
          () => assert.fail('prune got the lock while a backup runs'),
          (e: unknown) => e as Error,
        );
        assert.match(err.message, new RegExp(`pid ${holder.pid} on ${hostname()}`));
        assert.match(err.message, /pachbackup backup --yes/);
      } finally {
        holder.stdin.write('stop\n');
        await new Promise((resolve) => holder.once('exit', resolve));
      }
      assert.deepEqual(await lockIds(store), []);
    });
  });
});
