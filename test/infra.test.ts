/**
 * Smoke tests of the test infrastructure itself: the throw-away PostgreSQL, the Pachyderm
 * fixture, s3rver and Ceph RGW. When these fail, every integration test built on them would.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { GetObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import {
  REFERENCED_KEYS_SQL,
  addChunks,
  chunkKey,
  createPachydermFixture,
  fixtureChunkBytes,
} from '../src/demo/pachydermFixture.js';
import { NotFoundError, type ObjectInfo, type ObjectStore, type PutOptions } from '../src/objectstore/store.js';
import { cephRgwSkipReason, startCephRgw, startS3rver, withTempDir, type S3TestServer } from './helpers/servers.js';

/** Just enough of an ObjectStore to watch what the fixture writes. */
class MemoryStore implements ObjectStore {
  readonly description = 'memory';
  readonly objects = new Map<string, Buffer>();

  async *list(prefix = ''): AsyncIterable<ObjectInfo> {
    for (const key of [...this.objects.keys()].sort()) {
      if (key.startsWith(prefix)) yield { key, size: this.objects.get(key)?.length ?? 0 };
    }
  }
  async stat(key: string): Promise<ObjectInfo | undefined> {
    const body = this.objects.get(key);
    return body === undefined ? undefined : { key, size: body.length };
  }
  async get(key: string): Promise<Readable> {
    const body = this.objects.get(key);
    if (body === undefined) throw new NotFoundError(`no object ${key}`);
    return Readable.from([body]);
  }
  async put(key: string, body: Readable | Buffer, _options?: PutOptions): Promise<void> {
    if (Buffer.isBuffer(body)) {
      this.objects.set(key, Buffer.from(body));
      return;
    }
    const parts: Buffer[] = [];
    for await (const part of body) parts.push(Buffer.from(part as Uint8Array));
    this.objects.set(key, Buffer.concat(parts));
  }
  async remove(keys: string[]): Promise<void> {
    for (const key of keys) this.objects.delete(key);
  }
  async check(): Promise<void> {}
}

async function referencedKeys(pg: LocalPostgres): Promise<string[]> {
  const result = await pg.query<{ key: string }>('pachyderm', REFERENCED_KEYS_SQL);
  return result.rows.map((row) => row.key).sort();
}

describe('local PostgreSQL and the Pachyderm fixture', () => {
  let pg: LocalPostgres;
  before(async () => {
    const started = Date.now();
    pg = await startLocalPostgres();
    console.log(`local PostgreSQL ${pg.majorVersion} started in ${Date.now() - started} ms on port ${pg.port}`);
  });
  after(async () => {
    await pg?.stop();
  });

  test('accepts password logins over TCP and refuses a wrong password', async () => {
    const { rows } = await pg.query<{ user: string; ssl: boolean }>(
      'postgres',
      'SELECT current_user AS user, coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS ssl',
    );
    assert.deepEqual(rows, [{ user: 'pbadmin', ssl: false }]);
    const psql = join(pg.binDir, 'psql');
    const bad = { ...process.env, ...pg.clientEnv(), PGPASSWORD: 'wrong' };
    assert.throws(() => execFileSync(psql, ['-c', 'SELECT 1'], { env: bad, stdio: 'pipe' }), /password authentication failed/);
    const out = execFileSync(psql, ['-tAc', 'SELECT 41 + 1'], { env: { ...process.env, ...pg.clientEnv() }, encoding: 'utf8' });
    assert.equal(out.trim(), '42');
  });

  test('fixture: REFERENCED_KEYS_SQL returns exactly the chunks written, and the store holds them', async () => {
    await pg.createDatabase('pachyderm');
    await pg.createDatabase('dex');
    await pg.createDatabase('dex'); // idempotent
    const store = new MemoryStore();
    const { keys } = await createPachydermFixture(pg, store, { chunks: 20, seed: 7, chunkSize: 1000 });

    assert.equal(keys.length, 20);
    assert.equal(new Set(keys).size, 20);
    for (const key of keys) assert.match(key, /^chunk\/[0-9a-f]{64}\.[0-9a-f]{16}$/);
    assert.deepEqual(await referencedKeys(pg), [...keys].sort());
    // Only the referenced chunks are objects: the in-flight and tombstoned rows have none.
    assert.deepEqual([...store.objects.keys()].sort(), [...keys].sort());
    assert.deepEqual(store.objects.get(keys[0] as string), fixtureChunkBytes(7, 0, 1000));
    const { rows } = await pg.query<{ n: string }>('pachyderm', 'SELECT count(*) AS n FROM storage.chunk_objects');
    assert.equal(rows[0]?.n, '22');

    // Writes during a backup: more chunks continue the sequence with new ids.
    const more = await addChunks(pg, store, 5, { seed: 7, chunkSize: 1000 });
    assert.equal(more.keys.length, 5);
    assert.deepEqual(await referencedKeys(pg), [...keys, ...more.keys].sort());
    assert.equal(store.objects.size, 25);
  });

  test('fixture: both databases hold Pachyderm- and Dex-shaped tables with rows', async () => {
    const tables = await pg.query<{ name: string }>(
      'pachyderm',
      `SELECT table_schema || '.' || table_name AS name FROM information_schema.tables
       WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1`,
    );
    const names = tables.rows.map((row) => row.name);
    for (const expected of [
      'storage.chunk_objects', 'storage.keys', 'storage.filesets', 'storage.tracker_objects', 'storage.tracker_refs',
      'pfs.repos', 'pfs.branches', 'pfs.commits', 'core.projects', 'auth.auth_tokens', 'collections.pipelines',
      'collections.jobs', 'public.migrations',
    ]) {
      assert.ok(names.includes(expected), `pachyderm database lacks ${expected}`);
    }
    for (const table of ['client', 'auth_request', 'auth_code', 'refresh_token', 'password', 'keys', 'offline_session', 'connector', 'migrations']) {
      const { rows } = await pg.query<{ n: string }>('dex', `SELECT count(*) AS n FROM public.${table}`);
      assert.ok(Number(rows[0]?.n) > 0, `dex.${table} is empty`);
    }
    const project = await pg.query<{ description: string; metadata: { tags: string[] } }>(
      'pachyderm',
      "SELECT description, metadata FROM core.projects WHERE name = 'images'",
    );
    assert.equal(project.rows[0]?.description, 'Imágenes y vídeo — 画像処理 🖼️');
    assert.deepEqual(project.rows[0]?.metadata.tags, ['gpu', 'nightly']);
    const key = await pg.query<{ data: Buffer }>('pachyderm', "SELECT data FROM storage.keys WHERE name = 'rotated-2024'");
    assert.deepEqual(key.rows[0]?.data.subarray(0, 4), Buffer.alloc(4));
  });

  test('chunkKey formats gen as 16 zero-padded hex digits', () => {
    assert.equal(chunkKey('9F86', 42), 'chunk/9f86.000000000000002a');
    assert.equal(chunkKey('ab', '18446744073709551615'), 'chunk/ab.ffffffffffffffff');
  });
});

