import { randomBytes } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { hostname } from 'node:os';
import { z } from 'zod';
import { ACCESS_DENIED, NotFoundError, PreconditionFailedError, StoreError, type ObjectStore } from '../objectstore/store.js';
import { readWhole } from '../objectstore/retry.js';

/**
 * Lease locks in the repository; docs/repository-format.md ("Locks") is their specification.
 *
 * A lock is a small JSON file `locks/<kind>-<random>.json` that its holder rewrites (heartbeat)
 * every leaseSeconds/3. A lock whose heartbeat is older than its lease, or whose holder is a dead
 * process on this host, is stale and may be removed by anyone.
 *
 * Mutual exclusion does not rest on the conditional create (the names are random, so two runs
 * never write the same key); it rests on "write, then list": whoever lists after writing sees
 * every lock whose write completed before its own. Stores that ignore `If-None-Match` are safe.
 */

/** `read`: verify, restore, drill. `backup`: one backup at a time. `exclusive`: prune. */
export const lockKinds = ['read', 'backup', 'exclusive'] as const;
export type LockKind = (typeof lockKinds)[number];

/** Which kinds may not be held together. Symmetric; see the matrix in the docs. */
const CONFLICTS: Record<LockKind, readonly LockKind[]> = {
  read: ['exclusive'],
  backup: ['backup', 'exclusive'],
  exclusive: ['read', 'backup', 'exclusive'],
};

export function lockKindsConflict(a: LockKind, b: LockKind): boolean {
  return CONFLICTS[a].includes(b);
}

export const LOCKS_PREFIX = 'locks/';
export const DEFAULT_LEASE_SECONDS = 300;
/** How long a new lock waits for younger conflicting locks to withdraw before giving up. */
const SETTLE_MS = 3000;
const SETTLE_POLL_MS = 200;

const lockInfoSchema = z.object({
  kind: z.enum(lockKinds),
  host: z.string(),
  pid: z.number().int(),
  command: z.string(),
  createdAt: z.string(),
  heartbeatAt: z.string(),
  leaseSeconds: z.number().positive(),
});
export type LockInfo = z.infer<typeof lockInfoSchema>;

export interface LockEntry {
  /** `<kind>-<random>`, the file name without `.json`; what `pachbackup unlock <id>` takes. */
  id: string;
  key: string;
  /** From the file, or from the id when the file is damaged (unknown kinds count as exclusive). */
  kind: LockKind;
  /** The file's content; undefined when it cannot be parsed. */
  info?: LockInfo;
  /**
   * live: its holder heartbeats. stale: its lease ran out or its process is gone; anyone may
   * remove it. damaged: unreadable; it blocks like a live lock until `pachbackup unlock` removes it.
   */
  state: 'live' | 'stale' | 'damaged';
  /** Why it is stale or damaged, for messages. */
  reason?: string;
}

export type LockEvent = { type: 'info'; message: string } | { type: 'warning'; message: string };

export interface AcquireOptions {
  leaseSeconds?: number;
  /** Takeovers of stale locks and a lost lock are reported here. An engine's EventSink fits. */
  onEvent?: (event: LockEvent) => void;
}

export interface LockHandle {
  readonly id: string;
  readonly key: string;
  readonly kind: LockKind;
  /** Aborted, with a LockLostError as reason, when the lock is found lost. */
  readonly signal: AbortSignal;
  /** Throws LockLostError when the lock was lost; call before every destructive step. */
  assertHeld(): void;
  /** Stops the heartbeat and removes the lock file. Safe to call more than once. */
  release(): Promise<void>;
}

export class LockConflictError extends Error {
  override name = 'LockConflictError';
  constructor(
    message: string,
    readonly holder: LockEntry,
  ) {
    super(message);
  }
}

export class LockLostError extends Error {
  override name = 'LockLostError';
}

