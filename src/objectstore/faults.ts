import { Readable, Transform } from 'node:stream';
import { z } from 'zod';
import { ACCESS_DENIED, StoreError, type ObjectInfo, type ObjectStore, type PutOptions } from './store.js';

/**
 * Fault injection for tests and the hidden debug switch PACHBACKUP_FAULTS: a decorator that
 * makes chosen operations fail the ways real stores fail.
 */
export const faultRuleSchema = z
  .object({
    /** Which store: the config key of its section (`cluster.objectStore`, `repository`, `restore.objectStore`). */
    store: z.string(),
    /**
     * `copy`: a server-side copy (CopyObject, when the cluster bucket and the repository share an S3
     * service) into `repository`, the store it writes; `keyContains` matches the source key.
     */
    op: z.enum(['list', 'stat', 'get', 'put', 'remove', 'check', 'copy']),
    /** Only keys containing this text. */
    keyContains: z.string().optional(),
    /** Let this many matching calls through before faults start. */
    after: z.number().int().nonnegative().default(0),
    /** Probability of a fault once started (1 = every call). */
    rate: z.number().min(0).max(1).default(1),
    /** At most this many faults (default unlimited). */
    limit: z.number().int().positive().optional(),
    /**
     * transient: retryable 503 SlowDown; permanent: non-retryable; delay: wait `ms` then proceed;
     * truncate: a get whose body ends early; reset: a get whose body errors mid-stream. A copy has
     * no body here to break: truncate and reset are refused for op `copy`.
     */
    kind: z.enum(['transient', 'permanent', 'delay', 'truncate', 'reset']),
    ms: z.number().nonnegative().default(0),
  })
  .strict()
  .refine((rule) => rule.op !== 'copy' || (rule.kind !== 'truncate' && rule.kind !== 'reset'), {
    message: 'kind truncate and reset break the body of a get; a server-side copy (op copy) streams no body through pachbackup: use transient, permanent or delay',
    path: ['kind'],
  })
  .refine((rule) => rule.op !== 'copy' || rule.store === 'repository', {
    message: 'op copy applies to store "repository": server-side copies write only into the repository',
    path: ['store'],
  });
export type FaultRule = z.infer<typeof faultRuleSchema>;

export function faultsFromEnv(env: NodeJS.ProcessEnv = process.env): FaultRule[] {
  const text = env.PACHBACKUP_FAULTS;
  if (!text) return [];
  const parsed = z.array(faultRuleSchema).safeParse(JSON.parse(text));
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new Error(`PACHBACKUP_FAULTS is not a valid list of fault rules: ${issue?.message}${issue?.path.length ? ` (at ${issue.path.map((p) => (typeof p === 'number' ? `[${p}]` : `.${String(p)}`)).join('')})` : ''}`);
  }
  return parsed.data;
}

/** The rules' counters, and the faults they inject. */
class Faults {
  readonly #state: Array<{ rule: FaultRule; seen: number; fired: number }>;
  injected = 0;

  constructor(rules: FaultRule[]) {
    this.#state = rules.map((rule) => ({ rule, seen: 0, fired: 0 }));
  }

  private pick(op: FaultRule['op'], key: string): FaultRule | undefined {
    for (const s of this.#state) {
      if (s.rule.op !== op || (s.rule.keyContains && !key.includes(s.rule.keyContains))) continue;
      s.seen++;
      if (s.seen <= s.rule.after) continue;
      if (s.rule.limit !== undefined && s.fired >= s.rule.limit) continue;
      if (Math.random() >= s.rule.rate) continue;
      s.fired++;
      this.injected++;
      return s.rule;
    }
    return undefined;
  }

  /** Throws the fault a rule picks for this call, or waits (delay); returns the rule that fired. */
  async before(op: FaultRule['op'], key: string): Promise<FaultRule | undefined> {
    const rule = this.pick(op, key);
    if (!rule) return undefined;
    if (rule.kind === 'transient') throw new StoreError(`injected fault: ${op} ${key}: SlowDown (HTTP 503)`, true, { code: 'SlowDown' });
    if (rule.kind === 'permanent') throw new StoreError(`injected fault: ${op} ${key}: AccessDenied (HTTP 403)`, false, { code: ACCESS_DENIED });
    if (rule.kind === 'delay') await new Promise((r) => setTimeout(r, rule.ms));
    return rule;
  }
}

/**
 * `copy`, a server-side copy into `store` called with the source key first, with the rules of op
 * `copy` for that store applied to each call: the errors are those of the other operations (a
 * retryable SlowDown, a non-retryable AccessDenied), so the caller classifies them as it does the
 * service's. `copy` itself when no rule asks for copy faults.
 */
export function withCopyFaults<A extends unknown[], R>(store: string, copy: (key: string, ...rest: A) => Promise<R>, rules: FaultRule[] = faultsFromEnv()): (key: string, ...rest: A) => Promise<R> {
  const copyRules = rules.filter((rule) => rule.op === 'copy' && rule.store === store);
  if (copyRules.length === 0) return copy;
  const faults = new Faults(copyRules);
  return async (key, ...rest) => {
    await faults.before('copy', key);
    return copy(key, ...rest);
  };
}

export class FaultStore implements ObjectStore {
  readonly description: string;
  readonly #faults: Faults;

  constructor(readonly inner: ObjectStore, rules: FaultRule[]) {
    this.description = inner.description;
    this.#faults = new Faults(rules);
  }

  /** Faults injected so far, for tests and reports. */
  get injected(): number {
    return this.#faults.injected;
  }

  private before(op: FaultRule['op'], key: string): Promise<FaultRule | undefined> {
    return this.#faults.before(op, key);
  }

  async check(): Promise<void> {
    await this.before('check', '');
    return this.inner.check();
  }
  async *list(prefix = ''): AsyncIterable<ObjectInfo> {
    await this.before('list', prefix);
    yield* this.inner.list(prefix);
  }
  async stat(key: string): Promise<ObjectInfo | undefined> {
    await this.before('stat', key);
    return this.inner.stat(key);
  }
  async get(key: string, signal?: AbortSignal): Promise<Readable> {
    const rule = await this.before('get', key);
    const body = await this.inner.get(key, signal);
    if (rule?.kind === 'truncate' || rule?.kind === 'reset') return breakStream(body, rule.kind);
    return body;
  }
  async put(key: string, body: Readable | Buffer, options?: PutOptions, signal?: AbortSignal): Promise<void> {
    await this.before('put', key);
    return this.inner.put(key, body, options, signal);
  }
  async remove(keys: string[]): Promise<void> {
    await this.before('remove', keys[0] ?? '');
    return this.inner.remove(keys);
  }
  get md5CheckedPutLimit(): number | undefined {
    return this.inner.md5CheckedPutLimit;
  }
}

/** Passes the first half of the first chunk, then ends early (truncate) or errors (reset). */
function breakStream(body: Readable, kind: 'truncate' | 'reset'): Readable {
  let passed = false;
  const out = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      if (passed) return cb();
      passed = true;
      this.push(chunk.subarray(0, Math.floor(chunk.length / 2)));
      body.unpipe(out);
      body.destroy();
      if (kind === 'reset') return cb(Object.assign(new Error('injected fault: read ECONNRESET'), { code: 'ECONNRESET' }));
      this.push(null);
      cb();
    },
  });
  return body.pipe(out);
}
