/**
 * Edge data through a full backup and restore: an empty bucket, an object over 64 MiB, 10,000
 * small objects, keys with spaces, unicode, `%` and `+`, and a database with bytea rows of
 * several MiB. Each ends with the restored cluster compared to the source, row by row and byte
 * by byte.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import type { EngineEvent } from '../src/engine/events.js';
import { compareFingerprints, TestCluster, type StoreKind } from './helpers/cluster.js';
import { cephRgwSkipReason } from './helpers/servers.js';

const S3_KINDS: Array<{ kind: StoreKind; skip: string | false }> = [
  { kind: 's3rver', skip: false },
  { kind: 'ceph', skip: cephRgwSkipReason() ?? false },
];

/** Backs up, restores into the second server and the restore store, and proves them equal to the source. */
async function backupRestoreAndCompare(cluster: TestCluster): Promise<{ objects: number }> {
  const before = await cluster.sourceFingerprints();
  const summary = await cluster.backup();
  assert.equal(summary.objects.count, before.objects.size);
  await cluster.restore(summary.id);
  const after = await cluster.restoredFingerprints();
  assert.deepEqual(compareFingerprints(before, after), []);
  return { objects: after.objects.size };
}

test('empty bucket (s3rver): a cluster with no objects backs up and restores, databases equal, target bucket empty', { timeout: 300_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 's3rver', chunks: 0 });
  if (!cluster) return;
  try {
    const summary = await cluster.backup();
    assert.equal(summary.objects.count, 0);
    assert.equal(summary.objects.bytes, 0);
    assert.equal(summary.referencedKeys, 0);
    const before = await cluster.sourceFingerprints();
    assert.equal(before.objects.size, 0);
    const restored = await cluster.restore(summary.id);
    assert.equal(restored.objects.count, 0);
    assert.deepEqual(compareFingerprints(before, await cluster.restoredFingerprints()), []);
    assert.deepEqual(await cluster.restoredKeys(), []);
  } finally {
    await cluster.cleanup();
  }
});

/** A stream of `size` pseudo-random bytes in 1 MiB pieces; its SHA-256 is known once it has been read. */
function randomStream(size: number): { stream: Readable; digest: () => string } {
  const hash = createHash('sha256');
  let left = size;
  const stream = new Readable({
    read() {
      if (left === 0) {
        this.push(null);
        return;
      }
      const piece = randomBytes(Math.min(left, 1024 * 1024));
      left -= piece.length;
      hash.update(piece);
      this.push(piece);
    },
  });
  let hex: string | undefined;
  return { stream, digest: () => (hex ??= hash.digest('hex')) };
}

const LARGE_SIZE = 64 * 1024 * 1024 + 12_345;
const LARGE_KEY = 'large/object-over-64MiB.bin';

for (const { kind, skip } of [...S3_KINDS, { kind: 'fs' as StoreKind, skip: false as const }]) {
  test(`one object over 64 MiB (${kind}), written as a stream: same SHA-256 after restore`, { skip, timeout: 600_000 }, async (t) => {
    const cluster = await TestCluster.createOrSkip(t, { kind, chunks: 3 });
    if (!cluster) return;
    try {
      const { stream, digest } = randomStream(LARGE_SIZE);
      await cluster.clusterStore().put(LARGE_KEY, stream);
      const expected = digest();
      const before = await cluster.sourceFingerprints();
      assert.deepEqual(before.objects.get(LARGE_KEY), { size: LARGE_SIZE, sha256: expected });

      const summary = await cluster.backup();
      assert.equal(summary.objects.count, 4);
      assert.equal(summary.objects.bytes, LARGE_SIZE + 3 * 4096);
      await cluster.restore(summary.id);
      const after = await cluster.restoredFingerprints();
      assert.deepEqual(after.objects.get(LARGE_KEY), { size: LARGE_SIZE, sha256: expected });
      assert.deepEqual(compareFingerprints(before, after), []);
    } finally {
      await cluster.cleanup();
    }
  });
}

test('10,000 small objects (fs), all referenced by storage.chunk_objects: every one restored with equal bytes', { timeout: 900_000 }, async (t) => {
  const COUNT = 10_000;
  const cluster = await TestCluster.createOrSkip(t, { kind: 'fs', chunks: 0 });
  if (!cluster) return;
  try {
    // The rows pachd would write (not yet uploaded), then the objects, then uploaded = TRUE.
    const { rows } = await cluster.source.query<{ key: string }>(
      'pachyderm',
      `INSERT INTO storage.chunk_objects (chunk_id, size)
       SELECT sha256(('bulk chunk ' || n)::bytea), 100 + n % 200 FROM generate_series(1, ${COUNT}) AS n
       RETURNING 'chunk/' || encode(chunk_id, 'hex') || '.' || lpad(to_hex(gen), 16, '0') AS key`,
    );
    assert.equal(rows.length, COUNT);
    const root = cluster.dirs!.cluster;
    let next = 0;
    const writeSome = async (): Promise<void> => {
      while (next < rows.length) {
        const i = next++;
        const file = join(root, rows[i]!.key);
        if (i % 500 === 0) await mkdir(dirname(file), { recursive: true });
        await writeFile(file, randomBytes(100 + ((i + 1) % 200)));
      }
    };
    await mkdir(join(root, 'chunk'), { recursive: true });
    await Promise.all(Array.from({ length: 16 }, writeSome));
    await cluster.source.query('pachyderm', 'UPDATE storage.chunk_objects SET uploaded = TRUE, date_uploaded = now() WHERE NOT uploaded AND size BETWEEN 100 AND 299');

    const started = Date.now();
    const before = await cluster.sourceFingerprints();
    assert.equal(before.objects.size, COUNT);
    const summary = await cluster.backup();
    assert.equal(summary.objects.count, COUNT);
    assert.equal(summary.referencedKeys, COUNT);
    await cluster.restore(summary.id);
    const after = await cluster.restoredFingerprints();
    assert.equal(after.objects.size, COUNT);
    assert.deepEqual(compareFingerprints(before, after), []);
    t.diagnostic(`backup, restore and both fingerprints of ${COUNT} objects took ${Date.now() - started} ms`);
  } finally {
    await cluster.cleanup();
  }
});