/** Lists the repository's locks, reading each; a lock released while listing is left out. */
export async function listLocks(store: ObjectStore, now: Date = new Date()): Promise<LockEntry[]> {
  const out: LockEntry[] = [];
  for await (const object of store.list(LOCKS_PREFIX)) {
    const name = object.key.slice(LOCKS_PREFIX.length);
    if (!name.endsWith('.json') || name.includes('/')) continue;
    const id = name.slice(0, -'.json'.length);
    const idKind = lockKinds.find((k) => id.startsWith(`${k}-`)) ?? 'exclusive';
    let text: string;
    try {
      text = await readText(store, object.key);
    } catch (err) {
      if (err instanceof NotFoundError) continue;
      throw err;
    }
    const parsed = lockInfoSchema.safeParse(safeJson(text));
    if (!parsed.success) {
      out.push({ id, key: object.key, kind: idKind, state: 'damaged', reason: 'the lock file cannot be parsed' });
      continue;
    }
    const info = parsed.data;
    const staleReason = whyStale(info, now);
    out.push({ id, key: object.key, kind: info.kind, info, state: staleReason ? 'stale' : 'live', ...(staleReason ? { reason: staleReason } : {}) });
  }
  return out;
}

/** Removes locks by id (missing ones are ignored); returns the keys removed. */
export async function removeLocks(store: ObjectStore, ids: string[]): Promise<string[]> {
  const keys = ids.map(lockKey);
  await store.remove(keys);
  return keys;
}

export function lockKey(id: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(id)) throw new Error(`"${id}" is not a lock id (expected e.g. exclusive-1f2e3d4c5b6a7980)`);
  return `${LOCKS_PREFIX}${id}.json`;
}

/** One line naming a lock's holder: who, what, since when, last heartbeat. */
export function describeLock(lock: LockEntry, now: Date = new Date()): string {
  if (!lock.info) return `lock ${lock.id} (${lock.reason ?? 'unreadable'})`;
  const i = lock.info;
  const beatAge = Math.max(0, Math.round((now.getTime() - Date.parse(i.heartbeatAt)) / 1000));
  return `${i.kind} lock ${lock.id} held by "${i.command}" (pid ${i.pid} on ${i.host}) since ${i.createdAt}, last heartbeat ${i.heartbeatAt} (${beatAge}s ago, lease ${i.leaseSeconds}s)`;
}

/**
 * Takes a lock of `kind`, or throws LockConflictError naming the holder of a conflicting lock.
 * Conflicting stale locks are removed (reported through onEvent). The protocol:
 *
 * 1. list: a live conflicting lock refuses at once;
 * 2. write our lock (a conditional create where the store has one);
 * 3. list again. Every conflicting lock written before ours completed is visible now. If one
 *    precedes ours (older createdAt, ties broken by id), ours is removed and we fail. If only
 *    younger ones are there, their holders will see ours and withdraw: we wait briefly, then fail
 *    if they did not (they listed before our write completed, so they hold the lock).
 *
 * Two runs can therefore both fail, but never both succeed.
 */
