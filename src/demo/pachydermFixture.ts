/**
 * A small but Pachyderm-shaped cluster state for the demo and the tests: the `pachyderm` database
 * with the schemas and tables pachd creates (storage, pfs, core, auth, identity, license,
 * collections, public.migrations), the `dex` database with Dex's SQL storage, and chunk objects in
 * an object store written in pachd's order (row, then object, then `uploaded = TRUE`).
 *
 * Column sets follow Pachyderm 2.11's migrations closely enough to exercise what a backup must
 * carry (bytea, jsonb, enums, arrays, timestamps, NULLs, unicode, sequences, a trigger and a
 * function, circular foreign keys); the data is invented. All of it is deterministic for a seed,
 * except timestamps taken from the server clock.
 */
import { createCipheriv, createHash } from 'node:crypto';
import type { ObjectStore } from '../objectstore/store.js';

/** The one thing the fixture needs from a PostgreSQL connection: run a statement in a database. */
export interface SqlExecutor {
  query(database: string, sql: string, params?: readonly unknown[]): Promise<{ rows: Record<string, unknown>[] }>;
}

export interface FixtureDatabases {
  pachyderm: string;
  dex: string;
}

export interface PachydermFixtureOptions {
  /** Database names; default `pachyderm` and `dex`. */
  databases?: FixtureDatabases;
  /** Chunk objects to write; default 20. */
  chunks?: number;
  /** Seed for chunk ids, chunk bytes and row ids; default 1. */
  seed?: number;
  /** Bytes per chunk object; default 4096. */
  chunkSize?: number;
  /** Chunks written at the same time; default 8. */
  concurrency?: number;
}

export interface AddChunksOptions {
  /** Name of the `pachyderm` database; default `pachyderm`. */
  database?: string;
  seed?: number;
  chunkSize?: number;
  concurrency?: number;
  /**
   * Index of the first new chunk in the seeded sequence. Default: the number of rows already in
   * `storage.chunk_objects`, so successive calls continue the sequence instead of repeating ids.
   */
  firstIndex?: number;
}

export interface FixtureChunks {
  /** Object keys written (and referenced by the database), in chunk order. */
  keys: string[];
  /** Total bytes written to the store. */
  bytes: number;
}

/** Every object key the metadata references: the one query, shared with the backup engine. */
export { REFERENCED_KEYS_SQL } from '../postgres/snapshot.js';

/** The object key pachd uses for a chunk: `chunk/<hex id>.<gen as 16 zero-padded hex digits>`. */
export function chunkKey(chunkIdHex: string, gen: bigint | number | string): string {
  return `chunk/${chunkIdHex.toLowerCase()}.${BigInt(gen).toString(16).padStart(16, '0')}`;
}

/** The 32-byte id of the `index`-th chunk of a seed (lower-case hex). */
export function fixtureChunkId(seed: number, index: number): string {
  return sha256(`pachbackup-fixture chunk-id ${seed} ${index}`).toString('hex');
}

/** The bytes of the `index`-th chunk of a seed: a pseudo-random stream, cheap to regenerate for checks. */
export function fixtureChunkBytes(seed: number, index: number, size: number): Buffer {
  const key = sha256(`pachbackup-fixture chunk-bytes ${seed}`);
  // Counter blocks of different chunks start 2^64 blocks apart, so their streams never overlap.
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64BE(BigInt(index), 0);
  const cipher = createCipheriv('aes-256-ctr', key, iv);
  return Buffer.concat([cipher.update(Buffer.alloc(size)), cipher.final()]);
}

/**
 * Creates the schemas, tables and rows of both databases and writes `chunks` chunk objects.
 * The databases are created when missing (through the `postgres` maintenance database); when
 * they exist they must be empty: the fixture does not merge into an existing schema and fails
 * on the first table that is already there.
 */
export async function createPachydermFixture(
  pg: SqlExecutor,
  store: ObjectStore,
  options: PachydermFixtureOptions = {},
): Promise<FixtureChunks> {
  const databases = options.databases ?? { pachyderm: 'pachyderm', dex: 'dex' };
  const seed = options.seed ?? 1;
  await ensureDatabase(pg, databases.pachyderm);
  await ensureDatabase(pg, databases.dex);

  await runAll(pg, databases.pachyderm, PACHYDERM_SCHEMA);
  await insertPachydermRows(pg, databases.pachyderm, seed);
  await insertUnreferencedChunkRows(pg, databases.pachyderm, seed);
  await runAll(pg, databases.dex, DEX_SCHEMA);
  await insertDexRows(pg, databases.dex, seed);

  return addChunks(pg, store, options.chunks ?? 20, {
    database: databases.pachyderm,
    seed,
    chunkSize: options.chunkSize ?? 4096,
    concurrency: options.concurrency ?? 8,
    firstIndex: 0,
  });
}

