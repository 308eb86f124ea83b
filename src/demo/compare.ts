import type { ObjectStore } from '../objectstore/store.js';
import { digestOf } from '../repository/digest.js';

export interface SqlRunner {
  query(database: string, sql: string, params?: readonly unknown[]): Promise<{ rows: Record<string, unknown>[] }>;
}

/** Per table: row count and an ordered checksum of every row's text form. */
export type DatabaseFingerprint = Map<string, { rows: number; md5: string }>;

/** Fingerprints every user table of `database`, so two databases can be compared row by row. */
export async function fingerprintDatabase(pg: SqlRunner, database: string): Promise<DatabaseFingerprint> {
  const { rows: tables } = await pg.query(
    database,
    `SELECT n.nspname AS schema, c.relname AS table FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2`,
  );
  const out: DatabaseFingerprint = new Map();
  for (const t of tables) {
    const name = `"${String(t.schema).replace(/"/g, '""')}"."${String(t.table).replace(/"/g, '""')}"`;
    const { rows } = await pg.query(database, `SELECT count(*)::bigint AS n, md5(coalesce(string_agg(r::text, E'\\n' ORDER BY r::text), '')) AS md5 FROM ${name} r`);
    out.set(`${String(t.schema)}.${String(t.table)}`, { rows: Number(rows[0]?.n ?? 0), md5: String(rows[0]?.md5 ?? '') });
  }
  return out;
}

/** Every object's size and SHA-256, by key. */
export async function fingerprintStore(store: ObjectStore): Promise<Map<string, { size: number; sha256: string }>> {
  const out = new Map<string, { size: number; sha256: string }>();
  for await (const info of store.list()) {
    const body = await store.get(info.key);
    const { bytes, hex } = await digestOf(body);
    out.set(info.key, { size: bytes, sha256: hex });
  }
  return out;
}

/** Differences between two fingerprints, as readable lines; empty when equal. */
export function diffFingerprints<V>(label: string, expected: Map<string, V>, actual: Map<string, V>): string[] {
  const out: string[] = [];
  for (const [key, value] of expected) {
    const got = actual.get(key);
    if (got === undefined) out.push(`${label} ${key}: missing`);
    else if (JSON.stringify(got) !== JSON.stringify(value)) out.push(`${label} ${key}: differs (${JSON.stringify(got)} vs ${JSON.stringify(value)})`);
  }
  for (const key of actual.keys()) if (!expected.has(key)) out.push(`${label} ${key}: unexpected`);
  return out;
}