export async function acquireLock(store: ObjectStore, kind: LockKind, info: { command: string }, options: AcquireOptions = {}): Promise<LockHandle> {
  const leaseSeconds = options.leaseSeconds ?? DEFAULT_LEASE_SECONDS;
  const onEvent = options.onEvent ?? (() => undefined);

  await clearConflicts(store, kind, undefined, onEvent);

  const id = `${kind}-${randomBytes(8).toString('hex')}`;
  const key = lockKey(id);
  const created = new Date().toISOString();
  const mine: LockInfo = { kind, host: hostname(), pid: process.pid, command: info.command, createdAt: created, heartbeatAt: created, leaseSeconds };
  try {
    await writeNewLock(store, key, mine);
  } catch (err) {
    // Read-only credentials (a replica, a bucket under object lock, an auditor's key) cannot write a
    // lock. A run that only reads still goes ahead: it can damage nothing, and no live exclusive
    // lock was there when it listed (above). Only a prune starting later cannot see it.
    if (kind !== 'read' || !isAccessDenied(err)) throw err;
    onEvent({
      type: 'warning',
      message: `no read lock taken: the credentials cannot write to ${store.description} (${err.message}). Going ahead without one, read-only; a prune started during this run could remove what it still has to read, so do not prune meanwhile`,
    });
    return new UnwrittenReadLock(id, key);
  }

  const settleUntil = Date.now() + SETTLE_MS;
  for (;;) {
    let blocking: LockEntry | undefined;
    try {
      blocking = await clearConflicts(store, kind, { id, createdAt: created }, onEvent);
    } catch (err) {
      await store.remove([key]).catch(() => undefined);
      throw err;
    }
    if (!blocking) break;
    if (Date.now() >= settleUntil) {
      await store.remove([key]);
      throw conflictError(store, kind, blocking);
    }
    await new Promise((resolve) => setTimeout(resolve, SETTLE_POLL_MS));
  }
  return new HeldLock(store, id, key, mine, onEvent);
}

/**
 * Removes stale conflicting locks, and throws for a live (or damaged) conflicting one that
 * precedes `self` (or any, before our own lock is written). Returns a younger conflicting lock
 * that may still withdraw, or undefined when nothing conflicts.
 */
async function clearConflicts(
  store: ObjectStore,
  kind: LockKind,
  self: { id: string; createdAt: string } | undefined,
  onEvent: (event: LockEvent) => void,
): Promise<LockEntry | undefined> {
  const now = new Date();
  let younger: LockEntry | undefined;
  for (const lock of await listLocks(store, now)) {
    if (lock.id === self?.id || !lockKindsConflict(kind, lock.kind)) continue;
    if (lock.state === 'stale') {
      try {
        await store.remove([lock.key]);
      } catch (err) {
        // Read-only credentials (see acquireLock): a stale lock blocks nothing, whether or not it can be removed.
        if (kind !== 'read' || !isAccessDenied(err)) throw err;
        onEvent({ type: 'warning', message: `stale ${describeLock(lock, now)} left in place: the credentials cannot remove it (${lock.reason})` });
        continue;
      }
      onEvent({ type: 'warning', message: `took over stale ${describeLock(lock, now)}: ${lock.reason}` });
      continue;
    }
    if (self && lock.info && !precedes(lock.info.createdAt, lock.id, self.createdAt, self.id)) {
      younger ??= lock;
      continue;
    }
    if (self) await store.remove([lockKey(self.id)]);
    throw conflictError(store, kind, lock);
  }
  return younger;
}

function isAccessDenied(err: unknown): err is StoreError {
  return err instanceof StoreError && err.code === ACCESS_DENIED;
}

function precedes(createdA: string, idA: string, createdB: string, idB: string): boolean {
  const a = Date.parse(createdA);
  const b = Date.parse(createdB);
  if (a !== b) return a < b;
  return idA < idB;
}

/** When a lock goes stale if its holder stops heartbeating, for messages: `at <ISO time>`, or `after its lease`. */
export function lockExpiry(lock: LockEntry): string {
  return lock.info ? `at ${new Date(Date.parse(lock.info.heartbeatAt) + lock.info.leaseSeconds * 1000).toISOString()}` : 'after its lease';
}

function conflictError(store: ObjectStore, kind: LockKind, holder: LockEntry): LockConflictError {
  const what = kind === 'exclusive' ? 'an exclusive lock (prune)' : kind === 'backup' ? 'the backup lock' : 'a read lock';
  const advice =
    holder.state === 'damaged'
      ? `if no pachbackup run is using the repository, remove it with "pachbackup unlock ${holder.id}"`
      : `wait for it to finish; if that run is gone, its lock expires ${lockExpiry(holder)} or can be removed with "pachbackup unlock ${holder.id} --force"`;
  return new LockConflictError(`${store.description} is locked: cannot take ${what} while the ${describeLock(holder)} exists; ${advice}`, holder);
}

