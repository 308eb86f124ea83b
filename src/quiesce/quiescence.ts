/**
 * Proof that a paused cluster is really quiet, checked right after the pause and before anything
 * is captured: no other client is connected to the pachyderm database, and the bucket does not
 * change over a short interval. A pause strategy only says what it did; this checks the effect,
 * and names what is still writing when it is not quiet.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Cursor, inKeyOrder, readRows, RowWriter, ScratchDir } from '../objectstore/sorted.js';
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
    private readonly scratch: ScratchDir,
    private readonly firstListing: string,
    private readonly startedAt: number,
    /** Other sessions found at the start (empty when quiet). */
    readonly sessionProblems: string[],
  ) {}

  /** Lists the bucket (to a scratch file: memory does not grow with the bucket) and looks for other sessions. */
  static async begin(opts: QuiescenceOptions): Promise<QuiescenceCheck> {
    const startedAt = Date.now();
    const scratch = await ScratchDir.create();
    try {
      const out = new RowWriter(scratch.file('quiescence-listing'));
      for await (const info of inKeyOrder(opts.store.list(), `the listing of ${opts.store.description}`)) await out.write([info.key, info.size, info.etag ?? null]);
      await out.close();
      return new QuiescenceCheck(opts, scratch, out.path, startedAt, await otherSessions(opts));
    } catch (err) {
      await scratch.remove();
      throw err;
    }
  }

  /** Waits until the settle interval since `begin` has passed. */
  async settled(): Promise<void> {
    const settleMs = this.opts.settleMs ?? 2000;
    await sleep(Math.max(0, settleMs - (Date.now() - this.startedAt)), undefined, this.opts.signal ? { signal: this.opts.signal } : {});
  }

  /** Problems found comparing a second listing of the bucket with the first (empty when identical). */
  async compare(second: AsyncIterable<ObjectInfo> | Iterable<ObjectInfo>): Promise<string[]> {
    const comparer = this.comparer();
    for await (const info of second) await comparer.add(info);
    return comparer.finish();
  }

  /**
   * Compares a second listing fed one object at a time, in key order (so it can ride along another
   * pass over the bucket), with the first; `finish` names what was added, changed or removed.
   */
  comparer(): { add(info: ObjectInfo): Promise<void>; finish(): Promise<string[]> } {
    const first = new Cursor(firstListingOf(this.firstListing));
    const added: string[] = [];
    const changed: string[] = [];
    const removed: string[] = [];
    const counts = { added: 0, changed: 0, removed: 0 };
    const note = (list: string[], kind: keyof typeof counts, text: string): void => {
      if (counts[kind]++ < MAX_NAMED) list.push(text);
    };
    const onRemoved = (before: ObjectInfo): void => note(removed, 'removed', before.key);
    return {
      add: async (info) => {
        const before = await first.seek(info.key, onRemoved);
        if (!before) note(added, 'added', `${info.key} (${info.size} bytes)`);
        else if (before.size !== info.size || before.etag !== info.etag) {
          note(changed, 'changed', `${info.key} (${before.size} → ${info.size} bytes${before.etag !== info.etag ? ', new etag' : ''})`);
        }
      },
      finish: async () => {
        try {
          await first.drain(onRemoved);
        } finally {
          await first.close();
          await this.close();
        }
        if (counts.added + counts.changed + counts.removed === 0) return [];
        const part = (label: keyof typeof counts, items: string[]): string | undefined =>
          counts[label] === 0 ? undefined : `${counts[label]} ${label}: ${items.join(', ')}${counts[label] > items.length ? ', …' : ''}`;
        const parts = [part('added', added), part('changed', changed), part('removed', removed)].filter((p): p is string => p !== undefined);
        return [`the object store ${this.opts.store.description} changed between two listings ${Date.now() - this.startedAt} ms apart, so something is still writing: ${parts.join('; ')}`];
      },
    };
  }

  /** Removes the first listing's scratch file (also done by `finish`). */
  async close(): Promise<void> {
    await this.scratch.remove();
  }
}

async function* firstListingOf(path: string): AsyncGenerator<ObjectInfo> {
  for await (const row of readRows(path)) yield row[2] === null ? { key: row[0] as string, size: row[1] as number } : { key: row[0] as string, size: row[1] as number, etag: row[2] as string };
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
