import pg from 'pg';
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

/** A restored copy to put in place of an existing database, which is kept under `old`. */
export interface DatabaseSwap {
  copy: string;
  existing: string;
  old: string;
}

/**
 * The swap's COMMIT was sent but its answer never came (the connection ended): whether the renames
 * took effect could not be established afterwards either. Nothing may be removed on this basis.
 */
export class SwapOutcomeUnknownError extends PgError {
  override name = 'SwapOutcomeUnknownError';
}

/**
 * Puts restored copies in place of existing databases, all or none: in one transaction each
 * existing database is renamed to its `old` name and its copy takes its name (ALTER DATABASE …
 * RENAME may run in a transaction; a failure rolls every rename back). Sessions on the existing
 * databases are ended first, as DROP DATABASE … WITH (FORCE) would end them; one that connects
 * again at once is met by two more tries. A session on a copy, or one this user may not end,
 * fails the swap with nothing renamed.
 *
 * A COMMIT that fails without an answer (the connection ends) may have committed: the outcome is
 * then read from the catalog on a new connection, once the old session is gone. Committed, the swap
 * succeeded; not committed, its error is thrown; anything else is a SwapOutcomeUnknownError.
 */
export async function swapDatabases(server: PgServer, swaps: DatabaseSwap[]): Promise<void> {
  const admin = await connect(server, MAINTENANCE_DB);
  try {
    const { rows } = await admin.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
    const pid = rows[0]!.pid;
    for (let attempt = 1; ; attempt++) {
      // One at a time: a session this user may not end (another role's) fails only its own
      // pg_terminate_backend, and stays; the rename then names the database it uses.
      const { rows: sessions } = await admin.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()', [swaps.map((s) => s.existing)]);
      for (const session of sessions) await admin.query('SELECT pg_terminate_backend($1)', [session.pid]).catch(() => undefined);
      let renaming = swaps[0]?.existing ?? '';
      let committing = false;
      try {
        await admin.query('BEGIN');
        for (const s of swaps) {
          renaming = s.existing;
          await admin.query(`ALTER DATABASE ${quoteIdent(s.existing)} RENAME TO ${quoteIdent(s.old)}`);
          renaming = s.copy;
          await admin.query(`ALTER DATABASE ${quoteIdent(s.copy)} RENAME TO ${quoteIdent(s.existing)}`);
        }
        committing = true;
        await admin.query('COMMIT');
        return;
      } catch (err) {
        if (committing && !(err instanceof pg.DatabaseError && err.severity === 'ERROR')) {
          // No answer to COMMIT (or the session ended in it): it may have committed.
          if ((await swapOutcome(server, swaps, pid)) === 'committed') return;
          throw explainPgError(err, server, renaming);
        }
        await admin.query('ROLLBACK').catch(() => undefined);
        // 55006 object_in_use: a session on a database being renamed.
        const reconnected = (err as { code?: string }).code === '55006' && swaps.some((s) => s.existing === renaming);
        if (reconnected && attempt < 3) continue;
        throw explainPgError(err, server, renaming);
      }
    }
  } finally {
    await admin.end().catch(() => undefined);
  }
}

/**
 * Whether a swap whose COMMIT went unanswered committed, read from the catalog once its session
 * (`pid`) is gone (ended here if it lingers): 'committed' or 'rolled back', or a
 * SwapOutcomeUnknownError naming what is where.
 */
async function swapOutcome(server: PgServer, swaps: DatabaseSwap[], pid: number): Promise<'committed' | 'rolled back'> {
  const names = swaps.flatMap((s) => [s.copy, s.old]);
  let found: Set<string> | undefined;
  let why = '';
  try {
    const admin = await connect(server, MAINTENANCE_DB);
    try {
      for (let i = 0; ; i++) {
        const { rows } = await admin.query<{ gone: boolean }>('SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1) AS gone', [pid]);
        if (rows[0]?.gone) break;
        if (i === 50) throw new Error(`its session (pid ${pid}) did not end`);
        await admin.query('SELECT pg_terminate_backend($1)', [pid]).catch(() => undefined);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      const { rows } = await admin.query<{ datname: string }>('SELECT datname FROM pg_database WHERE datname = ANY($1)', [names]);
      found = new Set(rows.map((r) => r.datname));
    } finally {
      await admin.end().catch(() => undefined);
    }
  } catch (err) {
    why = `: ${(err as Error).message}`;
  }
  const present = found;
  if (present) {
    if (swaps.every((s) => present.has(s.old) && !present.has(s.copy))) return 'committed';
    if (swaps.every((s) => present.has(s.copy) && !present.has(s.old))) return 'rolled back';
  }
  const where = swaps.map((s) => `"${s.existing}" is the restored copy if "${s.old}" exists (the database it replaced), the old database if "${s.copy}" does`).join('; ');
  throw new SwapOutcomeUnknownError(`the connection to ${describeServer(server)} ended in the COMMIT of the swap, and whether it committed could not be read back${why}; ${where}`);
}
