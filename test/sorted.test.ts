/**
 * The key-ordered streams a backup merges instead of holding maps (src/objectstore/sorted.ts), and
 * the ordered copy built on them (copyPlanned): real files in a temporary directory, a real
 * directory store as the source and a real repository.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { copyPlanned, CopyJournal, planCopy, readEntries, type PlanItem } from '../src/engine/objects.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { compareKeys, Cursor, inKeyOrder, KeyOrderError, mergeByKey, readRows, RowWriter, ScratchDir, sortByKey } from '../src/objectstore/sorted.js';
import { sha256Hex } from '../src/repository/digest.js';
import { Repository } from '../src/repository/repository.js';

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of items) out.push(item);
  return out;
}

/** Random strings over ASCII, Latin, BMP private-use (E000–FFFF) and astral (surrogate pairs) characters. */
function randomKey(): string {
  const pools = [
    () => String.fromCharCode(0x21 + Math.floor(Math.random() * 90)),
    () => String.fromCharCode(0xc0 + Math.floor(Math.random() * 0x40)),
    () => String.fromCharCode(0xe000 + Math.floor(Math.random() * 0x1fff)),
    () => String.fromCodePoint(0x10000 + Math.floor(Math.random() * 0x1000)),
  ];
  let key = '';
  const length = 1 + Math.floor(Math.random() * 6);
  for (let i = 0; i < length; i++) key += pools[Math.floor(Math.random() * pools.length)]!();
  return key;
}