/** Keys S3 clients and servers get wrong: spaces, unicode (NFC and NFD), `%`, `+`, an empty object. */
const TRICKY_KEYS = [
  'special/with space.bin',
  'special/two  spaces and a trailing space .bin',
  'special/ünïcødé/日本語-файл-🐘.bin',
  'special/é-nfc.bin',
  'special/e\u0301-nfd.bin',
  'special/100% done.bin',
  'special/percent%20looks-encoded.bin',
  'special/percent%2Fslash.bin',
  'special/plus+sign.bin',
  'special/a+b%2Bc d.bin',
  'special/+leading plus and space',
  'special/empty object (0 bytes)',
];

for (const { kind, skip } of [...S3_KINDS, { kind: 'fs' as StoreKind, skip: false as const }]) {
  test(`keys with spaces, unicode, % and + (${kind}): each restored under the same key with the same bytes`, { skip, timeout: 300_000 }, async (t) => {
    const cluster = await TestCluster.createOrSkip(t, { kind, chunks: 5 });
    if (!cluster) return;
    try {
      const store = cluster.clusterStore();
      const expected = new Map<string, string>();
      for (const key of TRICKY_KEYS) {
        const body = key.startsWith('special/empty') ? Buffer.alloc(0) : Buffer.from(`object ${key}\n${randomBytes(64).toString('hex')}`);
        await store.put(key, body, { size: body.length });
        expected.set(key, createHash('sha256').update(body).digest('hex'));
      }
      const listed: string[] = [];
      for await (const info of store.list('special/')) listed.push(info.key);
      assert.deepEqual(listed.sort(), [...TRICKY_KEYS].sort(), 'the store lists the keys exactly as written');

      const { objects } = await backupRestoreAndCompare(cluster);
      assert.equal(objects, TRICKY_KEYS.length + 5);
      const after = await cluster.restoredFingerprints();
      for (const [key, sha256] of expected) assert.equal(after.objects.get(key)?.sha256, sha256, `restored ${JSON.stringify(key)}`);
    } finally {
      await cluster.cleanup();
    }
  });
}

test('a zero-byte "folder" object in the cluster bucket (an S3 console\'s "Create folder"), backed up into a directory repository: left out with a warning, everything else restored equal', { timeout: 300_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 's3rver', chunks: 5, repositoryKind: 'fs' });
  if (!cluster) return;
  try {
    await cluster.clusterStore().put('some-folder/', Buffer.alloc(0));
    const events: EngineEvent[] = [];
    const summary = await cluster.backup(undefined, events);
    assert.equal(summary.objects.count, 5, 'the five chunks, not the folder object');
    assert.ok(events.some((e) => e.type === 'warning' && /1 zero-byte "folder" object/.test(e.message)), JSON.stringify(events.filter((e) => e.type === 'warning')));
    await cluster.clusterStore().remove(['some-folder/']);
    const before = await cluster.sourceFingerprints();
    await cluster.restore(summary.id);
    assert.deepEqual(compareFingerprints(before, await cluster.restoredFingerprints()), []);
  } finally {
    await cluster.cleanup();
  }
});

test('a pachyderm database with large bytea rows (several MiB each) restores with equal bytes (fs)', { timeout: 600_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 'fs', chunks: 5 });
  if (!cluster) return;
  try {
    await cluster.source.query('pachyderm', 'CREATE TABLE public.large_rows (id INT PRIMARY KEY, label TEXT NOT NULL, data BYTEA NOT NULL)');
    const sizes = [3 * 1024 * 1024, 5 * 1024 * 1024 + 7, 8 * 1024 * 1024, 6 * 1024 * 1024 + 1];
    const digests: string[] = [];
    for (const [i, size] of sizes.entries()) {
      const data = randomBytes(size);
      digests.push(createHash('sha256').update(data).digest('hex'));
      await cluster.source.query('pachyderm', 'INSERT INTO public.large_rows VALUES ($1, $2, $3)', [i, `row ${i}: ${size} bytes`, data]);
    }
    await backupRestoreAndCompare(cluster);
    const { rows } = await cluster.target!.query<{ id: number; bytes: string; sha: string }>(
      'pachyderm',
      "SELECT id, octet_length(data)::text AS bytes, encode(sha256(data), 'hex') AS sha FROM public.large_rows ORDER BY id",
    );
    assert.deepEqual(
      rows.map((r) => [r.id, Number(r.bytes), r.sha]),
      sizes.map((size, i) => [i, size, digests[i]]),
    );
  } finally {
    await cluster.cleanup();
  }
});