async function writeNewLock(store: ObjectStore, key: string, info: LockInfo): Promise<void> {
  const data = lockBytes(info);
  try {
    await store.put(key, data, { ifNoneMatch: true, size: data.length, contentType: 'application/json' });
  } catch (err) {
    if (!(err instanceof PreconditionFailedError)) throw err;
    // A retried conditional put whose first attempt landed: the file there is ours.
    const existing = await readText(store, key).catch(() => '');
    if (existing !== data.toString('utf8')) throw new LockLostError(`${key} already exists with other content: random lock names collided; try again`);
  }
}

/** The read lock of a run whose credentials cannot write one: nothing to heartbeat, release or lose. */
class UnwrittenReadLock implements LockHandle {
  readonly kind = 'read';
  readonly signal = new AbortController().signal;
  constructor(
    readonly id: string,
    readonly key: string,
  ) {}
  assertHeld(): void {}
  async release(): Promise<void> {}
}

class HeldLock implements LockHandle {
  readonly #controller = new AbortController();
  #timer: NodeJS.Timeout | undefined;
  /** Fires when the last heartbeat gets too old, whatever the heartbeat is doing meanwhile. */
  #watchdog: NodeJS.Timeout | undefined;
  #beating: Promise<void> = Promise.resolve();
  #released = false;
  /** The heartbeatAt written last, as the holder's clock saw it. */
  #lastBeat: number;
  /** Live conflicting locks the previous heartbeat saw (normally none). */
  #conflicting = new Set<string>();

