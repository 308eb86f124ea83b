/**
 * Proof that a paused cluster is really quiet, checked right after the pause and before anything
 * is captured: no other client is connected to the pachyderm database, and the bucket does not
 * change over a short interval. A pause strategy only says what it did; this checks the effect,
 * and names what is still writing when it is not quiet.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { ObjectInfo, ObjectStore } from '../objectstore/store.js';
import { connect, type PgServer } from '../postgres/connection.js';

/** pachbackup's own connections (pg clients and pg_dump) carry this application_name. */
export const OWN_APPLICATION_NAME = 'pachbackup';

export interface QuiescenceOptions {
  pg: PgServer;
  /** The pachyderm database. */
  database: string;
  /** The cluster's object store (pachd's bucket). */
  store: ObjectStore;
  /** Time between the two listings of the bucket; default 2000 ms. */
  settleMs?: number;
  /**
   * Tolerate sessions that are `idle` and have done nothing since this instant, e.g. pg-bouncer's
   * pooled server connections left over from before the pause. Default: every session counts.
   */
  tolerateIdleSince?: Date;
  signal?: AbortSignal;
}

export type QuiescenceResult = { ok: true } | { ok: false; problems: string[] };

interface SessionRow {
  pid: number;
  application_name: string | null;
  client_addr: string | null;
  usename: string | null;
  state: string | null;
  state_change: Date | null;
  backend_type: string | null;
}

const MAX_NAMED = 10;

export async function checkQuiescent(opts: QuiescenceOptions): Promise<QuiescenceResult> {
  const check = await QuiescenceCheck.begin(opts);
  await check.settled();
  const problems = [...check.sessionProblems, ...(await check.compare(opts.store.list()))];
  return problems.length === 0 ? { ok: true } : { ok: false, problems };
}

/**
 * The check in two halves, so a backup can spend the settle interval doing useful work: `begin`
 * lists the bucket and looks for other database sessions right after the pause; `compare` checks
 * a second listing taken at least `settleMs` later — the backup's own copy-phase listing — against
 * the first. The pause then lasts the settle interval or the work, whichever is longer, not both.
 */
export class QuiescenceCheck {
  private constructor(
    private readonly opts: QuiescenceOptions,
    private readonly first: Map<string, ObjectInfo>,
    private readonly startedAt: number,
    /** Other sessions found at the start (empty when quiet). */
    readonly sessionProblems: string[],
  ) {}

  static async begin(opts: QuiescenceOptions): Promise<QuiescenceCheck> {
    const startedAt = Date.now();
    const first = await listingOf(opts.store);
    return new QuiescenceCheck(opts, first, startedAt, await otherSessions(opts));
  }

  /** Waits until the settle interval since `begin` has passed. */
  async settled(): Promise<void> {
    const settleMs = this.opts.settleMs ?? 2000;
    await sleep(Math.max(0, settleMs - (Date.now() - this.startedAt)), undefined, this.opts.signal ? { signal: this.opts.signal } : {});
  }

  /** Problems found comparing a second listing of the bucket with the first (empty when identical). */
  async compare(second: AsyncIterable<ObjectInfo> | Iterable<ObjectInfo>): Promise<string[]> {
    return compareWithListing(this.opts.store, second, this.first, Date.now() - this.startedAt);
  }
}

/** Other client sessions on the database: background workers (autovacuum, ...) do not count. */
async function otherSessions(opts: QuiescenceOptions): Promise<string[]> {
  const client = await connect(opts.pg, opts.database);
  let rows: SessionRow[];
  try {
    const result = await client.query<SessionRow>(
      `SELECT pid, application_name, client_addr::text AS client_addr, usename, state, state_change, backend_type
         FROM pg_stat_activity
        WHERE datname = $1
          AND pid <> pg_backend_pid()
          AND coalesce(backend_type, 'client backend') = 'client backend'
          AND coalesce(application_name, '') <> $2
        ORDER BY pid`,
      [opts.database, OWN_APPLICATION_NAME],
    );
    rows = result.rows;
  } finally {
    await client.end().catch(() => undefined);
  }
  const since = opts.tolerateIdleSince;
  // Both clocks are read at millisecond precision here, so a session that went idle in the same
  // millisecond as `since` (necessarily before it) compares equal.
  const offenders = rows.filter((r) => !(since && r.state === 'idle' && r.state_change !== null && r.state_change <= since));
  if (offenders.length === 0) return [];
  const described = offenders.slice(0, MAX_NAMED).map(
    (r) =>
      `pid ${r.pid}: application_name "${r.application_name ?? ''}", client_addr ${r.client_addr ?? 'local socket'}, user ${r.usename ?? '?'}, state ${r.state ?? 'unknown (no privilege to see it)'}`,
  );
  const more = offenders.length > MAX_NAMED ? `; and ${offenders.length - MAX_NAMED} more` : '';
  return [
    `${offenders.length} other client(s) still connected to database "${opts.database}", so something may still be writing: ${described.join('; ')}${more}`,
  ];
}

async function listingOf(store: ObjectStore): Promise<Map<string, ObjectInfo>> {
  const objects = new Map<string, ObjectInfo>();
  for await (const info of store.list()) objects.set(info.key, info);
  return objects;
}

/** Compares a second listing with the first as it streams, so only the first is held in memory. */
async function compareWithListing(store: ObjectStore, second: AsyncIterable<ObjectInfo> | Iterable<ObjectInfo>, first: Map<string, ObjectInfo>, apartMs: number): Promise<string[]> {
  const added: string[] = [];
  const changed: string[] = [];
  const seen = new Set<string>();
  for await (const info of second) {
    seen.add(info.key);
    const before = first.get(info.key);
    if (!before) added.push(`${info.key} (${info.size} bytes)`);
    else if (before.size !== info.size || before.etag !== info.etag) {
      changed.push(`${info.key} (${before.size} → ${info.size} bytes${before.etag !== info.etag ? ', new etag' : ''})`);
    }
  }
  const removed = [...first.keys()].filter((k) => !seen.has(k));
  if (added.length + changed.length + removed.length === 0) return [];
  const part = (label: string, items: string[]): string | undefined =>
    items.length === 0 ? undefined : `${items.length} ${label}: ${items.slice(0, MAX_NAMED).join(', ')}${items.length > MAX_NAMED ? ', …' : ''}`;
  const parts = [part('added', added), part('changed', changed), part('removed', removed)].filter((p): p is string => p !== undefined);
  return [`the object store ${store.description} changed between two listings ${apartMs} ms apart, so something is still writing: ${parts.join('; ')}`];
}
