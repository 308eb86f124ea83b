/**
 * Encryption at rest: the PBE1 framing (round trips, sizes, every kind of tampering), the key
 * table (KEK forms, wrong keys), the EncryptingStore decorator, and end to end with the real
 * stack: backup into an encrypted directory repository, no plaintext anywhere in its files,
 * restore equal to the source, wrong and missing keys refused, verify, and key rotation.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { constants as zlibConstants, gunzipSync, inflateSync } from 'node:zlib';
import { validateConfig } from '../src/config/load.js';
import type { Config } from '../src/config/schema.js';
import { Secret } from '../src/config/secret.js';
import { runBackup } from '../src/engine/backup.js';
import { openRepository } from '../src/engine/context.js';
import type { EngineEvent } from '../src/engine/events.js';
import { restoreTargetsFromConfig, runRestore } from '../src/engine/restore.js';
import { verifyBackup } from '../src/engine/verify.js';
import { diffFingerprints, fingerprintDatabase, fingerprintStore, type DatabaseFingerprint } from '../src/demo/compare.js';
import { startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import { createPachydermFixture, fixtureChunkBytes } from '../src/demo/pachydermFixture.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { S3ObjectStore } from '../src/objectstore/s3.js';
import { NotFoundError, type ObjectInfo, type ObjectStore, type PutOptions } from '../src/objectstore/store.js';
import { CommandPause } from '../src/quiesce/command.js';
import {
  DataKey,
  DecryptionError,
  EncryptingStore,
  EncryptionKeyError,
  HEADER_BYTES,
  KeyEncryptionKey,
  SEGMENT_BYTES,
  ciphertextSize,
  createDecryptStream,
  createEncryptStream,
  decryptBuffer,
  encryptBuffer,
  newRepositoryEncryption,
  plaintextSize,
  unlockDataKey,
} from '../src/repository/encryption.js';
import { REDACTED } from '../src/pachyderm/helmValues.js';
import { isPlaintextPath } from '../src/repository/repository.js';
import { startS3rver } from './helpers/servers.js';

const S = SEGMENT_BYTES;
const SEALED = S + 16;
const PATH = 'backups/x/db/pachyderm.dump';

function pseudoRandom(size: number, seed = 7): Buffer {
  const out = Buffer.alloc(size);
  let x = seed;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    out[i] = x >>> 16;
  }
  return out;
}

async function collect(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const part of stream) parts.push(part as Buffer);
  return Buffer.concat(parts);
}

/** Feeds `data` into a stream in pieces of `piece` bytes. */
function piecewise(data: Buffer, piece: number): Readable {
  const parts: Buffer[] = [];
  for (let i = 0; i < data.length; i += piece) parts.push(data.subarray(i, i + piece));
  return Readable.from(parts.length ? parts : [], { objectMode: false });
}

function flipped(data: Buffer, offset: number): Buffer {
  const copy = Buffer.from(data);
  copy[offset] = copy[offset]! ^ 0x01;
  return copy;
}