test('local PostgreSQL with TLS', async (t) => {
  await withTempDir(async (dir) => {
    const certFile = join(dir, 'server.crt');
    const keyFile = join(dir, 'server.key');
    try {
      execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
        '-keyout', keyFile, '-out', certFile], { stdio: 'pipe' });
    } catch {
      t.skip('openssl is not installed');
      return;
    }
    const pg = await startLocalPostgres({ ssl: { certFile, keyFile }, password: "it's secret", user: 'tls_admin' });
    try {
      const { rows } = await pg.query<{ ssl: boolean }>('postgres', 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()');
      assert.deepEqual(rows, [{ ssl: true }]);
      assert.match(pg.connectionString('dex'), /^postgresql:\/\/tls_admin:it's%20secret@127\.0\.0\.1:\d+\/dex\?sslmode=require$/);
    } finally {
      await pg.stop();
    }
    assert.equal(existsSync(pg.baseDir), false, 'stop() removes the temp directory');
  });
});

async function putAndGet(server: S3TestServer, bucket: string): Promise<void> {
  await server.createBucket(bucket);
  const client = new S3Client(server.clientConfig);
  try {
    const body = Buffer.from('héllo from pachbackup\n');
    await client.send(new PutObjectCommand({ Bucket: bucket, Key: 'chunk/00ff.0000000000000001', Body: body }));
    const got = await client.send(new GetObjectCommand({ Bucket: bucket, Key: 'chunk/00ff.0000000000000001' }));
    assert.deepEqual(Buffer.from(await (got.Body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray()), body);
  } finally {
    client.destroy();
  }
}

test('s3rver: create a bucket, put and get an object', async () => {
  const server = await startS3rver();
  try {
    assert.match(server.endpoint, /^http:\/\/127\.0\.0\.1:\d+$/);
    await putAndGet(server, 'pachyderm-bucket');
  } finally {
    await server.stop();
  }
});

test('Ceph RGW: create a bucket, put and get an object', { skip: cephRgwSkipReason() ?? false, timeout: 180_000 }, async (t) => {
  const started = Date.now();
  const server = await startCephRgw();
  if (typeof server === 'string') {
    t.skip(server);
    return;
  }
  t.diagnostic(`Ceph RGW started in ${Date.now() - started} ms at ${server.endpoint}`);
  try {
    await putAndGet(server, 'pachyderm-bucket');
  } finally {
    const stopping = Date.now();
    await server.stop();
    t.diagnostic(`Ceph RGW stopped in ${Date.now() - stopping} ms`);
  }
});
