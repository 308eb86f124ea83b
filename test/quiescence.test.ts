/**
 * The quiescence check against a real (throw-away) PostgreSQL and a directory object store: other
 * clients of the pachyderm database and a bucket that changes between two listings are named.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { postgresSchema } from '../src/config/schema.js';
import { startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { pgServer, type PgServer } from '../src/postgres/connection.js';
import { checkQuiescent } from '../src/quiesce/quiescence.js';

describe('quiescence check (local PostgreSQL, directory store)', () => {
  let local: LocalPostgres | undefined;
  let server: PgServer;
  let dir: string;
  let store: FsObjectStore;

  before(async () => {
    local = await startLocalPostgres();
    // Created over the `postgres` database: a pool on `pachyderm` would itself be "another client".
    await local.createDatabase('pachyderm');
    process.env['PACHBACKUP_TEST_QUIET_PGPASSWORD'] = local.password;
    server = pgServer(
      postgresSchema.parse({ host: local.host, port: local.port, user: local.user, password: { env: 'PACHBACKUP_TEST_QUIET_PGPASSWORD' }, sslmode: 'disable' }),
      'cluster.postgres',
    );
    dir = await mkdtemp(join(tmpdir(), 'pachbackup-quiet-'));
    store = new FsObjectStore(dir);
    await store.put('chunk/aa.0000000000000001', Buffer.from('one'));
    await store.put('chunk/bb.0000000000000001', Buffer.from('two'));
    await store.put('chunk/cc.0000000000000001', Buffer.from('three'));
  });

  after(async () => {
    await local?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  function client(applicationName: string): pg.Client {
    assert.ok(local);
    const c = new pg.Client({ host: local.host, port: local.port, user: local.user, password: local.password, database: 'pachyderm', application_name: applicationName });
    c.on('error', () => undefined);
    return c;
  }

  /** pg_stat_activity drops a session only once its backend has exited, a moment after the client closed. */
  async function waitUntilGone(applicationName: string): Promise<void> {
    assert.ok(local);
    for (let i = 0; i < 100; i++) {
      const { rowCount } = await local.query('postgres', 'SELECT 1 FROM pg_stat_activity WHERE application_name = $1', [applicationName]);
      if (rowCount === 0) return;
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.fail(`session ${applicationName} did not go away`);
  }

  test('a quiet database and bucket pass', async () => {
    assert.deepEqual(await checkQuiescent({ pg: server, database: 'pachyderm', store, settleMs: 200 }), { ok: true });
  });

  test('another client connected to the pachyderm database fails the check and is named', async () => {
    const pachd = client('pachd');
    await pachd.connect();
    try {
      const result = await checkQuiescent({ pg: server, database: 'pachyderm', store, settleMs: 100 });
      assert.equal(result.ok, false);
      assert.ok(!result.ok);
      assert.equal(result.problems.length, 1);
      const [problem] = result.problems;
      assert.match(problem!, /1 other client\(s\) still connected to database "pachyderm"/);
      assert.match(problem!, /application_name "pachd"/);
      assert.match(problem!, /client_addr 127\.0\.0\.1/);
      assert.match(problem!, new RegExp(`user ${local!.user}`));
      assert.match(problem!, /state idle/);

      // An idle session from before the pause can be tolerated on request (pg-bouncer's pool).
      const tolerated = await checkQuiescent({ pg: server, database: 'pachyderm', store, settleMs: 50, tolerateIdleSince: new Date(Date.now() + 1000) });
      assert.deepEqual(tolerated, { ok: true });
    } finally {
      await pachd.end();
    }
    await waitUntilGone('pachd');
    assert.deepEqual(await checkQuiescent({ pg: server, database: 'pachyderm', store, settleMs: 50 }), { ok: true });
  });

  test("pachbackup's own sessions, and clients of other databases, do not count", async () => {
    const own = client('pachbackup');
    await own.connect();
    assert.ok(local);
    const elsewhere = new pg.Client({ host: local.host, port: local.port, user: local.user, password: local.password, database: 'postgres', application_name: 'console' });
    await elsewhere.connect();
    try {
      assert.deepEqual(await checkQuiescent({ pg: server, database: 'pachyderm', store, settleMs: 50 }), { ok: true });
    } finally {
      await own.end();
      await elsewhere.end();
    }
  });

  test('a bucket that changes between the two listings fails the check, naming what changed', async () => {
    const writer = setTimeout(() => {
      void (async () => {
        await store.put('chunk/dd.0000000000000001', Buffer.from('new object'));
        await store.put('chunk/bb.0000000000000001', Buffer.from('two, rewritten'));
        await store.remove(['chunk/cc.0000000000000001']);
      })();
    }, 100);
    let result;
    try {
      result = await checkQuiescent({ pg: server, database: 'pachyderm', store, settleMs: 400 });
    } finally {
      clearTimeout(writer);
    }
    assert.equal(result.ok, false);
    assert.ok(!result.ok);
    assert.equal(result.problems.length, 1);
    const [problem] = result.problems;
    assert.match(problem!, /changed between two listings \d+ ms apart/);
    assert.match(problem!, /1 added: chunk\/dd\.0000000000000001 \(10 bytes\)/);
    assert.match(problem!, /1 changed: chunk\/bb\.0000000000000001 \(3 → 14 bytes, new etag\)/);
    assert.match(problem!, /1 removed: chunk\/cc\.0000000000000001/);
  });
});