describe('PBE1 framing', () => {
  const key = DataKey.generate();

  for (const size of [0, 1, S - 1, S, S + 1, 5 * 1024 * 1024]) {
    test(`round trip of ${size} bytes, whole and streamed`, async () => {
      const plaintext = pseudoRandom(size, size + 1);
      const sealed = encryptBuffer(key, PATH, plaintext);
      assert.equal(sealed.length, ciphertextSize(size));
      assert.equal(plaintextSize(sealed.length), size);
      assert.equal(sealed.subarray(0, 4).toString('ascii'), 'PBE1');
      assert.deepEqual(decryptBuffer(key, PATH, sealed), plaintext);
      // Streams with pieces that do not line up with segments, both ways and crossed with the buffer functions.
      const streamed = await collect(piecewise(plaintext, 10_007).pipe(createEncryptStream(key, PATH)));
      assert.equal(streamed.length, sealed.length);
      assert.deepEqual(decryptBuffer(key, PATH, streamed), plaintext);
      assert.deepEqual(await collect(piecewise(sealed, 3_001).pipe(createDecryptStream(key, PATH))), plaintext);
      assert.deepEqual(await collect(piecewise(streamed, S + 100).pipe(createDecryptStream(key, PATH))), plaintext);
    });
  }

  test('two encryptions of the same plaintext differ (random nonce base)', () => {
    const plaintext = Buffer.from('same bytes');
    assert.notDeepEqual(encryptBuffer(key, PATH, plaintext), encryptBuffer(key, PATH, plaintext));
  });

  test('plaintext size from ciphertext size: the inverse of ciphertextSize, and undefined for sizes no plaintext has', () => {
    const sizes = new Set<number>();
    for (let n = 0; n <= 300; n++) sizes.add(n);
    for (let k = 1; k <= 4; k++) for (let d = -20; d <= 20; d++) sizes.add(k * S + d);
    sizes.add(5 * 1024 * 1024);
    sizes.add(10 * 1024 ** 4 + 12_345);
    const valid = new Set<number>();
    for (const n of sizes) {
      const c = ciphertextSize(n);
      valid.add(c);
      assert.equal(plaintextSize(c), n, `plaintext ${n} -> ciphertext ${c}`);
    }
    for (let c = 0; c < HEADER_BYTES + 16; c++) assert.equal(plaintextSize(c), undefined, `ciphertext ${c}`);
    // After a full segment, a remainder of 1..16 bytes cannot hold a segment with its tag.
    for (let r = 1; r <= 16; r++) assert.equal(plaintextSize(HEADER_BYTES + SEALED + r), undefined, `remainder ${r}`);
    for (let c = HEADER_BYTES; c < HEADER_BYTES + 3 * SEALED + 50; c++) {
      const n = plaintextSize(c);
      if (n !== undefined) assert.equal(ciphertextSize(n), c);
    }
  });

  describe('tampering is detected with a clear error', () => {
    // Three segments: two full, one partial.
    const plaintext = pseudoRandom(2 * S + 1000, 3);
    const sealed = encryptBuffer(key, PATH, plaintext);
    const segmentStart = (i: number): number => HEADER_BYTES + i * SEALED;

    const expectFailure = async (data: Buffer, pattern: RegExp, path = PATH, dataKey = key): Promise<void> => {
      assert.throws(() => decryptBuffer(dataKey, path, data), (err: unknown) => err instanceof DecryptionError && pattern.test(err.message) && err.message.includes(path));
      await assert.rejects(collect(piecewise(data, 4096).pipe(createDecryptStream(dataKey, path))), (err: unknown) => err instanceof DecryptionError && pattern.test((err as Error).message));
    };

    test('a flipped byte in the header', async () => {
      await expectFailure(flipped(sealed, 0), /not an encrypted pachbackup file \(no PBE1 header\)/);
      await expectFailure(flipped(sealed, 4), /container version .* upgrade pachbackup, or the header is damaged/);
      await expectFailure(flipped(sealed, 7), /encrypted with data key [0-9a-f]{16}, not this repository's data key/);
      // The nonce base is authenticated as part of every segment's additional data.
      await expectFailure(flipped(sealed, HEADER_BYTES - 1), /segment 0 fails authentication/);
    });

    test('a flipped byte in any segment, its ciphertext or its tag', async () => {
      for (const i of [0, 1, 2]) {
        await expectFailure(flipped(sealed, segmentStart(i) + 17), new RegExp(`segment ${i}${i === 2 ? ' \\(the last\\)' : ''} fails authentication`));
        const tagEnd = i === 2 ? sealed.length - 1 : segmentStart(i + 1) - 1;
        await expectFailure(flipped(sealed, tagEnd), new RegExp(`segment ${i}.* fails authentication`));
      }
    });

    test('a truncated last segment, a missing last segment, a file cut inside the header', async () => {
      await expectFailure(sealed.subarray(0, sealed.length - 1), /segment 2 \(the last\) fails authentication: the stored bytes were modified, truncated/);
      await expectFailure(sealed.subarray(0, segmentStart(2) + 5), /truncated: its last segment \(2\) has 5 of at least 16 bytes/);
      await expectFailure(sealed.subarray(0, segmentStart(2)), /truncated: it ends after segment 1, which is not its last segment/);
      await expectFailure(sealed.subarray(0, HEADER_BYTES - 3), /truncated: 22 bytes, shorter than the 25-byte encryption header/);
    });

    test('swapped segments, a segment from another file, a file moved to another path, another data key', async () => {
      const swapped = Buffer.concat([sealed.subarray(0, HEADER_BYTES), sealed.subarray(segmentStart(1), segmentStart(2)), sealed.subarray(segmentStart(0), segmentStart(1)), sealed.subarray(segmentStart(2))]);
      assert.equal(swapped.length, sealed.length);
      await expectFailure(swapped, /segment 0 fails authentication/);
      const other = encryptBuffer(key, PATH, plaintext);
      const spliced = Buffer.concat([sealed.subarray(0, segmentStart(1)), other.subarray(segmentStart(1), segmentStart(2)), sealed.subarray(segmentStart(2))]);
      await expectFailure(spliced, /segment 1 fails authentication/);
      await expectFailure(sealed, /segment 0 fails authentication/, 'backups/x/db/dex.dump');
      await expectFailure(sealed, /not this repository's data key/, PATH, DataKey.generate());
    });

    test('a stream passes on only authenticated segments before it fails', async () => {
      const got: Buffer[] = [];
      const stream = piecewise(flipped(sealed, segmentStart(2) + 3), 1000).pipe(createDecryptStream(key, PATH));
      await assert.rejects(
        (async () => {
          for await (const part of stream) got.push(part as Buffer);
        })(),
        DecryptionError,
      );
      assert.deepEqual(Buffer.concat(got), plaintext.subarray(0, 2 * S));
    });
  });
});

/** Just enough of an ObjectStore to look at what the decorator stores. */
class MemoryStore implements ObjectStore {
  readonly description = 'memory';
  readonly objects = new Map<string, Buffer>();
  async *list(prefix = ''): AsyncIterable<ObjectInfo> {
    for (const key of [...this.objects.keys()].sort()) if (key.startsWith(prefix)) yield { key, size: this.objects.get(key)!.length };
  }
  async stat(key: string): Promise<ObjectInfo | undefined> {
    const body = this.objects.get(key);
    return body && { key, size: body.length };
  }
  async get(key: string): Promise<Readable> {
    const body = this.objects.get(key);
    if (!body) throw new NotFoundError(`no ${key}`);
    return Readable.from([body]);
  }
  async put(key: string, body: Readable | Buffer, options: PutOptions = {}): Promise<void> {
    const data = Buffer.isBuffer(body) ? Buffer.from(body) : await collect(body);
    if (options.size !== undefined && options.size !== data.length) throw new Error(`put ${key}: size ${options.size} announced, ${data.length} sent`);
    this.objects.set(key, data);
  }
  async remove(keys: string[]): Promise<void> {
    for (const key of keys) this.objects.delete(key);
  }
  async check(): Promise<void> {}
}

describe('EncryptingStore', () => {
  test('encrypts puts, decrypts gets, reports plaintext sizes, passes the config and locks through', async () => {
    const inner = new MemoryStore();
    const store = new EncryptingStore(inner, DataKey.generate(), isPlaintextPath);
    const big = pseudoRandom(3 * S + 5);
    await store.put('objects/chunk/a', piecewise(big, 5000), { size: big.length });
    await store.put('backups/b/manifest.json', Buffer.from('{"hello":"manifest"}'));
    await store.put('pachbackup.json', Buffer.from('{"format":"pachbackup-repository"}'));
    await store.put('locks/backup-1.json', Buffer.from('{"kind":"backup"}'));
    assert.equal(inner.objects.get('objects/chunk/a')!.length, ciphertextSize(big.length));
    assert.ok(!inner.objects.get('backups/b/manifest.json')!.includes('manifest'));
    assert.equal(inner.objects.get('pachbackup.json')!.toString(), '{"format":"pachbackup-repository"}');
    assert.equal(inner.objects.get('locks/backup-1.json')!.toString(), '{"kind":"backup"}');
    assert.deepEqual(await collect(await store.get('objects/chunk/a')), big);
    assert.equal((await collect(await store.get('backups/b/manifest.json'))).toString(), '{"hello":"manifest"}');
    const listed = new Map<string, number>();
    for await (const info of store.list()) listed.set(info.key, info.size);
    assert.deepEqual(Object.fromEntries(listed), { 'backups/b/manifest.json': 20, 'locks/backup-1.json': 17, 'objects/chunk/a': big.length, 'pachbackup.json': 34 });
    assert.equal((await store.stat('objects/chunk/a'))?.size, big.length);
    // A torn file's size maps to no plaintext size: listed as -1, never equal to a recorded size.
    inner.objects.set('objects/chunk/torn', inner.objects.get('objects/chunk/a')!.subarray(0, HEADER_BYTES + SEALED + 3));
    assert.equal((await store.stat('objects/chunk/torn'))?.size, -1);
    await assert.rejects(store.get('objects/none'), NotFoundError);
  });

  test('a failing source fails the put and stores nothing', async () => {
    const inner = new MemoryStore();
    const store = new EncryptingStore(inner, DataKey.generate(), isPlaintextPath);
    const failing = new Readable({
      read() {
        this.destroy(new Error('source broke'));
      },
    });
    await assert.rejects(store.put('objects/x', failing), /source broke/);
    assert.equal(inner.objects.size, 0);
  });
});

test('EncryptingStore over S3 (s3rver): streamed single PUT with the ciphertext length, multipart, listing sizes', { timeout: 120_000 }, async () => {
  const server = await startS3rver();
  try {
    await server.createBucket('repo');
    const inner = new S3ObjectStore({
      bucket: 'repo',
      prefix: 'enc',
      endpoint: server.endpoint,
      region: server.region,
      forcePathStyle: true,
      accessKeyId: new Secret(server.accessKeyId, 'test'),
      secretAccessKey: new Secret(server.secretAccessKey, 'test'),
      checksums: 'when_required',
      requestTimeoutSeconds: 60,
    });
    const store = new EncryptingStore(inner, DataKey.generate(), isPlaintextPath);
    const small = pseudoRandom(S + 1, 11);
    const large = pseudoRandom(12 * 1024 * 1024 + 3, 12);
    await store.put('objects/chunk/small', piecewise(small, 7000), { size: small.length });
    await store.put('objects/chunk/large', piecewise(large, 1 << 20));
    // s3rver ignores If-None-Match; the option must at least pass through a Buffer put.
    await store.put('backups/b/manifest.json', Buffer.from('{}'), { ifNoneMatch: true });
    assert.equal((await collect(await store.get('backups/b/manifest.json'))).toString(), '{}');
    assert.deepEqual(await collect(await store.get('objects/chunk/small')), small);
    assert.deepEqual(await collect(await store.get('objects/chunk/large')), large);
    const sizes: Record<string, number> = {};
    for await (const info of store.list('objects/')) sizes[info.key] = info.size;
    assert.deepEqual(sizes, { 'objects/chunk/large': large.length, 'objects/chunk/small': small.length });
    assert.equal((await inner.stat('objects/chunk/small'))?.size, ciphertextSize(small.length));
  } finally {
    await server.stop();
  }
});

describe('key-encryption keys', () => {
  const secret = (value: string): Secret => new Secret(value, 'env TEST_KEK');
  const hexKey = randomBytes(32).toString('hex');

  test('64 hex digits or base64 of 32 bytes is a key, a long text a passphrase, a short one refused', () => {
    assert.equal(KeyEncryptionKey.fromSecret(secret(hexKey), 'repository.encryption.key').kind, 'raw');
    assert.equal(KeyEncryptionKey.fromSecret(secret(randomBytes(32).toString('base64')), 'repository.encryption.key').kind, 'raw');
    assert.equal(KeyEncryptionKey.fromSecret(secret('correct horse battery staple'), 'repository.encryption.key').kind, 'passphrase');
    assert.throws(() => KeyEncryptionKey.fromSecret(secret('hunter2'), 'repository.encryption.key'), /repository\.encryption\.key \(env TEST_KEK\) is neither a 32-byte key .* nor a passphrase of at least 16 characters/);
  });

  test('the data key unwraps with its key or passphrase, and a wrong one is refused naming the config key', async () => {
    for (const value of [hexKey, 'a passphrase long enough']) {
      const kek = KeyEncryptionKey.fromSecret(secret(value), 'repository.encryption.key');
      const { encryption, dataKey } = await newRepositoryEncryption(kek, 'repo1');
      assert.ok(!JSON.stringify(encryption).includes(dataKey.bytes().toString('base64')));
      const unlocked = await unlockDataKey(encryption, kek, 'repo1', 'file:///repo');
      assert.equal(unlocked.dataKey.id, dataKey.id);
      assert.deepEqual(unlocked.dataKey.bytes(), dataKey.bytes());
      const wrong = KeyEncryptionKey.fromSecret(secret(value === hexKey ? randomBytes(32).toString('hex') : 'another passphrase, also long'), 'repository.encryption.key');
      await assert.rejects(unlockDataKey(encryption, wrong, 'repo1', 'file:///repo'), /wrong encryption key: file:\/\/\/repo is encrypted, .* set repository\.encryption\.key to a key that was added/);
      // The wrapped key is bound to its repository.
      await assert.rejects(unlockDataKey(encryption, kek, 'repo2', 'file:///repo'), /fails authentication: the encryption section of pachbackup.json is damaged/);
    }
  });
});

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

const HELM_SECRET = `helm-canary-${randomBytes(8).toString('hex')}`;
const HELM_VALUES = `deployTarget: LOCAL
pachd:
  storage:
    backend: LOCAL
    storageURL: "file:///var/pachyderm/pachd"
    local:
      hostPath: /var/pachyderm/
global:
  postgresql:
    postgresqlHost: "127.0.0.1"
    postgresqlPort: "5432"
    postgresqlDatabase: pachyderm
    identityDatabaseFullNameOverride: dex
    postgresqlUsername: pachyderm
    postgresqlPassword: "${HELM_SECRET}"
postgresql:
  enabled: false
`;

const events: EngineEvent[] = [];
const emit = (event: EngineEvent): void => void events.push(event);

/** Every file under `dir`, by repository path. */
async function repositoryFiles(dir: string, rel = ''): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const entry of await readdir(join(dir, rel), { withFileTypes: true })) {
    const path = rel ? `${rel}/${entry.name}` : entry.name;
    if (entry.isDirectory()) for (const [k, v] of await repositoryFiles(dir, path)) out.set(k, v);
    else out.set(path, await readFile(join(dir, path)));
  }
  return out;
}

