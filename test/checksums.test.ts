/**
 * The checksums a copy records (src/repository/checksum.ts): an object whose listed ETag is a
 * plain MD5 is written with Content-MD5 and recorded as `md5:`, checked by the service instead of
 * hashed here; anything the service does not vouch for is hashed with SHA-256. Real S3 servers:
 * Ceph RGW (which checks Content-MD5 itself) and s3rver (which ignores it, so the store's check of
 * the answered ETag must catch a wrong MD5).
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { copyPlanned, CopyJournal, readEntries, ServiceMd5, type PlanItem } from '../src/engine/objects.js';
import { Secret } from '../src/config/secret.js';
import { S3ObjectStore } from '../src/objectstore/s3.js';
import { RowWriter, ScratchDir, compareKeys } from '../src/objectstore/sorted.js';
import { Repository } from '../src/repository/repository.js';
import { cephRgwSkipReason, startCephRgw, startS3rver, type S3TestServer } from './helpers/servers.js';

const md5Hex = (data: Buffer): string => createHash('md5').update(data).digest('hex');
const sha256Hex = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

function store(s: S3TestServer, bucket: string): S3ObjectStore {
  return new S3ObjectStore({
    bucket,
    prefix: '',
    endpoint: s.endpoint,
    region: s.region,
    forcePathStyle: true,
    accessKeyId: new Secret(s.accessKeyId, 'test key id'),
    secretAccessKey: new Secret(s.secretAccessKey, 'test secret'),
    checksums: 'when_required',
    requestTimeoutSeconds: 30,
  });
}

async function readAll(stream: AsyncIterable<Buffer>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk);
  return Buffer.concat(chunks);
}

function suite(name: string, start: () => Promise<S3TestServer>): void {
  let server: S3TestServer;
  let source: S3ObjectStore;
  const objects = new Map<string, Buffer>();
  let round = 0;

  before(async () => {
    server = await start();
    await server.createBucket('cluster');
    source = store(server, 'cluster');
    for (let i = 0; i < 24; i++) {
      const data = randomBytes(500 + i * 997);
      const key = `chunk/${sha256Hex(Buffer.from(String(i))).slice(0, 20)}.${String(i).padStart(16, '0')}`;
      objects.set(key, data);
      await source.put(key, data);
    }
  }, { timeout: 300_000 });
  after(async () => server?.stop());

  /** Copies every object with `plan` rewritten by `edit` into a fresh repository; returns what was recorded. */
  async function copyAll(serviceMd5: ServiceMd5, edit: (item: PlanItem, index: number) => PlanItem = (item) => item) {
    const bucket = `repo-${++round}`;
    await server.createBucket(bucket);
    const repo = new Repository(store(server, bucket));
    await repo.open(true);
    const listed: PlanItem[] = [];
    for await (const info of source.list()) listed.push({ key: info.key, size: info.size, ...(info.etag ? { etag: info.etag } : {}) });
    const plan = listed.map(edit);
    const scratch = await ScratchDir.create();
    const out = new RowWriter(scratch.file('index'));
    try {
      await copyPlanned({
        source,
        repo,
        // One at a time, so "from then on" below is exact.
        concurrency: 1,
        journal: new CopyJournal(repo, 'test'),
        emit: () => undefined,
        phase: 'copy',
        plan: (async function* () {
          yield* plan;
        })(),
        total: { objects: plan.length, bytes: plan.reduce((n, p) => n + p.size, 0) },
        out,
        serviceMd5,
      });
      await out.close();
      const entries = [];
      for await (const e of readEntries(out.path)) entries.push(e);
      // Whatever the checksum's kind, the repository holds the source's bytes.
      for (const e of entries) {
        const held = await readAll((await repo.store.get(`objects/${e.key}`)) as AsyncIterable<Buffer>);
        assert.ok(held.equals(objects.get(e.key)!), `objects/${e.key} holds the source's bytes`);
      }
      return entries;
    } finally {
      await scratch.remove();
    }
  }

  test(`${name}: objects listed with a plain-MD5 ETag are recorded as md5:<their MD5>, with no SHA-256 computed`, async () => {
    const entries = await copyAll(new ServiceMd5(true));
    assert.deepEqual(entries.map((e) => e.key), [...objects.keys()].sort(compareKeys));
    for (const e of entries) assert.equal(e.checksum, `md5:${md5Hex(objects.get(e.key)!)}`, e.key);
  });

  test(`${name}: with serviceChecksums off every object gets the SHA-256 of its bytes`, async () => {
    const entries = await copyAll(new ServiceMd5(false));
    for (const e of entries) assert.equal(e.checksum, sha256Hex(objects.get(e.key)!), e.key);
  });

  test(`${name}: a listed ETag that is not the object's MD5 (as for SSE-KMS) is refused, that object and every later one are hashed here, none is lost`, async () => {
    const wrongAt = 7;
    const serviceMd5 = new ServiceMd5(true);
    let wrongKey = '';
    const entries = await copyAll(serviceMd5, (item, i) => {
      if (i !== wrongAt) return item;
      wrongKey = item.key;
      return { ...item, etag: `"${md5Hex(Buffer.from('other bytes'))}"` };
    });
    assert.equal(serviceMd5.enabled, false);
    assert.match(serviceMd5.reason ?? '', new RegExp(wrongKey.replace(/[.]/g, '\\.')), 'the reason names the object');
    entries.forEach((e, i) => {
      const data = objects.get(e.key)!;
      assert.equal(e.checksum, i < wrongAt ? `md5:${md5Hex(data)}` : sha256Hex(data), `${e.key} (#${i})`);
    });
  });
}

describe('s3rver', () => suite('s3rver', startS3rver));
describe('Ceph', { skip: cephRgwSkipReason() ?? false }, () =>
  suite('Ceph RGW', async () => {
    const started = await startCephRgw();
    if (typeof started === 'string') throw new Error(started);
    return started;
  }),
);