/**
 * Writes `count` more chunks the way pachd does, each: tracker object row, `chunk_objects` row
 * with `uploaded = FALSE`, the object, then `uploaded = TRUE`. So at every moment the referenced
 * keys are a subset of the objects in the store, which is what lets tests write during a backup.
 */
export async function addChunks(
  pg: SqlExecutor,
  store: ObjectStore,
  count: number,
  options: AddChunksOptions = {},
): Promise<FixtureChunks> {
  const database = options.database ?? 'pachyderm';
  const seed = options.seed ?? 1;
  const chunkSize = options.chunkSize ?? 4096;
  const concurrency = Math.max(1, options.concurrency ?? 8);
  const firstIndex =
    options.firstIndex ?? Number((await pg.query(database, 'SELECT count(*) AS n FROM storage.chunk_objects')).rows[0]?.['n'] ?? 0);

  const keys = new Array<string>(count);
  let next = 0;
  const writeNext = async (): Promise<void> => {
    while (next < count) {
      const position = next++;
      keys[position] = await writeChunk(pg, store, database, seed, firstIndex + position, chunkSize);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, writeNext));
  return { keys, bytes: count * chunkSize };
}

async function writeChunk(
  pg: SqlExecutor,
  store: ObjectStore,
  database: string,
  seed: number,
  index: number,
  size: number,
): Promise<string> {
  const idHex = fixtureChunkId(seed, index);
  const id = Buffer.from(idHex, 'hex');
  await pg.query(
    database,
    `INSERT INTO storage.tracker_objects (str_id, expires_at) VALUES ($1, now() + interval '1 day')
     ON CONFLICT (str_id) DO NOTHING`,
    [`chunk/${idHex}`],
  );
  const inserted = await pg.query(
    database,
    'INSERT INTO storage.chunk_objects (chunk_id, size) VALUES ($1, $2) RETURNING gen',
    [id, size],
  );
  const gen = inserted.rows[0]?.['gen'];
  if (typeof gen !== 'string' && typeof gen !== 'number' && typeof gen !== 'bigint') {
    throw new Error(`INSERT INTO storage.chunk_objects returned no gen (got ${String(gen)})`);
  }
  const key = chunkKey(idHex, gen);
  await store.put(key, fixtureChunkBytes(seed, index, size), { size, contentType: 'application/octet-stream' });
  await pg.query(
    database,
    'UPDATE storage.chunk_objects SET uploaded = TRUE, date_uploaded = now() WHERE chunk_id = $1 AND gen = $2',
    [id, String(gen)],
  );
  return key;
}

async function ensureDatabase(pg: SqlExecutor, name: string): Promise<void> {
  const found = await pg.query('postgres', 'SELECT 1 FROM pg_database WHERE datname = $1', [name]);
  if (found.rows.length === 0) await pg.query('postgres', `CREATE DATABASE "${name.replace(/"/g, '""')}"`);
}

async function runAll(pg: SqlExecutor, database: string, statements: readonly string[]): Promise<void> {
  for (const sql of statements) await pg.query(database, sql);
}

/**
 * Rows no backup should copy an object for: a chunk being uploaded (the object is not there
 * yet) and a chunk garbage collection has tombstoned and whose object it already deleted.
 */
async function insertUnreferencedChunkRows(pg: SqlExecutor, database: string, seed: number): Promise<void> {
  const uploading = sha256(`pachbackup-fixture uploading ${seed}`);
  const collected = sha256(`pachbackup-fixture collected ${seed}`);
  await pg.query(database, 'INSERT INTO storage.chunk_objects (chunk_id, size) VALUES ($1, 4096)', [uploading]);
  await pg.query(
    database,
    `INSERT INTO storage.chunk_objects (chunk_id, size, uploaded, tombstone, date_uploaded)
     VALUES ($1, 4096, TRUE, TRUE, now() - interval '3 days')`,
    [collected],
  );
}

