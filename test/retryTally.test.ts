/**
 * Retries are counted per run and by cause, so that a backup or restore that was throttled says so
 * in its summary (and metrics) instead of only taking longer. Real filesystem store under the
 * fault-injection decorator, as the engine wraps stores.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FaultStore, type FaultRule } from '../src/objectstore/faults.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { failsAtOnce, RetryStore, RetryTally, retriesText, withRetry } from '../src/objectstore/retry.js';
import { StoreError } from '../src/objectstore/store.js';
import { checkStoredFile } from '../src/engine/verify.js';
import { sha256Hex } from '../src/repository/digest.js';
import { Repository } from '../src/repository/repository.js';

const fast = { attempts: 8, baseDelayMs: 1, maxDelayMs: 2 };

function rule(r: Partial<FaultRule> & Pick<FaultRule, 'op' | 'kind'>): FaultRule {
  return { store: 'repository', after: 0, rate: 1, ms: 0, ...r };
}

describe('retry tally', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pb-retry-'));
  });
  after(async () => rm(dir, { recursive: true, force: true }));

  test('every retry is counted by cause, the first of each cause is reported once, and the work succeeds', async () => {
    const reported: string[] = [];
    const tally = new RetryTally((cause) => reported.push(cause));
    const inner = new FaultStore(new FsObjectStore(dir), [rule({ op: 'put', kind: 'transient', limit: 3 }), rule({ op: 'stat', kind: 'transient', limit: 2 })]);
    const store = new RetryStore(inner, tally.policy(fast));
    await store.put('a/b', Buffer.from('hello'));
    assert.equal((await store.stat('a/b'))?.size, 5);
    // A cause of another kind, through withRetry as the copy loops use it.
    let failures = 1;
    const value = await withRetry(
      async () => {
        if (failures-- > 0) throw new StoreError('reading x: read ECONNRESET', true, { code: 'ECONNRESET' });
        return 42;
      },
      tally.policy(fast),
    );
    assert.equal(value, 42);
    assert.deepEqual(tally.summary(), { count: 6, causes: { SlowDown: 5, ECONNRESET: 1 } });
    assert.deepEqual(reported, ['SlowDown', 'ECONNRESET'], 'the first retry of each cause is reported, once');
    assert.equal(retriesText(tally.summary()), '6 (SlowDown 5, ECONNRESET 1)');
  });

  test('a permanent fault is not retried nor counted; a run without faults reports none', async () => {
    const tally = new RetryTally();
    const store = new RetryStore(new FaultStore(new FsObjectStore(dir), [rule({ op: 'get', kind: 'permanent' })]), tally.policy(fast));
    await store.put('c', Buffer.from('x'));
    await assert.rejects(store.get('c'), (err: unknown) => err instanceof StoreError && !err.retryable);
    assert.deepEqual(tally.summary(), { count: 0, causes: {} });
    assert.equal(retriesText(tally.summary()), 'none');
  });

  test('retries that run out still count, and the last error is the one thrown', async () => {
    const tally = new RetryTally();
    const store = new RetryStore(new FaultStore(new FsObjectStore(dir), [rule({ op: 'stat', kind: 'transient' })]), tally.policy({ ...fast, attempts: 3 }));
    await assert.rejects(store.stat('c'), (err: unknown) => err instanceof StoreError && /SlowDown/.test(err.message));
    assert.deepEqual(tally.summary(), { count: 2, causes: { SlowDown: 2 } });
  });

  test('failsAtOnce: a call retried already (or a local write) ends the enclosing withRetry at once, with its own error', async () => {
    const tally = new RetryTally();
    let runs = 0;
    const original = new StoreError('reading k: SlowDown (HTTP 503)', true, { code: 'SlowDown' });
    await assert.rejects(
      withRetry(async () => {
        runs++;
        await failsAtOnce(Promise.reject(original));
      }, tally.policy(fast)),
      (err: unknown) => err === original,
    );
    assert.equal(runs, 1);
    assert.equal(tally.count, 0);
  });

  test('an abort during the wait before a retry ends the wait at once, with the last error, and the operation is not run again (an interrupt or the downtime budget does not wait out a backoff of up to 10 s)', async () => {
    const original = new StoreError('reading k: SlowDown (HTTP 503)', true, { code: 'SlowDown' });
    const controller = new AbortController();
    let runs = 0;
    const random = Math.random;
    Math.random = () => 0.99;
    try {
      setTimeout(() => controller.abort(new Error('interrupted')), 50);
      const started = Date.now();
      const outcome = await Promise.race([
        withRetry(
          async () => {
            runs++;
            throw original;
          },
          { attempts: 8, baseDelayMs: 30_000, maxDelayMs: 30_000 },
          controller.signal,
        ).then(
          () => 'resolved',
          (err: unknown) => (err === original ? 'the last error' : `another error: ${String(err)}`),
        ),
        new Promise<string>((resolve) => setTimeout(() => resolve('still waiting after 3 s'), 3000).unref()),
      ]);
      assert.equal(outcome, 'the last error');
      assert.ok(Date.now() - started < 1000);
      assert.equal(runs, 1);
    } finally {
      Math.random = random;
    }
  });

  test("verify of an object whose reads keep failing: the store's 8 attempts, not 8 more for each retry of the body; a mid-body reset is read again", async () => {
    const data = Buffer.from('some object bytes');
    const expected = { size: data.length, checksum: sha256Hex(data) };
    let gets = 0;
    class Counting extends FsObjectStore {
      override async get(key: string): Promise<Readable> {
        gets++;
        return super.get(key);
      }
    }
    const counting = new Counting(dir);
    await counting.put('objects/o', data);
    const tally = new RetryTally();
    const failing = new Repository(new RetryStore(new FaultStore(counting, [rule({ op: 'get', kind: 'transient' })]), tally.policy(fast)));
    await assert.rejects(checkStoredFile(failing, 'objects/o', expected), (err: unknown) => err instanceof StoreError && /SlowDown/.test(err.message));
    assert.equal(gets, 0, 'the fault comes before the inner store');
    assert.equal(tally.count, 7, 'eight attempts in all: the retries of the store only');
    // Two resets mid-body, then a whole read: the object checks out, read three times.
    gets = 0;
    const flaky = new Repository(new RetryStore(new FaultStore(counting, [rule({ op: 'get', kind: 'reset', limit: 2 })]), fast));
    assert.equal(await checkStoredFile(flaky, 'objects/o', expected), undefined);
    assert.equal(gets, 3);
    // A local copy that cannot be written (here: its directory does not exist; a full disk alike) is
    // no fault of the store: one read, then the write's own error.
    gets = 0;
    const plain = new Repository(new RetryStore(counting, tally.policy(fast)));
    await assert.rejects(checkStoredFile(plain, 'objects/o', expected, undefined, join(dir, 'no-such-dir', 'copy')), (err: unknown) => (err as NodeJS.ErrnoException).code === 'ENOENT' && !(err instanceof StoreError));
    assert.equal(gets, 1, 'the object was read once, not again for a local write error');
  });
});
