import { setTimeout as sleep } from 'node:timers/promises';
import type { Readable } from 'node:stream';
import { StoreError, type ObjectInfo, type ObjectStore, type PutOptions } from './store.js';

export interface RetryPolicy {
  /** Attempts in all, the first included. */
  attempts: number;
  baseDelayMs: number;
  maxDelayMs: number;
  /** Called before each retry, e.g. to count retries or report throttling. */
  onRetry?: (err: StoreError, attempt: number, delayMs: number) => void;
}

export const defaultRetryPolicy: RetryPolicy = { attempts: 8, baseDelayMs: 100, maxDelayMs: 10_000 };

/**
 * Counts the retries of one run by cause, for its summary, and reports the first retry of each
 * cause (throttling is worth knowing about while it happens: lower the concurrency).
 */
export class RetryTally {
  #count = 0;
  readonly #causes = new Map<string, number>();

  constructor(private readonly onFirst?: (cause: string, err: StoreError) => void) {}

  /** `base` with every retry counted here (its own onRetry still called). */
  policy(base: RetryPolicy = defaultRetryPolicy): RetryPolicy {
    return {
      ...base,
      onRetry: (err, attempt, delayMs) => {
        this.note(err);
        base.onRetry?.(err, attempt, delayMs);
      },
    };
  }

  note(err: StoreError): void {
    const cause = err.code ?? 'other';
    const seen = this.#causes.get(cause) ?? 0;
    this.#causes.set(cause, seen + 1);
    this.#count++;
    if (seen === 0) this.onFirst?.(cause, err);
  }

  get count(): number {
    return this.#count;
  }

  /** Retries in all and per cause, most frequent first. */
  summary(): RetrySummary {
    const causes = Object.fromEntries([...this.#causes].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)));
    return { count: this.#count, causes };
  }
}

export interface RetrySummary {
  count: number;
  /** Retries per cause: S3 error code (SlowDown, InternalError), socket error (ECONNRESET), TimeoutError, `HTTP 503`, or `other`. */
  causes: Record<string, number>;
}

/** `12 (SlowDown 10, ECONNRESET 2)`, or `none`. */
export function retriesText(retries: RetrySummary): string {
  if (retries.count === 0) return 'none';
  return `${retries.count} (${Object.entries(retries.causes)
    .map(([cause, n]) => `${cause} ${n}`)
    .join(', ')})`;
}

/**
 * The retry cause of a copy or restore done again after the service would not vouch for an MD5
 * (then computed here): a deliberate second pass, not a fault of the store.
 */
export const CHECKSUM_FALLBACK = 'ChecksumFallback';

/** Errors marked by failsAtOnce. The error itself is marked, not wrapped, so it is recognised
 * whichever way it travels (a write stream's error also destroys the streams piped into it). */
const markedFailures = new WeakSet<object>();

/**
 * Marks a call inside the operation of a withRetry whose failure must not be retried there: a call
 * retried already (a RetryStore's get, when the enclosing retry exists for a body that breaks
 * mid-read: otherwise the attempts multiply, 8 × 8), or a local write (a full disk is no transient
 * fault of the store). The enclosing withRetry throws the call's own error at once.
 */
export function failsAtOnce<T>(call: Promise<T>): Promise<T> {
  return call.catch((err: unknown) => {
    const error = typeof err === 'object' && err !== null ? err : new Error(String(err));
    markedFailures.add(error);
    throw error;
  });
}

/** Whether `err` is a failure marked by failsAtOnce (wrappers must pass it through unchanged). */
export function failedAtOnce(err: unknown): boolean {
  return typeof err === 'object' && err !== null && markedFailures.has(err);
}

export function isRetryable(err: unknown): boolean {
  return err instanceof StoreError && err.retryable;
}

/**
 * Runs `operation` until it succeeds, fails permanently, or runs out of attempts. The delay grows
 * exponentially with full jitter, so many workers throttled at once do not retry in lockstep.
 */
export async function withRetry<T>(operation: () => Promise<T>, policy: RetryPolicy, signal?: AbortSignal): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await operation();
    } catch (err) {
      if (failedAtOnce(err)) throw err;
      if (!isRetryable(err) || attempt >= policy.attempts || signal?.aborted) throw err;
      await backOff(err as StoreError, attempt, policy, signal);
      // Aborted while waiting: no further attempt.
      if (signal?.aborted) throw err;
    }
  }
}

/**
 * Reports the retry after failed attempt `attempt` and waits its delay (exponential, full jitter),
 * or until `signal` aborts: an interrupt does not wait out a backoff of up to maxDelayMs.
 */
