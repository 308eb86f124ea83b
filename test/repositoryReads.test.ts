/**
 * Reads of the repository's own files whose body breaks mid-read (a reset connection): the
 * repository config, small files read whole (manifests, journals, an index read at once) and
 * gzip files streamed line by line (indexes, referenced-key lists). Each is read again from its
 * start; a streamed file hands out every line exactly once. Real files on disk under the fault
 * decorator (kind `reset`: half of the first chunk, then ECONNRESET) and the retry decorator.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Readable } from 'node:stream';
import { FaultStore, type FaultRule } from '../src/objectstore/faults.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { defaultRetryPolicy, policyOf, RetryStore, RetryTally, type RetryPolicy } from '../src/objectstore/retry.js';
import type { ObjectStore } from '../src/objectstore/store.js';
import { DecryptionError } from '../src/repository/encryption.js';
import { sha256Hex } from '../src/repository/digest.js';
import type { FileRef } from '../src/repository/manifest.js';
import { layout, Repository, RepositoryError, type IndexEntry } from '../src/repository/repository.js';

const ENTRIES = 20_000;

describe('repository reads that break mid-body', () => {
  let dir: string;
  let entries: IndexEntry[];
  let index: FileRef;
  const indexPath = 'backups/20261124T000000Z-test/index.gz';

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pbt-reads-'));
    const clean = new Repository(new FsObjectStore(dir));
    await clean.open(true);
    // Random checksums: the gzip stays large enough that a break after half of its first chunk falls mid-file.
    entries = Array.from({ length: ENTRIES }, (_, i) => ({ key: `chunk/${String(i).padStart(8, '0')}`, size: i, checksum: randomBytes(32).toString('hex') }));
    index = await clean.writeIndex(indexPath, entries);
    assert.ok(index.size > 128 * 1024, `the index spans several chunks (${index.size} bytes)`);
  });
  after(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** A repository over the directory with these faults, retrying with short delays into `tally`. */
  async function faulty(rules: Array<Pick<FaultRule, 'op' | 'kind'> & Partial<FaultRule>>, tally: RetryTally): Promise<{ repo: Repository; faults: FaultStore }> {
    const faults = new FaultStore(
      new FsObjectStore(dir),
      rules.map((r) => ({ store: 'repository', after: 0, rate: 1, ms: 0, ...r })),
    );
    const repo = new Repository(new RetryStore(faults, tally.policy({ attempts: 8, baseDelayMs: 1, maxDelayMs: 5 })));
    await repo.open(false);
    return { repo, faults };
  }

  test('a streamed index whose read breaks twice: read again from its start, every entry exactly once, checksum checked', async () => {
    const tally = new RetryTally();
    const { repo, faults } = await faulty([{ op: 'get', keyContains: 'index.gz', kind: 'reset', limit: 2 }], tally);
    const read: IndexEntry[] = [];
    for await (const entry of repo.streamIndex(index)) read.push(entry);
    assert.equal(faults.injected, 2);
    assert.deepEqual(tally.summary(), { count: 2, causes: { ECONNRESET: 2 } });
    assert.equal(read.length, ENTRIES, 'no entry lost or handed out twice');
    assert.deepEqual(read, entries);
  });

  test('a consumer that stops early after a break: no error, nothing more read', async () => {
    const tally = new RetryTally();
    const { repo } = await faulty([{ op: 'get', keyContains: 'index.gz', kind: 'reset', limit: 1 }], tally);
    const read: IndexEntry[] = [];
    for await (const entry of repo.streamIndex(index)) {
      read.push(entry);
      if (read.length === 5_000) break;
    }
    assert.deepEqual(read, entries.slice(0, 5_000));
  });

  test('a file read whole (the index at once, the repository config) whose read breaks: read again', async () => {
    const tally = new RetryTally();
    const { repo } = await faulty([{ op: 'get', keyContains: 'index.gz', kind: 'reset', limit: 1 }], tally);
    assert.deepEqual(await repo.readIndex(index), entries);
    assert.deepEqual(tally.summary(), { count: 1, causes: { ECONNRESET: 1 } });
    // Opening reads the config; the break happens before the test's own reads.
    const configTally = new RetryTally();
    await faulty([{ op: 'get', keyContains: layout.config, kind: 'reset', limit: 1 }], configTally);
    assert.deepEqual(configTally.summary(), { count: 1, causes: { ECONNRESET: 1 } });
  });

  test('a read that keeps breaking ends with the read error after the policy\'s attempts, not as corruption', async () => {
    const tally = new RetryTally();
    const { repo } = await faulty([{ op: 'get', keyContains: 'index.gz', kind: 'reset' }], tally);
    await assert.rejects(
      async () => {
        for await (const _ of repo.streamIndex(index)) void _;
      },
      (err: unknown) => !(err instanceof RepositoryError) && /ECONNRESET/.test((err as Error).message),
    );
    assert.equal(tally.count, 7, '8 attempts: 7 retries');
  });

  /**
   * A repository whose first read of the index serves `first` instead: 64 KiB of it, then the
   * error `breakWith` (the stream ends there). Later reads are the file's own.
   */
  async function firstReadReplaced(first: Buffer, breakWith: Error, tally: RetryTally, policy?: RetryPolicy): Promise<Repository> {
    const inner = new FsObjectStore(dir);
    let reads = 0;
    const store = new Proxy(inner, {
      get(target, prop) {
        if (prop === 'get') {
          return async (key: string): Promise<Readable> => {
            if (!key.endsWith('index.gz') || reads++ > 0) return target.get(key);
            let sent = false;
            return new Readable({
              read() {
                if (sent) {
                  // Later, so that the lines of the first 64 KiB reach the consumer before the break.
                  setTimeout(() => this.destroy(breakWith), 100);
                  return;
                }
                sent = true;
                this.push(first.subarray(0, 64 * 1024));
              },
            });
          };
        }
        const value = Reflect.get(target, prop, target) as unknown;
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
      },
    }) as ObjectStore;
    const repo = new Repository(new RetryStore(store, policy ?? tally.policy({ attempts: 8, baseDelayMs: 1, maxDelayMs: 5 })));
    await repo.open(false);
    return repo;
  }

  test('a read that breaks after handing out lines: the next read skips exactly those, every entry once', async () => {
    let handedBeforeRetry = -1;
    const read: IndexEntry[] = [];
    const tally = new RetryTally();
    const counting = { ...tally.policy(), onRetry: () => void (handedBeforeRetry = read.length) };
    const reset = Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' });
    const repo = await firstReadReplaced(await readFile(join(dir, indexPath)), reset, tally, counting);
    for await (const entry of repo.streamIndex(index)) read.push(entry);
    assert.ok(handedBeforeRetry > 0 && handedBeforeRetry < ENTRIES, `the broken read handed out ${handedBeforeRetry} entries before the retry`);
    assert.deepEqual(read, entries);
  });

  test('lines handed out by a broken read that the next read does not confirm: corrupt, not a silent mix of two versions', async () => {
    // Another version of the index: the same keys, other checksums.
    const other = entries.map((e) => ({ ...e, checksum: randomBytes(32).toString('hex') }));
    const otherRef = await new Repository(new FsObjectStore(dir)).writeIndex('backups/20261124T000000Z-test/other.gz', other);
    const reset = Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' });
    const tally = new RetryTally();
    const repo = await firstReadReplaced(await readFile(join(dir, otherRef.file)), reset, tally);
    const read: IndexEntry[] = [];
    await assert.rejects(
      async () => {
        for await (const entry of repo.streamIndex(index)) read.push(entry);
      },
      (err: unknown) => err instanceof RepositoryError && /read differently after a broken read/.test(err.message),
      `read ${read.length}, tally ${tally.count}`,
    );
    assert.ok(read.length > 0 && read.length < ENTRIES, `the broken read handed out ${read.length} entries first (tally ${tally.count})`);
    assert.equal(tally.count, 1, 'read again once, then refused');
  });

  test('a read that fails for good mid-body (a file that does not decrypt): reported corrupt, not read again', async () => {
    const tally = new RetryTally();
    const repo = await firstReadReplaced(await readFile(join(dir, indexPath)), new DecryptionError(`${indexPath}: segment 1 fails authentication`), tally);
    await assert.rejects(
      async () => {
        for await (const _ of repo.streamIndex(index)) void _;
      },
      (err: unknown) => err instanceof RepositoryError && /is corrupt/.test(err.message),
    );
    assert.equal(tally.count, 0);
  });

  test('a damaged index is reported as corrupt, and not read again', async () => {
    const damagedPath = 'backups/20261124T000000Z-test/damaged.gz';
    const data = await readFile(join(dir, indexPath));
    const damaged = Buffer.from(data);
    damaged[Math.floor(damaged.length / 2)]! ^= 0xff;
    await writeFile(join(dir, damagedPath), damaged);
    const ref: FileRef = { file: damagedPath, size: damaged.length, sha256: sha256Hex(data) };
    const tally = new RetryTally();
    const { repo } = await faulty([], tally);
    await assert.rejects(
      async () => {
        for await (const _ of repo.streamIndex(ref)) void _;
      },
      (err: unknown) => err instanceof RepositoryError && /is corrupt/.test(err.message),
    );
    assert.equal(tally.count, 0);
  });
});

test("policyOf finds the RetryStore a store is or wraps (an encrypting store's), so reads through it count their retries", () => {
  const retrying = new RetryStore(new FsObjectStore(tmpdir()), { attempts: 3, baseDelayMs: 1, maxDelayMs: 1 });
  assert.equal(policyOf(retrying), retrying.policy);
  assert.equal(policyOf({ inner: { inner: retrying } } as unknown as ObjectStore), retrying.policy);
  assert.equal(policyOf(new FsObjectStore(tmpdir())), defaultRetryPolicy);
});