/**
 * The file's bytes and every stream compressed inside it (a gzip file, the zlib blocks of a
 * pg_dump custom-format archive), so a search also finds text that is only compressed.
 */
function views(data: Buffer): Buffer[] {
  const out = [data];
  if (data[0] === 0x1f && data[1] === 0x8b) {
    try {
      out.push(gunzipSync(data));
    } catch {
      // not a whole gzip file
    }
  }
  for (let i = 0; i + 1 < data.length; i++) {
    if (data[i] !== 0x78 || ![0x01, 0x5e, 0x9c, 0xda].includes(data[i + 1]!)) continue;
    try {
      const inflated = inflateSync(data.subarray(i), { finishFlush: zlibConstants.Z_SYNC_FLUSH });
      if (inflated.length > 0) out.push(inflated);
    } catch {
      // not a zlib stream here
    }
  }
  return out;
}

function filesContaining(files: Map<string, Buffer>, needle: Buffer | string): string[] {
  return [...files].filter(([, data]) => views(data).some((view) => view.includes(needle))).map(([path]) => path);
}

interface Cluster {
  pg: LocalPostgres;
  work: string;
  bucket: string;
  valuesFile: string;
  rowCanary: string;
  ddlCanary: string;
  chunkPrefix: Buffer;
  before: { pachyderm: DatabaseFingerprint; dex: DatabaseFingerprint; objects: Map<string, { size: number; sha256: string }> };
}