export async function backOff(err: StoreError, attempt: number, policy: RetryPolicy, signal?: AbortSignal): Promise<void> {
  const cap = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
  const delay = Math.round(Math.random() * cap);
  policy.onRetry?.(err, attempt, delay);
  // An abort ends the wait; the caller's next check of the signal stops the retries.
  await sleep(delay, undefined, signal ? { signal } : {}).catch(() => undefined);
}

/**
 * A stream that breaks mid-copy (reset, truncated body) is worth another try; an abort is not,
 * nor a failure marked failsAtOnce (a local write, a call retried already).
 */
export function asRetryable(err: unknown, doing: string, signal?: AbortSignal): unknown {
  if (err instanceof StoreError || failedAtOnce(err) || signal?.aborted) return err;
  const { code, name } = err as { code?: unknown; name?: unknown };
  const cause = typeof code === 'string' ? code : typeof name === 'string' && name !== 'Error' ? name : undefined;
  return new StoreError(`${doing}: ${(err as Error).message ?? String(err)}`, true, { cause: err, ...(cause ? { code: cause } : {}) });
}

/**
 * Retries every idempotent call of a store. A put whose body is a stream cannot be replayed, so it
 * is tried once here; callers that can reopen the source retry the whole copy with `withRetry`.
 */
export class RetryStore implements ObjectStore {
  readonly description: string;
  constructor(readonly inner: ObjectStore, readonly policy: RetryPolicy = defaultRetryPolicy) {
    this.description = inner.description;
  }
  check(): Promise<void> {
    return withRetry(() => this.inner.check(), { ...this.policy, attempts: Math.min(this.policy.attempts, 3) });
  }
  async *list(prefix?: string): AsyncIterable<ObjectInfo> {
    // Resume a failed listing after the last key yielded, so no key is yielded twice.
    let last: string | undefined;
    for (let attempt = 1; ; attempt++) {
      try {
        const resumeAfter = attempt > 1 && last !== undefined ? Buffer.from(last) : undefined;
        for await (const info of this.inner.list(prefix)) {
          // Only a restarted listing needs the comparison that skips keys already yielded.
          if (resumeAfter && Buffer.compare(Buffer.from(info.key), resumeAfter) <= 0) continue;
          last = info.key;
          yield info;
        }
        return;
      } catch (err) {
        if (!isRetryable(err) || attempt >= this.policy.attempts) throw err;
        const delay = Math.round(Math.random() * Math.min(this.policy.maxDelayMs, this.policy.baseDelayMs * 2 ** (attempt - 1)));
        this.policy.onRetry?.(err as StoreError, attempt, delay);
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }
  stat(key: string): Promise<ObjectInfo | undefined> {
    return withRetry(() => this.inner.stat(key), this.policy);
  }
  get(key: string, signal?: AbortSignal): Promise<Readable> {
    return withRetry(() => this.inner.get(key, signal), this.policy, signal);
  }
  put(key: string, body: Readable | Buffer, options?: PutOptions, signal?: AbortSignal): Promise<void> {
    if (Buffer.isBuffer(body)) return withRetry(() => this.inner.put(key, body, options, signal), this.policy, signal);
    return this.inner.put(key, body, options, signal);
  }
  remove(keys: string[]): Promise<void> {
    return withRetry(() => this.inner.remove(keys), this.policy);
  }
  get md5CheckedPutLimit(): number | undefined {
    return this.inner.md5CheckedPutLimit;
  }
}

/**
 * A whole object, read again from its start when its body breaks mid-read (a reset connection),
 * under the policy of the RetryStore the store is or wraps. Opening it is retried by that store
 * already (failsAtOnce: not again here); an object that fails otherwise (one that does not
 * decrypt) is not read again.
 */
export function readWhole(store: ObjectStore, key: string, policy: RetryPolicy = policyOf(store)): Promise<Buffer> {
  return withRetry(async () => {
    const stream = await failsAtOnce(store.get(key));
    const chunks: Buffer[] = [];
    try {
      for await (const chunk of stream) chunks.push(chunk as Buffer);
    } catch (err) {
      throw asRetryable(err, `reading ${key}`);
    }
    return Buffer.concat(chunks);
  }, policy);
}

/**
 * The retry policy of the RetryStore that `store` is or wraps (an encrypting store wraps one),
 * so a read through it counts its retries where the run counts them; else the default.
 */
export function policyOf(store: ObjectStore): RetryPolicy {
  for (let s: ObjectStore | undefined = store; s; s = (s as { inner?: ObjectStore }).inner) if (s instanceof RetryStore) return s.policy;
  return defaultRetryPolicy;
}
