import { Readable, Transform } from 'node:stream';
import { z } from 'zod';
import { StoreError, type ObjectInfo, type ObjectStore, type PutOptions } from './store.js';

/**
 * Fault injection for tests and the hidden debug switch PACHBACKUP_FAULTS: a decorator that
 * makes chosen operations fail the ways real stores fail.
 */
export const faultRuleSchema = z
  .object({
    /** Which store: the config key of its section (`cluster.objectStore`, `repository`, `restore.objectStore`). */
    store: z.string(),
    op: z.enum(['list', 'stat', 'get', 'put', 'remove', 'check']),
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
     * truncate: a get whose body ends early; reset: a get whose body errors mid-stream.
     */
    kind: z.enum(['transient', 'permanent', 'delay', 'truncate', 'reset']),
    ms: z.number().nonnegative().default(0),
  })
  .strict();
export type FaultRule = z.infer<typeof faultRuleSchema>;

export function faultsFromEnv(env: NodeJS.ProcessEnv = process.env): FaultRule[] {
  const text = env.PACHBACKUP_FAULTS;
  if (!text) return [];
  const parsed = z.array(faultRuleSchema).safeParse(JSON.parse(text));
  if (!parsed.success) throw new Error(`PACHBACKUP_FAULTS is not a valid list of fault rules: ${parsed.error.issues[0]?.message}`);
  return parsed.data;
}

export class FaultStore implements ObjectStore {
  readonly description: string;
  readonly #state: Array<{ rule: FaultRule; seen: number; fired: number }>;
  /** Faults injected so far, for tests and reports. */
  injected = 0;

  constructor(readonly inner: ObjectStore, rules: FaultRule[]) {
    this.description = inner.description;
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

  private async before(op: FaultRule['op'], key: string): Promise<FaultRule | undefined> {
    const rule = this.pick(op, key);
    if (!rule) return undefined;
    if (rule.kind === 'transient') throw new StoreError(`injected fault: ${op} ${key}: SlowDown (HTTP 503)`, true, { code: 'SlowDown' });
    if (rule.kind === 'permanent') throw new StoreError(`injected fault: ${op} ${key}: AccessDenied (HTTP 403)`, false);
    if (rule.kind === 'delay') await new Promise((r) => setTimeout(r, rule.ms));
    return rule;
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