describe('key order', () => {
  test('compareKeys orders keys exactly as their UTF-8 bytes (the order S3 lists in)', () => {
    const keys = Array.from({ length: 3000 }, randomKey);
    const byBytes = [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
    const byCompare = [...keys].sort(compareKeys);
    assert.deepEqual(byCompare, byBytes);
    // The case JavaScript's own comparison gets wrong: U+FFFD sorts before U+10000 in UTF-8.
    assert.ok(compareKeys('\ufffd', '\u{10000}') < 0);
    assert.ok('\ufffd' > '\u{10000}', 'UTF-16 code unit order disagrees, which is why compareKeys exists');
  });

  test('inKeyOrder passes ordered input and names the first key out of order', async () => {
    const ok = await collect(inKeyOrder([{ key: 'a' }, { key: 'b' }, { key: 'c/d' }], 'test listing'));
    assert.equal(ok.length, 3);
    await assert.rejects(collect(inKeyOrder([{ key: 'a' }, { key: 'c' }, { key: 'b' }], 'test listing')), (err: Error) => {
      assert.ok(err instanceof KeyOrderError);
      assert.match(err.message, /test listing is not in key order \("b" after "c"\)/);
      return true;
    });
    await assert.rejects(collect(inKeyOrder([{ key: 'a' }, { key: 'a' }], 'dup')), KeyOrderError);
  });

  test('Cursor.seek finds keys in ascending lookups and reports the ones skipped; mergeByKey merges two ordered streams', async () => {
    async function* items(keys: string[]): AsyncGenerator<{ key: string }> {
      for (const key of keys) yield { key };
    }
    const cursor = new Cursor(items(['a', 'c', 'e', 'g']));
    const skipped: string[] = [];
    assert.equal((await cursor.seek('a'))?.key, 'a');
    assert.equal(await cursor.seek('b'), undefined);
    assert.equal((await cursor.seek('e', (i) => skipped.push(i.key)))?.key, 'e');
    await cursor.drain((i) => skipped.push(i.key));
    assert.deepEqual(skipped, ['c', 'g']);
    const merged = await collect(mergeByKey(items(['a', 'c', 'd', 'x']), [{ key: 'b' }, { key: 'd' }, { key: 'z' }]));
    assert.deepEqual(
      merged.map((m) => m.key),
      ['a', 'b', 'c', 'd', 'x', 'z'],
    );
  });

  test('RowWriter and readRows round-trip rows through a scratch file; the scratch directory is removed whole', async () => {
    const scratch = await ScratchDir.create();
    const out = new RowWriter(scratch.file('rows'));
    const rows = Array.from({ length: 5000 }, (_, i) => [`k${String(i).padStart(5, '0')}`, i, i % 2 === 0 ? sha256Hex(String(i)) : null]);
    for (const row of rows) await out.write(row);
    await out.close();
    assert.equal(out.rows, 5000);
    assert.deepEqual(await collect(readRows(out.path)), rows);
    await scratch.remove();
    await assert.rejects(readdir(scratch.path), /ENOENT/);
  });
});

describe('sortByKey', () => {
  for (const runSize of [1_000_000, 97, 7]) {
    test(`sorts ${runSize === 1_000_000 ? 'in one run' : `through runs of ${runSize}`}: key order, every key once, the last occurrence of a key kept`, async () => {
      const keys = Array.from({ length: 400 }, randomKey);
      // Every key written up to three times; the value says which occurrence it was.
      const items = Array.from({ length: 1000 }, (_, i) => ({ key: keys[i % keys.length]!, size: i }));
      const expected = new Map<string, number>();
      for (const item of items) expected.set(item.key, item.size);
      const scratch = await ScratchDir.create();
      try {
        const sorted = await sortByKey(
          (async function* () {
            yield* items;
          })(),
          scratch,
          'test',
          (e) => [e.key, e.size],
          async function* (path) {
            for await (const row of readRows(path)) yield { key: row[0] as string, size: row[1] as number };
          },
          runSize,
        );
        const rows = await collect(readRows(sorted.path));
        assert.equal(sorted.count, expected.size);
        assert.deepEqual(rows.map((r) => r[0]), [...expected.keys()].sort(compareKeys));
        for (const [key, size] of rows as Array<[string, number]>) assert.equal(size, expected.get(key), `the last occurrence of ${key}`);
      } finally {
        await scratch.remove();
      }
    });
  }
});

describe('directory store listing of a large directory', () => {
  test('a directory larger than the in-memory limit lists the same keys in the same (S3) order, through scratch files that are removed, also when the listing stops early', async () => {
    const root = await mkdtemp(join(tmpdir(), 'pb-fslist-'));
    try {
      // Names whose order differs between UTF-16 and UTF-8, and directories that sort among files ('a/' vs 'a-b', 'a0').
      const files = ['a-b', 'a0', 'ä', 'z', '\u{1F600}', '\uFFFD', 'B', 'a.txt', ...Array.from({ length: 300 }, (_, i) => `chunk${randomBytes(4).toString('hex')}${i}`)];
      const nested = ['a/x', 'a/y', 'a/big/1', 'a/big/2', 'a/big/3', 'a/big/4', 'a/big/5', 'a/big/6', 'a/big/7', 'a/big/8', 'zz/q'];
      const store = new FsObjectStore(root);
      for (const key of [...files, ...nested]) await store.put(key, Buffer.from(key));
      const listed = async (s: FsObjectStore, prefix?: string): Promise<string[]> => {
        const keys: string[] = [];
        for await (const info of s.list(prefix)) keys.push(info.key);
        return keys;
      };
      const expected = [...files, ...nested].sort(compareKeys);
      assert.deepEqual(await listed(store), expected, 'in memory');
      const scratchOfThisProcess = async (): Promise<string[]> => (await readdir(tmpdir())).filter((n) => n.startsWith(`pachbackup-scratch-${process.pid}-`));
      const before = await scratchOfThisProcess();
      // A limit of 7 names: the root (309 names) and a/big (8) are sorted on disk, in runs of 7.
      const spilling = new FsObjectStore(root, { namesInMemory: 7 });
      assert.deepEqual(await listed(spilling), expected, 'through scratch files');
      assert.deepEqual(await listed(spilling, 'a/b'), expected.filter((k) => k.startsWith('a/b')), 'with a prefix');
      let seen = 0;
      for await (const _ of spilling.list()) if (++seen === 20) break;
      assert.deepEqual(await scratchOfThisProcess(), before, 'no scratch directory left behind');
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});

describe('directory store listing through symbolic links', () => {
  test('a directory or file reached through a symbolic link is listed as the keys under it (a repository whose objects/ was moved to another disk), as stat and get see them; a link back to an ancestor is not followed round', async () => {
    const base = await mkdtemp(join(tmpdir(), 'pb-fslinks-'));
    try {
      const root = join(base, 'repo');
      const elsewhere = join(base, 'other-disk');
      const keys = ['objects/chunk/a', 'objects/chunk/b', 'objects/test/c'];
      await new FsObjectStore(elsewhere).put('chunk/a', Buffer.from('a'));
      await new FsObjectStore(elsewhere).put('chunk/b', Buffer.from('b'));
      await new FsObjectStore(elsewhere).put('test/c', Buffer.from('c'));
      const store = new FsObjectStore(root);
      await store.put('config', Buffer.from('{}'));
      await store.put('manifest', Buffer.from('m'));
      await symlink(elsewhere, join(root, 'objects'));
      await symlink(join(root, 'manifest'), join(root, 'linked-file'));
      // A loop: other-disk/chunk/up -> other-disk.
      await symlink(elsewhere, join(elsewhere, 'chunk', 'up'));
      // A dangling link is no key.
      await symlink(join(base, 'nowhere'), join(root, 'dangling'));
      for (const key of keys) assert.ok(await store.stat(key), `stat sees ${key}`);
      const listed = (await collect(store.list())).map((info) => info.key);
      assert.deepEqual(listed, ['config', 'linked-file', 'manifest', ...keys].sort(compareKeys));
      assert.deepEqual((await collect(store.list('objects/'))).map((info) => info.key), keys);
    } finally {
      await rm(base, { recursive: true, force: true });
    }
  });
});

describe('scratch directories', () => {
  test('a new scratch directory removes those of processes no longer running, and keeps those of live ones', async () => {
    const base = await mkdtemp(join(tmpdir(), 'pachbackup-scratchbase-'));
    try {
      // A pid above the kernel's maximum (4194304) cannot be running.
      await mkdir(join(base, 'pachbackup-scratch-9999999-abcdef'));
      await mkdir(join(base, `pachbackup-scratch-${process.pid}-live`));
      await mkdir(join(base, 'unrelated'));
      const scratch = await ScratchDir.create(base);
      const left = (await readdir(base)).sort();
      assert.deepEqual(left, [`pachbackup-scratch-${process.pid}-live`, scratch.path.slice(base.length + 1), 'unrelated'].sort());
    } finally {
      await rm(base, { recursive: true, force: true });
    }
  });
});

describe('copyPlanned', () => {
  let work: string;
  let source: FsObjectStore;
  let repo: Repository;
  const objects = new Map<string, Buffer>();
  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'pachbackup-sorted-'));
    await mkdir(join(work, 'source'));
    await mkdir(join(work, 'repository'));
    source = new FsObjectStore(join(work, 'source'));
    for (let i = 0; i < 300; i++) {
      // Sizes vary a lot, so copies finish out of order.
      const data = randomBytes(i % 7 === 0 ? 200_000 : 100 + i);
      const key = `chunk/${sha256Hex(String(i)).slice(0, 16)}`;
      objects.set(key, data);
      await source.put(key, data);
    }
    repo = new Repository(new FsObjectStore(join(work, 'repository')));
  });
  after(async () => rm(work, { recursive: true, force: true }));

  test('copies what the plan marks missing, passes held entries through, and writes every entry in key order', async () => {
    const keys = [...objects.keys()].sort(compareKeys);
    // Every third object is "held" already, with its checksum; the rest are copied.
    const plan: PlanItem[] = keys.map((key, i) => (i % 3 === 0 ? { key, size: objects.get(key)!.length, checksum: sha256Hex(objects.get(key)!) } : { key, size: objects.get(key)!.length }));
    const scratch = await ScratchDir.create();
    const out = new RowWriter(scratch.file('index'));
    const missing = plan.filter((p) => !p.checksum);
    const result = await copyPlanned({
      source,
      repo,
      concurrency: 8,
      journal: new CopyJournal(repo, 'test-backup'),
      emit: () => undefined,
      phase: 'copy',
      plan: (async function* () {
        yield* plan;
      })(),
      total: { objects: missing.length, bytes: missing.reduce((n, p) => n + p.size, 0) },
      out,
    });
    await out.close();
    assert.equal(result.newCount, missing.length);
    assert.equal(result.count, keys.length);
    const written = await collect(readEntries(out.path));
    assert.deepEqual(
      written.map((e) => e.key),
      keys,
      'the output is in key order although copies finished out of order',
    );
    for (const e of written) {
      assert.equal(e.checksum, sha256Hex(objects.get(e.key)!), `checksum of ${e.key}`);
      assert.equal(e.size, objects.get(e.key)!.length);
    }
    for (const item of missing) {
      const copied = Buffer.concat(await collect((await repo.store.get(`objects/${item.key}`)) as AsyncIterable<Buffer>));
      assert.ok(copied.equals(objects.get(item.key)!), `${item.key} copied byte for byte`);
    }
    await scratch.remove();
  });
});

describe('planCopy', () => {
  test('an abort stops a listing that is still going (a large bucket listed while paused): Ctrl-C and the downtime budget do not wait for its end', async () => {
    let listed = 0;
    // A listing that never ends, one object every millisecond.
    const endless = async function* () {
      for (;;) {
        await new Promise((r) => setTimeout(r, 1));
        yield { key: `chunk/${String(listed++).padStart(12, '0')}`, size: 1 };
      }
    };
    const none = { get: async () => undefined, close: async () => undefined };
    const stopped = planCopy(endless(), none, undefined, undefined, AbortSignal.timeout(200));
    const gaveUp = new Promise((_, reject) => setTimeout(() => reject(new Error(`still listing after 10 s (${listed} objects)`)), 10_000).unref());
    await assert.rejects(Promise.race([stopped, gaveUp]), (err: Error) => err.name === 'TimeoutError');
  });
});