const PACHYDERM_SCHEMA: readonly string[] = [
  'CREATE SCHEMA storage',
  'CREATE SCHEMA pfs',
  'CREATE SCHEMA core',
  'CREATE SCHEMA auth',
  'CREATE SCHEMA identity',
  'CREATE SCHEMA license',
  'CREATE SCHEMA collections',

  `CREATE TABLE public.migrations (
     id BIGINT PRIMARY KEY,
     name VARCHAR(250) NOT NULL,
     start_time TIMESTAMP NOT NULL,
     end_time TIMESTAMP
   )`,

  `CREATE TABLE storage.chunk_objects (
     chunk_id BYTEA NOT NULL,
     gen BIGSERIAL NOT NULL,
     uploaded BOOLEAN NOT NULL DEFAULT FALSE,
     tombstone BOOLEAN NOT NULL DEFAULT FALSE,
     size INT8 NOT NULL,
     date_uploaded TIMESTAMPTZ,
     PRIMARY KEY (chunk_id, gen)
   )`,
  `CREATE TABLE storage.keys (
     namespace VARCHAR(250) NOT NULL,
     name VARCHAR(250) NOT NULL,
     data BYTEA NOT NULL,
     PRIMARY KEY (namespace, name)
   )`,
  `CREATE TABLE storage.filesets (
     id UUID PRIMARY KEY,
     metadata_pb BYTEA NOT NULL,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
   )`,
  `CREATE TABLE storage.tracker_objects (
     int_id BIGSERIAL PRIMARY KEY,
     str_id VARCHAR(4096) UNIQUE NOT NULL,
     expires_at TIMESTAMP
   )`,
  `CREATE TABLE storage.tracker_refs (
     from_id INT8 NOT NULL REFERENCES storage.tracker_objects (int_id),
     to_id INT8 NOT NULL REFERENCES storage.tracker_objects (int_id),
     PRIMARY KEY (from_id, to_id)
   )`,
  'CREATE INDEX tracker_refs_to_id ON storage.tracker_refs (to_id)',
  `CREATE TABLE storage.cache (
     key TEXT PRIMARY KEY,
     value_pb BYTEA NOT NULL,
     ids UUID[] NOT NULL,
     accessed_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
   )`,

  `CREATE TABLE core.projects (
     id BIGSERIAL PRIMARY KEY,
     name VARCHAR(51) UNIQUE NOT NULL,
     description TEXT,
     metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
     created_by TEXT,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
     updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
   )`,
  `CREATE TABLE core.cluster_metadata (
     metadata JSONB NOT NULL DEFAULT '{}'::JSONB
   )`,

  "CREATE TYPE pfs.repo_type AS ENUM ('unknown', 'user', 'meta', 'spec')",
  "CREATE TYPE pfs.commit_origin AS ENUM ('ORIGIN_KIND_UNKNOWN', 'USER', 'AUTO', 'FSCK')",
  `CREATE TABLE pfs.repos (
     id BIGSERIAL PRIMARY KEY,
     name VARCHAR(63) NOT NULL,
     type pfs.repo_type NOT NULL,
     project_id BIGINT NOT NULL REFERENCES core.projects (id),
     description TEXT NOT NULL DEFAULT '',
     metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
     updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
     UNIQUE (name, project_id, type)
   )`,
  `CREATE TABLE pfs.commits (
     int_id BIGSERIAL PRIMARY KEY,
     commit_id VARCHAR(4096) UNIQUE NOT NULL,
     commit_set_id VARCHAR(4096) NOT NULL,
     repo_id BIGINT NOT NULL REFERENCES pfs.repos (id),
     branch_id BIGINT,
     origin pfs.commit_origin NOT NULL,
     description TEXT NOT NULL DEFAULT '',
     start_time TIMESTAMPTZ,
     finishing_time TIMESTAMPTZ,
     finished_time TIMESTAMPTZ,
     compacting_time_s BIGINT,
     validating_time_s BIGINT,
     error TEXT,
     size BIGINT,
     metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
     created_by TEXT,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
     updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
   )`,
  `CREATE TABLE pfs.branches (
     id BIGSERIAL PRIMARY KEY,
     name VARCHAR(255) NOT NULL,
     repo_id BIGINT NOT NULL REFERENCES pfs.repos (id),
     head BIGINT NOT NULL REFERENCES pfs.commits (int_id),
     metadata JSONB NOT NULL DEFAULT '{}'::JSONB,
     created_by TEXT,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
     updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
     UNIQUE (repo_id, name)
   )`,
  // Commits and branches reference each other, as in pachd: a restore must order this right.
  'ALTER TABLE pfs.commits ADD CONSTRAINT fk_commits_branch FOREIGN KEY (branch_id) REFERENCES pfs.branches (id) DEFERRABLE INITIALLY DEFERRED',
  `CREATE TABLE pfs.commit_ancestry (
     parent BIGINT NOT NULL REFERENCES pfs.commits (int_id),
     child BIGINT NOT NULL REFERENCES pfs.commits (int_id),
     PRIMARY KEY (parent, child)
   )`,
  `CREATE TABLE pfs.commit_provenance (
     from_id BIGINT NOT NULL REFERENCES pfs.commits (int_id),
     to_id BIGINT NOT NULL REFERENCES pfs.commits (int_id),
     PRIMARY KEY (from_id, to_id)
   )`,
  `CREATE TABLE pfs.commit_diffs (
     commit_int_id BIGINT NOT NULL REFERENCES pfs.commits (int_id),
     num BIGSERIAL NOT NULL,
     fileset_id UUID NOT NULL,
     PRIMARY KEY (commit_int_id, num)
   )`,
  `CREATE TABLE pfs.commit_totals (
     commit_int_id BIGINT PRIMARY KEY REFERENCES pfs.commits (int_id),
     fileset_id UUID NOT NULL
   )`,
  `CREATE TABLE pfs.branch_provenance (
     from_id BIGINT NOT NULL REFERENCES pfs.branches (id),
     to_id BIGINT NOT NULL REFERENCES pfs.branches (id),
     PRIMARY KEY (from_id, to_id)
   )`,
  `CREATE TABLE pfs.branch_triggers (
     from_branch_id BIGINT PRIMARY KEY REFERENCES pfs.branches (id),
     to_branch_id BIGINT NOT NULL REFERENCES pfs.branches (id),
     cron_spec TEXT,
     rate_limit_spec TEXT,
     size TEXT,
     num_commits BIGINT,
     all_conditions BOOLEAN NOT NULL DEFAULT FALSE
   )`,

  `CREATE TABLE auth.principals (
     subject VARCHAR(128) PRIMARY KEY
   )`,
  `CREATE TABLE auth.auth_tokens (
     token_hash VARCHAR(4096) PRIMARY KEY,
     subject VARCHAR(128) NOT NULL,
     expiration TIMESTAMPTZ,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
   )`,
  'CREATE INDEX auth_tokens_subject ON auth.auth_tokens (subject)',

  `CREATE TABLE identity.users (
     email VARCHAR(4096) PRIMARY KEY,
     last_authenticated TIMESTAMPTZ,
     enabled BOOLEAN NOT NULL DEFAULT TRUE
   )`,
  `CREATE TABLE identity.config (
     id SMALLINT PRIMARY KEY,
     issuer VARCHAR(4096),
     id_token_expiry VARCHAR(4096),
     rotation_token_expiry VARCHAR(4096)
   )`,

  `CREATE TABLE license.clusters (
     id VARCHAR(4096) PRIMARY KEY,
     address VARCHAR(4096) NOT NULL,
     secret VARCHAR(64) NOT NULL,
     cluster_deployment_id VARCHAR(4096),
     version VARCHAR(64) NOT NULL,
     auth_enabled BOOLEAN NOT NULL,
     is_enterprise_server BOOLEAN NOT NULL DEFAULT FALSE,
     client_id VARCHAR(4096),
     last_heartbeat TIMESTAMPTZ,
     created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
   )`,

  // pachd's collections: protobuf blobs keyed by name, with text index columns and a notify trigger.
  `CREATE FUNCTION collections.notify_watch() RETURNS TRIGGER AS $$
   DECLARE
     row RECORD;
   BEGIN
     IF TG_OP = 'DELETE' THEN row := OLD; ELSE row := NEW; END IF;
     PERFORM pg_notify('pwc_' || TG_TABLE_NAME, TG_OP || ' ' || row.key);
     RETURN row;
   END;
   $$ LANGUAGE plpgsql`,
  ...['pipelines', 'jobs', 'role_bindings', 'cluster_defaults', 'project_defaults'].flatMap((name) => [
    `CREATE TABLE collections.${name} (
       createdat TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
       updatedat TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
       proto BYTEA NOT NULL,
       key TEXT PRIMARY KEY${name === 'pipelines' ? ',\n       idx_version TEXT,\n       idx_authtoken TEXT' : ''}${name === 'jobs' ? ',\n       idx_pipeline TEXT,\n       idx_job_state TEXT' : ''}
     )`,
    `CREATE TRIGGER notify_watch AFTER INSERT OR UPDATE OR DELETE ON collections.${name}
       FOR EACH ROW EXECUTE PROCEDURE collections.notify_watch()`,
  ]),
];