let restoreCount = 0;

function configFor(c: Cluster, repository: string, encryption?: { env: string }, extra: { keepHelmSecrets?: boolean } = {}): Config {
  const server = { host: c.pg.host, port: c.pg.port, user: c.pg.user, password: { env: 'PB_ENC_TEST_PGPASSWORD' }, sslmode: 'disable', binDir: c.pg.binDir };
  const n = ++restoreCount;
  return validateConfig(
    {
      cluster: { postgres: server, objectStore: { url: pathToFileURL(c.bucket).href }, helmValues: c.valuesFile },
      repository: { url: pathToFileURL(join(c.work, repository)).href, ...(encryption ? { encryption: { key: encryption } } : {}) },
      // The pause command copies the pause ledger away, to check it is encrypted too.
      pause: { strategy: 'command', command: { pause: ['sh', '-c', `cp "${join(c.work, repository, 'ledger', 'pause.json')}" "${join(c.work, `ledger-${repository}.json`)}"`], resume: ['true'], timeoutSeconds: 30 } },
      backup: { concurrency: 4, ...extra },
      restore: {
        postgres: server,
        databases: { pachyderm: `pachyderm_r${n}`, dex: `dex_r${n}` },
        objectStore: { url: pathToFileURL(join(c.work, `restored-${n}`, 'pachd')).href },
        helmValuesOut: join(c.work, `values-restored-${n}.yaml`),
      },
    },
    'encryption test config',
  );
}

