import type pg from 'pg';
import type { TableCount } from '../repository/manifest.js';
import { connect, explainPgError, quoteIdent, type PgServer } from './connection.js';

/** Every chunk key the metadata references (pachyderm-facts.md, "Object keys"). */
export const REFERENCED_KEYS_SQL = `SELECT key FROM (
  SELECT 'chunk/' || encode(chunk_id, 'hex') || '.' || lpad(to_hex(gen), 16, '0') AS key
    FROM storage.chunk_objects WHERE uploaded AND NOT tombstone) AS referenced
  ORDER BY key COLLATE "C"`;

/** Server settings that would end the snapshot's transaction or its queries; 0 turns each off. */
const SESSION_TIMEOUTS = ['statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', 'transaction_timeout'];

const USER_TABLES_SQL = `SELECT n.nspname AS schema, c.relname AS table
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  ORDER BY 1, 2`;

/**
 * A read-only REPEATABLE READ transaction whose snapshot is exported, so pg_dump (`--snapshot`),
 * the row counts and the referenced-key list all see exactly the same state of the database.
 * The snapshot lives as long as this transaction: close it only after pg_dump has finished.
 */
export class DatabaseSnapshot {
  private constructor(
    readonly server: PgServer,
    readonly database: string,
    private readonly client: pg.Client,
    readonly snapshotId: string,
    readonly serverVersion: string,
    readonly serverMajor: number,
  ) {}

  static async open(server: PgServer, database: string): Promise<DatabaseSnapshot> {
    const client = await connect(server, database);
    try {
      await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
      // The snapshot lives only as long as this session's transaction, which waits idle while the
      // objects are copied and until pg_dump has imported it: a server or role timeout must not end
      // it (pg_dump turns the same ones off for its own sessions). Only the settings the server has.
      await client.query(`SELECT set_config(name, '0', true) FROM pg_settings WHERE name = ANY($1)`, [SESSION_TIMEOUTS]);
      const { rows } = await client.query<{ id: string; version: string; num: string }>(
        `SELECT pg_export_snapshot() AS id, current_setting('server_version') AS version, current_setting('server_version_num') AS num`,
      );
      const row = rows[0]!;
      return new DatabaseSnapshot(server, database, client, row.id, row.version, Math.floor(Number(row.num) / 10000));
    } catch (err) {
      await client.end().catch(() => undefined);
      throw explainPgError(err, server, database);
    }
  }

  /**
   * Tables and sequences the connected user may not read: pg_dump would fail on them midway, so
   * preflight refuses before anything is paused.
   */
  async unreadableRelations(): Promise<string[]> {
    const { rows } = await this.client.query<{ name: string }>(
      `SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE c.relkind IN ('r', 'p', 'S', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
         AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1`,
    );
    return rows.map((r) => r.name);
  }

  /** On-disk size of the database, the input of the dump-time prediction. */
  /** Whether this is a Pachyderm metadata database: one with the table the referenced chunk keys come from. */
  async hasChunkObjects(): Promise<boolean> {
    return hasChunkObjectsIn(this.client);
  }

  async databaseBytes(): Promise<number> {
    const { rows } = await this.client.query<{ n: string }>('SELECT pg_database_size(current_database()) AS n');
    return Number(rows[0]?.n ?? 0);
  }

  async tableCounts(): Promise<TableCount[]> {
    return countTables(this.client, this.server, this.database);
  }

  /**
   * Referenced chunk keys in key order (none when this is not a Pachyderm metadata database),
   * fetched through a cursor in batches, so millions of keys never sit in memory at once.
   */
  async *referencedKeys(batch = 10_000): AsyncGenerator<string> {
    yield* referencedKeysIn(this.client, batch);
  }

  async close(): Promise<void> {
    await this.client.query('COMMIT').catch(() => undefined);
    await this.client.end().catch(() => undefined);
  }
}

/**
 * The chunk keys a Pachyderm metadata database references, in key order, through a cursor in
 * batches (none when the database has no storage.chunk_objects). `client` must be inside a
 * transaction: the cursor lives until its end.
 */
export async function* referencedKeysIn(client: pg.Client, batch = 10_000): AsyncGenerator<string> {
  if (!(await hasChunkObjectsIn(client))) return;
  await client.query(`DECLARE pachbackup_referenced NO SCROLL CURSOR FOR ${REFERENCED_KEYS_SQL}`);
  try {
    for (;;) {
      const { rows } = await client.query<{ key: string }>(`FETCH ${batch} FROM pachbackup_referenced`);
      for (const row of rows) yield row.key;
      if (rows.length < batch) break;
    }
  } finally {
    await client.query('CLOSE pachbackup_referenced');
  }
}

async function hasChunkObjectsIn(client: pg.Client): Promise<boolean> {
  // From the catalog: to_regclass() needs USAGE on the schema, and a user without it must get the
  // preflight's own message about the tables it may not read, not "permission denied for schema".
  const { rows } = await client.query<{ present: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'storage' AND c.relname = 'chunk_objects' AND c.relkind IN ('r', 'p')) AS present`,
  );
  return rows[0]?.present === true;
}

/** Exact row count of every user table, in a stable order, as seen by `client`'s transaction. */
export async function countTables(client: pg.Client, server: PgServer, database: string): Promise<TableCount[]> {
  try {
    const { rows } = await client.query<{ schema: string; table: string }>(USER_TABLES_SQL);
    const out: TableCount[] = [];
    for (const { schema, table } of rows) {
      const { rows: count } = await client.query<{ n: string }>(`SELECT count(*) AS n FROM ${quoteIdent(schema)}.${quoteIdent(table)}`);
      out.push({ schema, table, rows: Number(count[0]?.n ?? 0) });
    }
    return out;
  } catch (err) {
    throw explainPgError(err, server, database);
  }
}
