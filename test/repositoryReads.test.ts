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
import { FaultStore, type FaultRule } from '../src/objectstore/faults.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { RetryStore, RetryTally } from '../src/objectstore/retry.js';
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