async function insertPachydermRows(pg: SqlExecutor, db: string, seed: number): Promise<void> {
  const q = (sql: string, params: readonly unknown[] = []): Promise<unknown> => pg.query(db, sql, params);
  const migrations = ['init', 'create storage schema', 'add chunk_objects', 'pfs tables', 'core projects', 'metadata jsonb'];
  for (const [i, name] of migrations.entries()) {
    await q(
      "INSERT INTO public.migrations (id, name, start_time, end_time) VALUES ($1, $2, now() - ($3 || ' hours')::interval, now())",
      [i + 1, name, String(migrations.length - i)],
    );
  }

  await q('INSERT INTO core.cluster_metadata (metadata) VALUES ($1)', [
    JSON.stringify({ deployment_id: hex(seed, 'deployment', 16), environment: 'demo', 'région': 'eu-west-3' }),
  ]);
  await q(
    `INSERT INTO core.projects (name, description, metadata, created_by) VALUES
       ('default', 'The default project', '{}', NULL),
       ('images', 'Imágenes y vídeo — 画像処理 🖼️', $1, 'robot:ci'),
       ('empty', NULL, '{}', 'user:ana@example.com')`,
    [JSON.stringify({ team: 'vision', tags: ['gpu', 'nightly'], budget: { eur: 1200.5 } })],
  );

  await q(
    `INSERT INTO pfs.repos (name, type, project_id, description, metadata)
     SELECT r.name, r.type::pfs.repo_type, p.id, r.description, r.metadata::jsonb
     FROM (VALUES
       ('raw', 'user', 'images', 'Uploaded photos 📷', '{"owner":"ana"}'),
       ('edges', 'user', 'images', 'Output of the edges pipeline', '{}'),
       ('edges', 'spec', 'images', '', '{}'),
       ('edges', 'meta', 'images', '', '{}'),
       ('scratch', 'user', 'default', E'line one\\nline two\\ttabbed', '{"nested":{"a":[1,2,null]}}')
     ) AS r(name, type, project, description, metadata)
     JOIN core.projects p ON p.name = r.project`,
  );

  const repos = await pg.query(db, 'SELECT id, name, type FROM pfs.repos ORDER BY id');
  const commitsByRepo = new Map<string, string[]>();
  for (const repo of repos.rows) {
    const repoKey = `${String(repo['name'])}.${String(repo['type'])}`;
    const ids: string[] = [];
    for (let n = 0; n < 3; n++) {
      const commitId = hex(seed, `commit ${repoKey} ${n}`, 16);
      const finished = n < 2;
      const row = await pg.query(
        db,
        `INSERT INTO pfs.commits (commit_id, commit_set_id, repo_id, origin, description, start_time,
           finishing_time, finished_time, compacting_time_s, validating_time_s, error, size, metadata, created_by)
         VALUES ($1, $2, $3, $4, $5, now() - interval '2 hours', $6, $7, $8, $9, $10, $11, $12, $13)
         RETURNING int_id`,
        [
          `${repoKey}@${commitId}`,
          commitId,
          repo['id'],
          n === 0 ? 'USER' : 'AUTO',
          n === 2 ? 'open commit — still writing' : `commit ${n}`,
          finished ? new Date(Date.UTC(2024, 4, 1, 12, n, 30, 250)) : null,
          finished ? new Date(Date.UTC(2024, 4, 1, 12, n, 31, 500)) : null,
          finished ? 2 : null,
          finished ? 1 : null,
          n === 1 && repo['name'] === 'edges' ? 'pipeline failed: exit code 137 (OOMKilled)' : null,
          finished ? 1_048_576 * (n + 1) : null,
          JSON.stringify(n === 0 ? { source: 'upload', 'ключ': 'значение' } : {}),
          n === 0 ? 'user:ana@example.com' : null,
        ],
      );
      ids.push(String(row.rows[0]?.['int_id']));
    }
    commitsByRepo.set(repoKey, ids);
    await q('INSERT INTO pfs.commit_ancestry (parent, child) VALUES ($1, $2), ($2, $3)', ids);
    const head = ids[ids.length - 1];
    const branch = await pg.query(
      db,
      'INSERT INTO pfs.branches (name, repo_id, head, created_by) VALUES ($1, $2, $3, $4) RETURNING id',
      ['master', repo['id'], head, 'user:ana@example.com'],
    );
    await q('UPDATE pfs.commits SET branch_id = $1 WHERE repo_id = $2', [branch.rows[0]?.['id'], repo['id']]);
    for (const [n, commit] of ids.entries()) {
      const fileset = uuid(seed, `fileset ${repoKey} ${n}`);
      await q('INSERT INTO storage.filesets (id, metadata_pb) VALUES ($1, $2)', [fileset, bytes(seed, `fileset-pb ${fileset}`, 96)]);
      await q('INSERT INTO pfs.commit_diffs (commit_int_id, fileset_id) VALUES ($1, $2)', [commit, fileset]);
      await q('INSERT INTO pfs.commit_totals (commit_int_id, fileset_id) VALUES ($1, $2)', [commit, fileset]);
      await q("INSERT INTO storage.tracker_objects (str_id, expires_at) VALUES ($1, NULL)", [`fileset/${fileset}`]);
    }
  }
  const rawHead = commitsByRepo.get('raw.user')?.[0];
  const edgesHead = commitsByRepo.get('edges.user')?.[0];
  await q('INSERT INTO pfs.commit_provenance (from_id, to_id) VALUES ($1, $2)', [edgesHead, rawHead]);
  await q(
    `INSERT INTO pfs.branch_provenance (from_id, to_id)
     SELECT e.id, r.id FROM pfs.branches e, pfs.branches r
     WHERE e.repo_id = (SELECT id FROM pfs.repos WHERE name = 'edges' AND type = 'user')
       AND r.repo_id = (SELECT id FROM pfs.repos WHERE name = 'raw')`,
  );
  await q(
    `INSERT INTO pfs.branch_triggers (from_branch_id, to_branch_id, cron_spec, rate_limit_spec, size, num_commits, all_conditions)
     SELECT s.id, s.id, '@every 1h', NULL, '1G', 10, TRUE FROM pfs.branches s
     WHERE s.repo_id = (SELECT id FROM pfs.repos WHERE name = 'scratch')`,
  );
  await q(
    `INSERT INTO storage.tracker_refs (from_id, to_id)
     SELECT a.int_id, b.int_id FROM storage.tracker_objects a, storage.tracker_objects b
     WHERE a.str_id < b.str_id AND a.int_id % 3 = 0 AND b.int_id % 5 = 0`,
  );
  await q('INSERT INTO storage.cache (key, value_pb, ids) VALUES ($1, $2, $3::uuid[]), ($4, $5, $6::uuid[])', [
    'compaction/v1/a', bytes(seed, 'cache a', 40), [uuid(seed, 'cache a 1'), uuid(seed, 'cache a 2')],
    'compaction/v1/b', Buffer.from([0, 1, 2, 0, 255]), [],
  ]);

  // The keys that decrypt chunks: binary, with NUL bytes, which a text-only dump would corrupt.
  await q('INSERT INTO storage.keys (namespace, name, data) VALUES ($1, $2, $3), ($1, $4, $5)', [
    'chunk', 'default', bytes(seed, 'key default', 32), 'rotated-2024', Buffer.concat([Buffer.alloc(4), bytes(seed, 'key rotated', 28)]),
  ]);

  await q("INSERT INTO auth.principals (subject) VALUES ('user:ana@example.com'), ('robot:ci'), ('pach:root'), ('group:ingénieurs')");
  await q(
    `INSERT INTO auth.auth_tokens (token_hash, subject, expiration) VALUES
       ($1, 'user:ana@example.com', now() + interval '30 days'),
       ($2, 'robot:ci', NULL),
       ($3, 'pach:root', now() - interval '1 day')`,
    [hex(seed, 'token 1', 32), hex(seed, 'token 2', 32), hex(seed, 'token 3', 32)],
  );
  await q(
    `INSERT INTO identity.users (email, last_authenticated, enabled) VALUES
       ('ana@example.com', now() - interval '1 hour', TRUE),
       ('józef@example.com', NULL, FALSE)`,
  );
  await q("INSERT INTO identity.config (id, issuer, id_token_expiry, rotation_token_expiry) VALUES (1, 'http://pachd:1658/dex', '1d', NULL)");
  await q(
    `INSERT INTO license.clusters (id, address, secret, cluster_deployment_id, version, auth_enabled, is_enterprise_server, client_id, last_heartbeat)
     VALUES ('localhost', 'grpc://localhost:1653', $1, $2, '2.11.6', TRUE, TRUE, 'localhost', now())`,
    [hex(seed, 'license secret', 16), hex(seed, 'deployment', 16)],
  );

  await q(
    `INSERT INTO collections.pipelines (proto, key, idx_version, idx_authtoken) VALUES
       ($1, 'images/edges@1', 'images/edges@1', $2),
       ($3, 'images/edges@2', 'images/edges@2', $2),
       ($4, 'default/montage@1', 'default/montage@1', NULL)`,
    [bytes(seed, 'pipeline 1', 200), hex(seed, 'pipeline token', 16), bytes(seed, 'pipeline 2', 220), bytes(seed, 'pipeline 3', 150)],
  );
  await q(
    `INSERT INTO collections.jobs (proto, key, idx_pipeline, idx_job_state) VALUES
       ($1, $2, 'images/edges', 'JOB_SUCCESS'),
       ($3, $4, 'images/edges', 'JOB_FAILURE'),
       ($5, $6, 'default/montage', 'JOB_RUNNING')`,
    [
      bytes(seed, 'job 1', 120), `images/edges@${hex(seed, 'job 1', 16)}`,
      bytes(seed, 'job 2', 130), `images/edges@${hex(seed, 'job 2', 16)}`,
      bytes(seed, 'job 3', 90), `default/montage@${hex(seed, 'job 3', 16)}`,
    ],
  );
  await q("INSERT INTO collections.role_bindings (proto, key) VALUES ($1, 'CLUSTER:'), ($2, 'PROJECT:images')", [
    bytes(seed, 'rb cluster', 64), bytes(seed, 'rb project', 48),
  ]);
  await q("INSERT INTO collections.cluster_defaults (proto, key) VALUES ($1, '')", [Buffer.from('{"createPipelineRequest":{}}')]);
}

