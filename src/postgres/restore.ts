import { connect, describeServer, explainPgError, PgError, quoteIdent, type PgServer } from './connection.js';

/** The maintenance database used to create and inspect databases. */
const MAINTENANCE_DB = 'postgres';

/** `userTables`: tables, views, sequences and foreign tables outside the system schemas. */
export type DatabaseState = { exists: false } | { exists: true; userTables: number; largeObjects: number };

export async function databaseState(server: PgServer, name: string): Promise<DatabaseState> {
  const admin = await connect(server, MAINTENANCE_DB);
  try {
    const { rows } = await admin.query('SELECT 1 FROM pg_database WHERE datname = $1', [name]);
    if (rows.length === 0) return { exists: false };
  } finally {
    await admin.end();
  }
  const db = await connect(server, name);
  try {
    const { rows } = await db.query<{ n: string; lo: string }>(
      `SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%') AS n,
              (SELECT count(*) FROM pg_largeobject_metadata) AS lo`,
    );
    return { exists: true, userTables: Number(rows[0]?.n ?? 0), largeObjects: Number(rows[0]?.lo ?? 0) };
  } finally {
    await db.end();
  }
}

export async function createDatabase(server: PgServer, name: string): Promise<void> {
  const admin = await connect(server, MAINTENANCE_DB);
  try {
    await admin.query(`CREATE DATABASE ${quoteIdent(name)}`);
  } catch (err) {
    if ((err as { code?: string }).code === '42501') {
      throw new PgError(
        `user ${server.config.user} may not create databases on ${describeServer(server)}; grant it (ALTER ROLE ${quoteIdent(server.config.user)} CREATEDB) or restore as a user that can`,
      );
    }
    throw explainPgError(err, server, name);
  } finally {
    await admin.end();
  }
}

/** Drops a database, disconnecting its sessions first (PostgreSQL 13+). */
export async function dropDatabase(server: PgServer, name: string): Promise<void> {
  const admin = await connect(server, MAINTENANCE_DB);
  try {
    await admin.query(`DROP DATABASE IF EXISTS ${quoteIdent(name)} WITH (FORCE)`);
  } catch (err) {
    throw explainPgError(err, server, name);
  } finally {
    await admin.end();
  }
}

export async function serverMajorVersion(server: PgServer): Promise<number> {
  const admin = await connect(server, MAINTENANCE_DB);
  try {
    const { rows } = await admin.query<{ num: string }>(`SELECT current_setting('server_version_num') AS num`);
    return Math.floor(Number(rows[0]?.num ?? 0) / 10000);
  } finally {
    await admin.end();
  }
}

/** Renames a database (no session may be connected to it). */
export async function renameDatabase(server: PgServer, from: string, to: string): Promise<void> {
  const admin = await connect(server, MAINTENANCE_DB);
  try {
    await admin.query(`ALTER DATABASE ${quoteIdent(from)} RENAME TO ${quoteIdent(to)}`);
  } catch (err) {
    throw explainPgError(err, server, from);
  } finally {
    await admin.end();
  }
}