async function backup(config: Config) {
  if (!config.pause.command) throw new Error('test config has no pause command');
  return runBackup({ config, strategy: new CommandPause(config.pause.command), emit });
}

/** Restores the latest backup and checks it equals the source, table by table and object by object. */
async function restoreAndCompare(c: Cluster, config: Config): Promise<void> {
  const targets = restoreTargetsFromConfig(config);
  await mkdir(fileURLToPath(targets.objectStore.url), { recursive: true });
  await runRestore({ config, backup: 'latest', targets, force: false, dryRun: false, noOwner: true, concurrency: 4, emit });
  const differences = [
    ...diffFingerprints('table pachyderm', c.before.pachyderm, await fingerprintDatabase(c.pg, targets.databases.pachyderm)),
    ...diffFingerprints('table dex', c.before.dex, await fingerprintDatabase(c.pg, targets.databases.dex!)),
    ...diffFingerprints('object', c.before.objects, await fingerprintStore(new FsObjectStore(fileURLToPath(targets.objectStore.url)))),
  ];
  assert.deepEqual(differences, []);
}

const execFileText = (file: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> =>
  new Promise((resolve) => {
    execFile(file, args, { env }, (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });

describe('an encrypted repository, end to end', { timeout: 600_000 }, () => {
  let c: Cluster;
  let stopPg: (() => Promise<void>) | undefined;
  let work: string | undefined;
  const kekA = randomBytes(32).toString('hex');
  const kekWrong = randomBytes(32).toString('hex');
  const passphraseB = `rotation passphrase ${randomBytes(6).toString('hex')}`;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'pachbackup-encryption-'));
    const pg = await startLocalPostgres();
    stopPg = () => pg.stop();
    const bucket = join(work, 'cluster-bucket');
    await mkdir(bucket);
    await mkdir(join(work, 'plain'));
    await mkdir(join(work, 'encrypted'));
    // Chunks larger than a segment, so objects span several segments.
    await createPachydermFixture(pg, new FsObjectStore(bucket), { chunks: 12, chunkSize: 100_000 });
    const rowCanary = `pachbackup-row-canary-${randomBytes(8).toString('hex')}`;
    const ddlCanary = `pachbackup-ddl-canary-${randomBytes(8).toString('hex')}`;
    await pg.query('pachyderm', `INSERT INTO core.projects (name, description) VALUES ('canary', $1)`, [rowCanary]);
    await pg.query('pachyderm', `COMMENT ON TABLE core.projects IS '${ddlCanary}'`);
    const valuesFile = join(work, 'values.yaml');
    await writeFile(valuesFile, HELM_VALUES);
    process.env.PB_ENC_TEST_PGPASSWORD = pg.password;
    process.env.PB_ENC_TEST_KEK_A = kekA;
    process.env.PB_ENC_TEST_KEK_WRONG = kekWrong;
    process.env.PB_ENC_TEST_KEK_B = passphraseB;
    c = {
      pg,
      work: work!,
      bucket,
      valuesFile,
      rowCanary,
      ddlCanary,
      chunkPrefix: fixtureChunkBytes(1, 0, 48),
      before: { pachyderm: await fingerprintDatabase(pg, 'pachyderm'), dex: await fingerprintDatabase(pg, 'dex'), objects: await fingerprintStore(new FsObjectStore(bucket)) },
    };
  });

  after(async () => {
    for (const name of ['PB_ENC_TEST_PGPASSWORD', 'PB_ENC_TEST_KEK_A', 'PB_ENC_TEST_KEK_WRONG', 'PB_ENC_TEST_KEK_B']) delete process.env[name];
    await stopPg?.().catch(() => undefined);
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('control: an unencrypted repository shows the needles, and keeps the Helm values redacted', async () => {
    const summary = await backup(configFor(c, 'plain'));
    const files = await repositoryFiles(join(c.work, 'plain'));
    // The search works: every needle is found in a plaintext repository.
    assert.ok(filesContaining(files, c.chunkPrefix).some((p) => p.startsWith('objects/chunk/')));
    assert.deepEqual(filesContaining(files, c.ddlCanary), [`backups/${summary.id}/db/pachyderm.dump`]);
    assert.ok(filesContaining(files, c.rowCanary).includes(`backups/${summary.id}/db/pachyderm.dump`));
    // Helm values: secrets redacted unless backup.keepHelmSecrets.
    const repo = openRepository(configFor(c, 'plain'));
    await repo.open(false);
    const manifest = await repo.resolve(summary.id);
    assert.equal(manifest.helmValues?.redacted, true);
    assert.equal(manifest.encryption, undefined);
    const kept = files.get(`backups/${summary.id}/helm-values.yaml`)!.toString();
    assert.ok(!kept.includes(HELM_SECRET) && kept.includes(REDACTED), kept);
    assert.deepEqual(filesContaining(files, HELM_SECRET), []);
    const whole = await backup(configFor(c, 'plain', undefined, { keepHelmSecrets: true }));
    assert.equal((await repo.resolve(whole.id)).helmValues?.redacted, false);
  });

  test('no plaintext of the dumps, objects, Helm values or ledger in any file of an encrypted repository', async () => {
    const summary = await backup(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' }));
    const files = await repositoryFiles(join(c.work, 'encrypted'));
    for (const needle of [c.chunkPrefix, c.rowCanary, c.ddlCanary, HELM_SECRET, kekA, 'chunk_objects', 'PGDMP', summary.id]) {
      assert.deepEqual(filesContaining(files, needle), [], `found ${String(needle).slice(0, 40)}`);
    }
    for (const [path, data] of files) {
      if (path === 'pachbackup.json') continue;
      assert.equal(data.subarray(0, 4).toString('ascii'), 'PBE1', `${path} is not encrypted`);
    }
    const config = JSON.parse(files.get('pachbackup.json')!.toString());
    assert.equal(config.formatVersion, 2);
    assert.equal(config.encryption.wrappedKeys.length, 1);
    // The ledger copied away while paused is encrypted too, and names nothing in the clear.
    const ledger = await readFile(join(c.work, 'ledger-encrypted.json'));
    assert.equal(ledger.subarray(0, 4).toString('ascii'), 'PBE1');
    assert.ok(!ledger.includes(summary.id));
    // The manifest names the data key's id, never the key.
    const repo = openRepository(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' }));
    await repo.open(false);
    const manifest = await repo.resolve(summary.id);
    assert.deepEqual(manifest.encryption, { keyId: config.encryption.keyId });
    assert.equal(manifest.helmValues?.redacted, false);
  });

  test('a second backup into the encrypted repository copies nothing again (plaintext sizes in listings)', async () => {
    const summary = await backup(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' }));
    assert.equal(summary.objects.newCount, 0);
    assert.ok(summary.objects.count >= 12);
  });

  test('verify passes, and restore with the right key equals the source, Helm values kept whole', async () => {
    const config = configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' });
    const repo = openRepository(config);
    await repo.open(false);
    const report = await verifyBackup({ repo, manifest: await repo.resolve('latest'), emit, concurrency: 4 });
    assert.deepEqual(report.problems, []);
    assert.ok(report.ok);
    await restoreAndCompare(c, config);
    assert.ok((await readFile(config.restore!.helmValuesOut!, 'utf8')).includes(HELM_SECRET));
  });

  test('a wrong key, a missing key, an unset key variable, and a key on an unencrypted repository are refused clearly', async () => {
    const wrong = configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_WRONG' });
    await assert.rejects(openRepository(wrong).open(false), (err: unknown) => err instanceof EncryptionKeyError && /^wrong encryption key: .* is encrypted, and the key with KEK id [0-9a-f]{16} from repository\.encryption\.key \(env PB_ENC_TEST_KEK_WRONG\) is not one of its keys/.test((err as Error).message));
    await assert.rejects(runRestore({ config: wrong, backup: 'latest', targets: restoreTargetsFromConfig(wrong), force: false, dryRun: true, noOwner: true, concurrency: 2, emit }), /wrong encryption key/);
    await assert.rejects(backup(wrong), /wrong encryption key/);
    const missing = configFor(c, 'encrypted');
    await assert.rejects(openRepository(missing).open(false), /^EncryptionKeyError: missing encryption key: .* is encrypted \(data key [0-9a-f]{16}\); set repository\.encryption\.key to \{env: NAME\} or \{file: PATH\}/);
    await assert.rejects(backup(missing), /missing encryption key/);
    assert.throws(() => openRepository(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_UNSET' })), /repository\.encryption\.key: environment variable PB_ENC_TEST_KEK_UNSET is not set/);
    await assert.rejects(openRepository(configFor(c, 'plain', { env: 'PB_ENC_TEST_KEK_A' })).open(false), /is not encrypted, but repository\.encryption\.key is set/);
    // Nothing was written by the refused backups.
    const repo = openRepository(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' }));
    await repo.open(false);
    assert.equal((await repo.listBackups()).incomplete.length, 0);
  });

  test('key rotation with the CLI: add a passphrase, switch to it, remove the old key; restore works with the new key only', async () => {
    const cli = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
    const yaml = (keyEnv: string): string => {
      const config = configFor(c, 'encrypted', { env: keyEnv });
      return JSON.stringify({ cluster: { ...config.cluster, helmValues: c.valuesFile }, repository: config.repository });
    };
    const fileA = join(c.work, 'config-a.yaml');
    const fileB = join(c.work, 'config-b.yaml');
    await writeFile(fileA, yaml('PB_ENC_TEST_KEK_A'));
    await writeFile(fileB, yaml('PB_ENC_TEST_KEK_B'));
    const env = { ...process.env };
    const repoA = openRepository(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' }));
    await repoA.open(false);
    const kekIdA = repoA.openedWithKekId!;
    const dataKeyId = repoA.encryption!.keyId;

    // Not yet a key of the repository.
    assert.match((await execFileText(process.execPath, [cli, '-c', fileB, 'key', 'list'], env)).stderr, /wrong encryption key/);
    const added = await execFileText(process.execPath, [cli, '-c', fileA, '--json', 'key', 'add', '--new-key-env', 'PB_ENC_TEST_KEK_B'], env);
    assert.equal(added.code, 0, added.stderr);
    const addResult = JSON.parse(added.stdout.trim().split('\n').pop()!);
    assert.equal(addResult.dataKeyId, dataKeyId);
    assert.equal(addResult.kind, 'passphrase');
    const again = await execFileText(process.execPath, [cli, '-c', fileA, 'key', 'add', '--new-key-env', 'PB_ENC_TEST_KEK_B'], env);
    assert.match(again.stderr, /already one of the keys/);
    // The key in use cannot be removed: one key always remains.
    const self = await execFileText(process.execPath, [cli, '-c', fileB, 'key', 'remove', addResult.kekId], env);
    assert.match(self.stderr, /is the key in repository\.encryption\.key/);
    const removed = await execFileText(process.execPath, [cli, '-c', fileB, 'key', 'remove', kekIdA], env);
    assert.equal(removed.code, 0, removed.stderr);
    const listed = await execFileText(process.execPath, [cli, '-c', fileB, '--json', 'key', 'list'], env);
    const listResult = JSON.parse(listed.stdout.trim().split('\n').pop()!);
    assert.deepEqual(listResult.keys.map((k: { kekId: string; inUse: boolean }) => [k.kekId, k.inUse]), [[addResult.kekId, true]]);
    assert.equal(listResult.dataKeyId, dataKeyId);

    // The data was not re-encrypted: the same data key, and the new key restores it.
    const configB = configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_B' });
    await restoreAndCompare(c, configB);
    await assert.rejects(openRepository(configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_A' })).open(false), /wrong encryption key/);
    const pachbackupJson = await readFile(join(c.work, 'encrypted', 'pachbackup.json'), 'utf8');
    assert.ok(!pachbackupJson.includes(passphraseB) && !pachbackupJson.includes(kekA));
  });

  test('verify and restore catch a flipped byte in an encrypted object and dump', async () => {
    const config = configFor(c, 'encrypted', { env: 'PB_ENC_TEST_KEK_B' });
    const repo = openRepository(config);
    await repo.open(false);
    const manifest = await repo.resolve('latest');
    const entries = await repo.readIndex(manifest.objects.index);
    const victim = entries[0]!.key;
    const objectFile = join(c.work, 'encrypted', 'objects', ...victim.split('/'));
    const original = await readFile(objectFile);
    await writeFile(objectFile, flipped(original, HEADER_BYTES + SEALED + 100));
    const outcome = await verifyBackup({ repo, manifest, emit, concurrency: 4 }).then(
      (report) => report,
      (err: unknown) => err as Error,
    );
    // verify stops at the first object that does not decrypt (checkStoredFile rethrows); if it ever collects it as a problem, that passes too.
    if (outcome instanceof Error) {
      assert.ok(outcome instanceof DecryptionError, String(outcome));
      assert.match(outcome.message, new RegExp(`objects/${victim.replace(/\./g, '\\.')}: segment 1 \\(the last\\) fails authentication`));
    } else {
      assert.equal(outcome.ok, false);
      assert.ok(outcome.problems.some((p) => p.item.includes(victim) && /segment 1 \(the last\) fails authentication/.test(p.problem)), JSON.stringify(outcome.problems));
    }
    await writeFile(objectFile, original);

    const dump = manifest.databases.find((d) => d.role === 'pachyderm')!;
    const dumpFile = join(c.work, 'encrypted', ...dump.file.split('/'));
    const dumpBytes = await readFile(dumpFile);
    await writeFile(dumpFile, flipped(dumpBytes, dumpBytes.length - 20));
    await assert.rejects(
      runRestore({ config, backup: 'latest', targets: restoreTargetsFromConfig(config), force: false, dryRun: true, noOwner: true, concurrency: 2, emit }),
      new RegExp(`${dump.file}: segment \\d+ \\(the last\\) fails authentication`),
    );
    await writeFile(dumpFile, dumpBytes);
    const report = await verifyBackup({ repo, manifest, emit, concurrency: 4 });
    assert.ok(report.ok, JSON.stringify(report.problems));
  });
});