const DEX_SCHEMA: readonly string[] = [
  `CREATE TABLE migrations (
     num INTEGER NOT NULL,
     at TIMESTAMPTZ NOT NULL
   )`,
  `CREATE TABLE client (
     id TEXT NOT NULL PRIMARY KEY,
     secret TEXT NOT NULL,
     redirect_uris BYTEA NOT NULL,
     trusted_peers BYTEA NOT NULL,
     public BOOLEAN NOT NULL,
     name TEXT NOT NULL,
     logo_url TEXT NOT NULL
   )`,
  `CREATE TABLE auth_request (
     id TEXT NOT NULL PRIMARY KEY,
     client_id TEXT NOT NULL,
     response_types BYTEA NOT NULL,
     scopes BYTEA NOT NULL,
     redirect_uri TEXT NOT NULL,
     nonce TEXT NOT NULL,
     state TEXT NOT NULL,
     force_approval_prompt BOOLEAN NOT NULL,
     logged_in BOOLEAN NOT NULL,
     claims_user_id TEXT NOT NULL,
     claims_username TEXT NOT NULL,
     claims_email TEXT NOT NULL,
     claims_email_verified BOOLEAN NOT NULL,
     claims_groups BYTEA NOT NULL,
     claims_preferred_username TEXT NOT NULL DEFAULT '',
     connector_id TEXT NOT NULL,
     connector_data BYTEA,
     expiry TIMESTAMPTZ NOT NULL,
     code_challenge TEXT NOT NULL DEFAULT '',
     code_challenge_method TEXT NOT NULL DEFAULT '',
     hmac_key BYTEA
   )`,
  `CREATE TABLE auth_code (
     id TEXT NOT NULL PRIMARY KEY,
     client_id TEXT NOT NULL,
     scopes BYTEA NOT NULL,
     nonce TEXT NOT NULL,
     redirect_uri TEXT NOT NULL,
     claims_user_id TEXT NOT NULL,
     claims_username TEXT NOT NULL,
     claims_email TEXT NOT NULL,
     claims_email_verified BOOLEAN NOT NULL,
     claims_groups BYTEA NOT NULL,
     claims_preferred_username TEXT NOT NULL DEFAULT '',
     connector_id TEXT NOT NULL,
     connector_data BYTEA,
     expiry TIMESTAMPTZ NOT NULL,
     code_challenge TEXT NOT NULL DEFAULT '',
     code_challenge_method TEXT NOT NULL DEFAULT ''
   )`,
  `CREATE TABLE refresh_token (
     id TEXT NOT NULL PRIMARY KEY,
     client_id TEXT NOT NULL,
     scopes BYTEA NOT NULL,
     nonce TEXT NOT NULL,
     claims_user_id TEXT NOT NULL,
     claims_username TEXT NOT NULL,
     claims_email TEXT NOT NULL,
     claims_email_verified BOOLEAN NOT NULL,
     claims_groups BYTEA NOT NULL,
     claims_preferred_username TEXT NOT NULL DEFAULT '',
     connector_id TEXT NOT NULL,
     connector_data BYTEA,
     token TEXT NOT NULL DEFAULT '',
     obsolete_token TEXT NOT NULL DEFAULT '',
     created_at TIMESTAMPTZ NOT NULL DEFAULT '0001-01-01 00:00:00 UTC',
     last_used TIMESTAMPTZ NOT NULL DEFAULT '0001-01-01 00:00:00 UTC'
   )`,
  `CREATE TABLE password (
     email TEXT NOT NULL PRIMARY KEY,
     hash BYTEA NOT NULL,
     username TEXT NOT NULL,
     user_id TEXT NOT NULL
   )`,
  `CREATE TABLE keys (
     id TEXT NOT NULL PRIMARY KEY,
     verification_keys BYTEA NOT NULL,
     signing_key BYTEA NOT NULL,
     signing_key_pub BYTEA NOT NULL,
     next_rotation TIMESTAMPTZ NOT NULL
   )`,
  `CREATE TABLE offline_session (
     user_id TEXT NOT NULL,
     conn_id TEXT NOT NULL,
     refresh BYTEA NOT NULL,
     connector_data BYTEA,
     PRIMARY KEY (user_id, conn_id)
   )`,
  `CREATE TABLE connector (
     id TEXT NOT NULL PRIMARY KEY,
     type TEXT NOT NULL,
     name TEXT NOT NULL,
     resource_version TEXT NOT NULL,
     config BYTEA
   )`,
];