  constructor(
    private readonly store: ObjectStore,
    readonly id: string,
    readonly key: string,
    private readonly info: LockInfo,
    private readonly onEvent: (event: LockEvent) => void,
  ) {
    this.#lastBeat = Date.parse(info.heartbeatAt);
    // Every copy of a backup listens on this signal; the default limit of 10 would warn spuriously.
    setMaxListeners(0, this.#controller.signal);
    this.schedule(this.intervalMs);
    this.watch();
  }

  get kind(): LockKind {
    return this.info.kind;
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  private get intervalMs(): number {
    return (this.info.leaseSeconds * 1000) / 3;
  }

  /**
   * Past this age of its last heartbeat the holder gives the lock up. It is shorter than the lease
   * others wait for, so a clock ahead by up to a third of the lease still cannot take over a lock
   * whose holder believes it is held.
   */
  private get maxBeatAgeMs(): number {
    return (this.info.leaseSeconds * 1000 * 2) / 3;
  }

  assertHeld(): void {
    this.checkAge();
    if (this.#controller.signal.aborted) throw this.#controller.signal.reason as Error;
  }

  /**
   * Past the age at which the holder gives up, the lock is lost however the heartbeat is doing,
   * since others may take it over once the lease runs out. Returns whether the lock is lost.
   */
  private checkAge(): boolean {
    const age = Date.now() - this.#lastBeat;
    if (!this.#released && age > this.maxBeatAgeMs) {
      this.lose(`its last heartbeat is ${Math.round(age / 1000)}s old (lease ${this.info.leaseSeconds}s); another run may have taken it over`);
    }
    return this.#controller.signal.aborted;
  }

  /**
   * A heartbeat that is stuck (a write hanging until its timeout and retries) never gets to
   * check the lease: this timer checks it when the last heartbeat gets too old, so the signal
   * aborts then, and a run that observes it stops without having to ask.
   */
  private watch(): void {
    clearTimeout(this.#watchdog);
    if (this.#released) return;
    // Checked again if the timer fires a moment early.
    this.#watchdog = setTimeout(() => void (this.checkAge() || this.watch()), this.#lastBeat + this.maxBeatAgeMs + 1 - Date.now());
    this.#watchdog.unref();
  }

  private schedule(ms: number): void {
    if (this.#released || this.#controller.signal.aborted) return;
    this.#timer = setTimeout(() => {
      this.#beating = this.beat();
    }, ms);
    // A forgotten release must not keep the process alive; the lease then expires on its own.
    this.#timer.unref();
  }

  private async beat(): Promise<void> {
    if (this.#released) return;
    const started = Date.now();
    if (this.checkAge()) return;
    try {
      // Rewriting a removed lock would hide a takeover or a forced unlock: check first.
      if (!(await this.store.stat(this.key))) {
        this.lose('its file was removed (pachbackup unlock --force, or a takeover after a missed heartbeat)');
        return;
      }
      const heartbeatAt = new Date(started).toISOString();
      const data = lockBytes({ ...this.info, heartbeatAt });
      await this.store.put(this.key, data, { size: data.length, contentType: 'application/json' });
      if (Date.now() - this.#lastBeat > this.maxBeatAgeMs) {
        this.lose(`refreshing its heartbeat took until ${Math.round((Date.now() - this.#lastBeat) / 1000)}s after the previous one (lease ${this.info.leaseSeconds}s); another run may have taken it over`);
        return;
      }
      this.#lastBeat = started;
      this.watch();
      // The check above and the write race with a removal: a forced unlock (or a takeover) landing
      // between them is undone by the write, and the run that took the repository in that gap
      // holds a conflicting lock. A newcomer that finds ours withdraws within moments, so a live
      // conflicting lock seen at two heartbeats in a row holds the repository alongside us.
      const conflicting = (await listLocks(this.store)).filter((l) => l.id !== this.id && l.state === 'live' && lockKindsConflict(this.kind, l.kind));
      // Only a lock that has heartbeated belongs to a run that holds it: a newcomer that died
      // between writing its lock and withdrawing it (killed, its network gone) leaves a lock that
      // stays live for its lease but is never refreshed, and must not make us give ours up.
      const alongside = conflicting.find((l) => this.#conflicting.has(l.id) && l.info !== undefined && l.info.heartbeatAt !== l.info.createdAt);
      if (alongside) {
        this.lose(`the ${describeLock(alongside)} has existed since the previous heartbeat: this lock's file was removed (pachbackup unlock --force, or a takeover) and written again by a heartbeat in flight`);
        return;
      }
      this.#conflicting = new Set(conflicting.map((l) => l.id));
      this.schedule(this.intervalMs);
    } catch (err) {
      if (this.#released) return;
      this.onEvent({ type: 'warning', message: `refreshing lock ${this.id} failed (${(err as Error).message}); retrying` });
      this.schedule(Math.min(this.intervalMs, 5000));
    }
  }

  private lose(why: string): void {
    if (this.#controller.signal.aborted) return;
    const message = `lost lock ${this.id} on ${this.store.description}: ${why}`;
    this.onEvent({ type: 'warning', message });
    this.#controller.abort(new LockLostError(message));
  }

  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    clearTimeout(this.#timer);
    clearTimeout(this.#watchdog);
    await this.#beating.catch(() => undefined);
    await this.store.remove([this.key]);
  }
}

function whyStale(info: LockInfo, now: Date): string | undefined {
  const beat = Date.parse(info.heartbeatAt);
  const age = now.getTime() - beat;
  if (!Number.isFinite(beat) || age > info.leaseSeconds * 1000) {
    return `no heartbeat for ${Number.isFinite(beat) ? Math.round(age / 1000) : '?'}s, longer than its lease of ${info.leaseSeconds}s`;
  }
  if (info.host === hostname() && info.pid !== process.pid && !processAlive(info.pid)) {
    return `its process ${info.pid} no longer runs on this host`;
  }
  return undefined;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to another user.
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

function lockBytes(info: LockInfo): Buffer {
  return Buffer.from(`${JSON.stringify(info, null, 2)}\n`);
}

async function readText(store: ObjectStore, key: string): Promise<string> {
  return (await readWhole(store, key)).toString('utf8');
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