async function insertDexRows(pg: SqlExecutor, db: string, seed: number): Promise<void> {
  const q = (sql: string, params: readonly unknown[] = []): Promise<unknown> => pg.query(db, sql, params);
  const json = (value: unknown): Buffer => Buffer.from(JSON.stringify(value));
  await q("INSERT INTO migrations (num, at) SELECT n, now() - (n || ' minutes')::interval FROM generate_series(1, 15) AS n");
  await q('INSERT INTO client VALUES ($1, $2, $3, $4, FALSE, $5, $6), ($7, $8, $9, $10, TRUE, $11, $12)', [
    'pachd', hex(seed, 'dex client pachd', 16), json(['http://localhost:30657/authorization-code/callback']), json([]), 'pachd', '',
    'console', hex(seed, 'dex client console', 16), json(['http://localhost:4000/oauth/callback/?inline=true']), json(['pachd']), 'Console — ダッシュボード', 'https://example.com/logo.png',
  ]);
  await q(
    `INSERT INTO auth_request (id, client_id, response_types, scopes, redirect_uri, nonce, state,
       force_approval_prompt, logged_in, claims_user_id, claims_username, claims_email, claims_email_verified,
       claims_groups, connector_id, connector_data, expiry, hmac_key)
     VALUES ($1, 'console', $2, $3, 'http://localhost:4000/oauth/callback/?inline=true', $4, $5,
       FALSE, FALSE, '', '', '', FALSE, $6, '', NULL, now() + interval '10 minutes', $7)`,
    [hex(seed, 'authreq', 12), json(['code']), json(['openid', 'email', 'groups']), hex(seed, 'nonce', 8), hex(seed, 'state', 8), json([]), bytes(seed, 'hmac', 32)],
  );
  await q(
    `INSERT INTO auth_code (id, client_id, scopes, nonce, redirect_uri, claims_user_id, claims_username,
       claims_email, claims_email_verified, claims_groups, connector_id, connector_data, expiry)
     VALUES ($1, 'pachd', $2, '', 'http://localhost:30657/authorization-code/callback', $3, 'ana', 'ana@example.com', TRUE, $4, 'local', $5, now() + interval '5 minutes')`,
    [hex(seed, 'authcode', 12), json(['openid']), hex(seed, 'user ana', 8), json(['ingénieurs']), json({ idToken: 'eyJhbGciOi...' })],
  );
  await q(
    `INSERT INTO refresh_token (id, client_id, scopes, nonce, claims_user_id, claims_username, claims_email,
       claims_email_verified, claims_groups, connector_id, connector_data, token, created_at, last_used)
     VALUES ($1, 'console', $2, '', $3, 'ana', 'ana@example.com', TRUE, $4, 'local', NULL, $5, now() - interval '1 day', now())`,
    [hex(seed, 'refresh', 12), json(['openid', 'offline_access']), hex(seed, 'user ana', 8), json([]), hex(seed, 'refresh token', 16)],
  );
  await q('INSERT INTO password VALUES ($1, $2, $3, $4), ($5, $6, $7, $8)', [
    'ana@example.com', Buffer.from('$2a$10$' + hex(seed, 'bcrypt ana', 26)), 'ana', hex(seed, 'user ana', 8),
    'józef@example.com', Buffer.from('$2a$10$' + hex(seed, 'bcrypt jozef', 26)), 'Józef Żółć', hex(seed, 'user jozef', 8),
  ]);
  await q("INSERT INTO keys VALUES ('keys', $1, $2, $3, now() + interval '6 hours')", [
    json([]), json({ kty: 'RSA', d: hex(seed, 'rsa d', 64) }), json({ kty: 'RSA', n: hex(seed, 'rsa n', 64), e: 'AQAB' }),
  ]);
  await q('INSERT INTO offline_session VALUES ($1, $2, $3, NULL)', [hex(seed, 'user ana', 8), 'local', json({ console: { id: hex(seed, 'refresh', 12) } })]);
  await q("INSERT INTO connector VALUES ('local', 'local', 'Email', '1', NULL), ('github', 'github', 'GitHub', '3', $1)", [
    json({ clientID: 'abc', clientSecret: hex(seed, 'github secret', 20), redirectURI: 'http://localhost:30658/callback' }),
  ]);
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** Deterministic pseudo-random bytes for a seed and a purpose. */
function bytes(seed: number, purpose: string, length: number): Buffer {
  const out: Buffer[] = [];
  for (let block = 0; out.length * 32 < length; block++) out.push(sha256(`pachbackup-fixture ${seed} ${purpose} ${block}`));
  return Buffer.concat(out).subarray(0, length);
}

function hex(seed: number, purpose: string, length: number): string {
  return bytes(seed, purpose, length).toString('hex');
}

/** A deterministic version-4-shaped UUID. */
function uuid(seed: number, purpose: string): string {
  const b = bytes(seed, `uuid ${purpose}`, 16);
  b[6] = ((b[6] ?? 0) & 0x0f) | 0x40;
  b[8] = ((b[8] ?? 0) & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
