import { createHash, randomBytes, type Hash } from 'node:crypto';
import { Readable, Transform, type TransformCallback } from 'node:stream';
import { createInterface } from 'node:readline';
import { createGunzip, createGzip, gunzipSync } from 'node:zlib';
import { z } from 'zod';
import { asRetryable, backOff, isRetryable, policyOf, readWhole, withRetry } from '../objectstore/retry.js';
import { NotFoundError, PreconditionFailedError, StoreError, type ObjectStore } from '../objectstore/store.js';
import { isChecksum, type Checksum } from './checksum.js';
import { DigestStream, pipeWithDigest, sha256Hex } from './digest.js';
import {
  ENCRYPTION_CONFIG_KEY,
  EncryptingStore,
  EncryptionKeyError,
  findWrappedKey,
  newRepositoryEncryption,
  repositoryEncryptionSchema,
  unlockDataKey,
  wrapDataKey,
  type DataKey,
  type KeyEncryptionKey,
  type RepositoryEncryption,
  type WrappedKey,
} from './encryption.js';
import { ManifestError, manifestSchema, parseManifest, sealManifest, type FileRef, type Manifest } from './manifest.js';

/** Layout of a repository; docs/repository-format.md is the specification of these names. */
export const layout = {
  config: 'pachbackup.json',
  objectsPrefix: 'objects/',
  object: (key: string) => `objects/${key}`,
  backupsPrefix: 'backups/',
  backupPrefix: (id: string) => `backups/${id}/`,
  dump: (id: string, database: string) => `backups/${id}/db/${database}.dump`,
  /** Prefix of a directory-format dump's files: `<database>.dump.d/toc.dat`, `<database>.dump.d/3352.dat.gz`, … */
  dumpDirectory: (id: string, database: string) => `backups/${id}/db/${database}.dump.d/`,
  helmValues: (id: string) => `backups/${id}/helm-values.yaml`,
  journal: (id: string, seq: number) => `backups/${id}/journal/${String(seq).padStart(6, '0')}.jsonl.gz`,
  journalPrefix: (id: string) => `backups/${id}/journal/`,
  index: (id: string) => `backups/${id}/index.jsonl.gz`,
  referenced: (id: string) => `backups/${id}/referenced.txt.gz`,
  manifest: (id: string) => `backups/${id}/manifest.json`,
} as const;

/** The newest repository format this release reads. */
export const REPOSITORY_FORMAT_VERSION = 2;
/** An unencrypted repository is still written as format 1, so older releases keep reading it. */
const PLAINTEXT_FORMAT_VERSION = 1;
/** Format 2 adds encryption: a release that knows only format 1 refuses it instead of misreading it. */
const ENCRYPTED_FORMAT_VERSION = 2;

/**
 * Paths stored in the clear in an encrypted repository: the repository config (it holds only the
 * wrapped data key) and the locks (who holds the repository, needed before any key is checked).
 */
export function isPlaintextPath(path: string): boolean {
  return path === layout.config || path.startsWith('locks/');
}

const repoConfigSchema = z.object({
  format: z.literal('pachbackup-repository'),
  formatVersion: z.number().int(),
  id: z.string(),
  createdAt: z.string(),
  /** Present exactly when the repository is encrypted (docs/repository-format.md, "Encryption"). */
  encryption: repositoryEncryptionSchema.optional(),
});
export type RepositoryConfig = z.infer<typeof repoConfigSchema>;

/** One object a backup holds: its key in the cluster bucket, size and SHA-256 of its bytes. */
export interface IndexEntry {
  key: string;
  size: number;
  /** SHA-256 hex, or `md5:<hex>` when the S3 service checked the bytes (see checksum.ts). */
  checksum: Checksum;
}

export interface BackupListing {
  sealed: Manifest[];
  /** Backups without a manifest: in progress, crashed or abandoned. Never offered for restore. */
  incomplete: Array<{ id: string; files: number; bytes: number }>;
  /** Backups whose manifest cannot be read or fails its checksum. */
  damaged: Array<{ id: string; problem: string }>;
}

export class RepositoryError extends Error {
  override name = 'RepositoryError';
}

export interface RepositoryOptions {
  /** The key-encryption key from `repository.encryption.key`; required for an encrypted repository, refused for a plaintext one. */
  kek?: KeyEncryptionKey;
}

export class Repository {
  #config: RepositoryConfig | undefined;
  #store: ObjectStore;
  #dataKey: DataKey | undefined;
  #kekId: string | undefined;

  /** `rawStore` is the repository's store as is; `store` is what every read and write goes through. */
  constructor(readonly rawStore: ObjectStore, private readonly options: RepositoryOptions = {}) {
    this.#store = rawStore;
  }

  /** The store all repository files go through: after open() of an encrypted repository, it encrypts and decrypts. */
  get store(): ObjectStore {
    return this.#store;
  }

  get description(): string {
    return this.store.description;
  }

  /** The key table of an encrypted repository (wrapped keys only); undefined when it is not encrypted. */
  get encryption(): RepositoryEncryption | undefined {
    if (!this.#config) throw new Error('repository not opened');
    return this.#config.encryption;
  }

  /** The KEK id of the key this process opened the repository with. */
  get openedWithKekId(): string | undefined {
    return this.#kekId;
  }

  get id(): string {
    if (!this.#config) throw new Error('repository not opened');
    return this.#config.id;
  }

  /** Reads the repository's config, creating the repository if `create` and it does not exist yet. */
  /**
   * Reads the repository's config, creating the repository if `create` and it does not exist yet
   * (encrypted when a key-encryption key was given). An encrypted repository is unlocked here.
   */
  async open(create: boolean): Promise<RepositoryConfig> {
    const existing = await this.readConfig();
    if (existing) return this.unlock(existing);
    if (!create) {
      throw new RepositoryError(`${this.description} is not a pachbackup repository (no ${layout.config}); check repository.url, or run a backup to create it`);
    }
    const id = randomBytes(8).toString('hex');
    const encryption = this.options.kek ? (await newRepositoryEncryption(this.options.kek, id)).encryption : undefined;
    const config: RepositoryConfig = {
      format: 'pachbackup-repository',
      formatVersion: encryption ? ENCRYPTED_FORMAT_VERSION : PLAINTEXT_FORMAT_VERSION,
      id,
      createdAt: new Date().toISOString(),
      ...(encryption ? { encryption } : {}),
    };
    try {
      await this.rawStore.put(layout.config, Buffer.from(`${JSON.stringify(config, null, 2)}\n`), { ifNoneMatch: true, contentType: 'application/json' });
    } catch (err) {
      // Another process created it between our read and write: use theirs.
      if (!(err instanceof PreconditionFailedError)) throw err;
    }
    const created = await this.readConfig();
    if (!created) throw new RepositoryError(`${this.description}: wrote ${layout.config} but cannot read it back`);
    return this.unlock(created);
  }

  /** Refuses a key/repository mismatch either way, and puts the decrypting store in place. */
  private async unlock(config: RepositoryConfig): Promise<RepositoryConfig> {
    const kek = this.options.kek;
    const where = this.rawStore.description;
    if (config.encryption && !kek) {
      const ids = config.encryption.wrappedKeys.map((k) => k.kekId).join(', ');
      throw new EncryptionKeyError(
        `missing encryption key: ${where} is encrypted (data key ${config.encryption.keyId}); set ${ENCRYPTION_CONFIG_KEY} to {env: NAME} or {file: PATH} holding one of its keys (KEK ids ${ids})`,
      );
    }
    if (!config.encryption && kek) {
      throw new EncryptionKeyError(
        `${where} is not encrypted, but ${ENCRYPTION_CONFIG_KEY} is set; an existing repository is never converted: remove repository.encryption to use it unencrypted, or point repository.url at a new location for an encrypted repository`,
      );
    }
    if (config.encryption && kek) {
      const { dataKey, kekId } = await unlockDataKey(config.encryption, kek, config.id, where);
      this.#dataKey = dataKey;
      this.#kekId = kekId;
      this.#store = new EncryptingStore(this.rawStore, dataKey, isPlaintextPath);
    }
    return (this.#config = config);
  }

  /**
   * Wraps the data key under one more key-encryption key and rewrites pachbackup.json. The
   * repository must be open with a key it already has. Returns the new entry.
   */
  async addKey(kek: KeyEncryptionKey): Promise<WrappedKey> {
    const { config, encryption, dataKey } = this.requireEncrypted();
    if (await findWrappedKey(encryption, kek)) throw new EncryptionKeyError(`the new key (${kek.described}) is already one of the keys of ${this.rawStore.description}`);
    const entry = await wrapDataKey(dataKey, kek, config.id);
    await this.rewriteConfig({ ...config, encryption: { ...encryption, wrappedKeys: [...encryption.wrappedKeys, entry] } });
    // Prove the new key opens what was written before anyone relies on it.
    const written = await this.readConfig();
    if (!written?.encryption) throw new RepositoryError(`${this.rawStore.description}: ${layout.config} lost its encryption section while adding a key`);
    await unlockDataKey(written.encryption, kek, config.id, this.rawStore.description);
    return entry;
  }

  /** Removes a key-encryption key. The key this process opened the repository with cannot be removed, so one always remains. */
  async removeKey(kekId: string): Promise<void> {
    const { config, encryption } = this.requireEncrypted();
    if (!encryption.wrappedKeys.some((k) => k.kekId === kekId)) {
      throw new EncryptionKeyError(`${this.rawStore.description} has no key with KEK id ${kekId}; its KEK ids are ${encryption.wrappedKeys.map((k) => k.kekId).join(', ')}`);
    }
    if (kekId === this.#kekId) {
      throw new EncryptionKeyError(
        `KEK id ${kekId} is the key in ${ENCRYPTION_CONFIG_KEY}, which this command opened the repository with; set ${ENCRYPTION_CONFIG_KEY} to another of the repository's keys first, then remove this one`,
      );
    }
    await this.rewriteConfig({ ...config, encryption: { ...encryption, wrappedKeys: encryption.wrappedKeys.filter((k) => k.kekId !== kekId) } });
  }

  private requireEncrypted(): { config: RepositoryConfig; encryption: RepositoryEncryption; dataKey: DataKey } {
    const config = this.#config;
    if (!config) throw new Error('repository not opened');
    if (!config.encryption || !this.#dataKey) throw new EncryptionKeyError(`${this.rawStore.description} is not encrypted: it has no keys to manage`);
    return { config, encryption: config.encryption, dataKey: this.#dataKey };
  }

  /**
   * Replaces pachbackup.json (only key management does this). The file is read again first and
   * must be unchanged since open, so two key commands at once do not silently drop a key.
   */
  private async rewriteConfig(next: RepositoryConfig): Promise<void> {
    const current = await this.readConfig();
    if (JSON.stringify(current) !== JSON.stringify(this.#config)) {
      throw new RepositoryError(`${this.rawStore.description}: ${layout.config} changed since this command read it (another key command?); run the command again`);
    }
    await this.rawStore.put(layout.config, Buffer.from(`${JSON.stringify(next, null, 2)}\n`), { contentType: 'application/json' });
    this.#config = next;
  }

  private async readConfig(): Promise<RepositoryConfig | undefined> {
    let text: string;
    try {
      // Always from the raw store: the config is what says whether, and how, the rest is encrypted.
      text = (await readWhole(this.rawStore, layout.config)).toString('utf8');
    } catch (err) {
      if (err instanceof NotFoundError) return undefined;
      throw err;
    }
    const parsed = repoConfigSchema.safeParse(safeJson(text));
    if (!parsed.success) throw new RepositoryError(`${this.description}/${layout.config} is damaged or not a pachbackup repository`);
    if (parsed.data.formatVersion > REPOSITORY_FORMAT_VERSION) {
      throw new RepositoryError(`${this.description} has repository format ${parsed.data.formatVersion}; this pachbackup reads up to ${REPOSITORY_FORMAT_VERSION}: upgrade pachbackup`);
    }
    return parsed.data;
  }

  /** Proves the repository accepts writes and deletes, before anything is paused. */
  async checkWritable(): Promise<void> {
    const probe = `tmp/probe-${randomBytes(6).toString('hex')}`;
    await this.store.put(probe, Buffer.from('pachbackup write probe\n'));
    await this.store.remove([probe]);
  }

  /** Streams `body` to `path`, returning its size and SHA-256 computed on the way. */
  async writeStream(path: string, body: Readable, signal?: AbortSignal): Promise<FileRef> {
    const { bytes, hex: sha256 } = await pipeWithDigest(body, (digest, putSignal) => this.store.put(path, digest, {}, putSignal), signal);
    return { file: path, size: bytes, sha256 };
  }

  /**
   * Keeps a cluster's Helm values with a backup. They hold the cluster's secrets, so an
   * unencrypted repository gets them with every secret field replaced (redactHelmSecrets) unless
   * `keepSecrets` (backup.keepHelmSecrets); an encrypted one keeps them whole.
   * `redacted` is true when at least one field was replaced.
   */
  /**
   * The Helm values as this repository stores them: whole when it is encrypted or the user opted
   * in, otherwise with their secret fields redacted. Called in preflight, so values that cannot be
   * parsed stop the backup before anything is paused.
   */
  async helmValuesForStorage(values: Buffer, keepSecrets: boolean): Promise<{ data: Buffer; redacted: boolean }> {
    if (this.#dataKey || keepSecrets) return { data: values, redacted: false };
    // Loaded here rather than with this module: a process that opens a repository without keeping
    // Helm values (the copy benchmark's worker, tests, an embedding program) does not load the
    // YAML and JSON-schema libraries (~50 ms). The CLI still loads them with its commands.
    const { redactHelmSecrets } = await import('../pachyderm/helmValues.js');
    let result: { yaml: string; redacted: string[] };
    try {
      result = redactHelmSecrets(values.toString('utf8'));
    } catch (err) {
      throw new RepositoryError(
        `the Helm values (cluster.helmValues) cannot be parsed to redact their secrets for an unencrypted repository: ${(err as Error).message}; fix the file, encrypt the repository (repository.encryption), or set backup.keepHelmSecrets: true`,
      );
    }
    return { data: Buffer.from(result.yaml, 'utf8'), redacted: result.redacted.length > 0 };
  }

  async writeHelmValues(id: string, prepared: { data: Buffer; redacted: boolean }): Promise<FileRef & { redacted: boolean }> {
    return { ...(await this.writeBuffer(layout.helmValues(id), prepared.data)), redacted: prepared.redacted };
  }

  async writeBuffer(path: string, data: Buffer, options: { ifNoneMatch?: boolean } = {}): Promise<FileRef> {
    await this.store.put(path, data, { size: data.length, ...options });
    return { file: path, size: data.length, sha256: sha256Hex(data) };
  }

  async readSmall(path: string): Promise<Buffer> {
    return readWhole(this.store, path);
  }

  /** Reads a file and checks it against its reference; throws naming the file when it differs. */
  async readVerified(ref: FileRef): Promise<Buffer> {
    let data: Buffer;
    try {
      data = await this.readSmall(ref.file);
    } catch (err) {
      if (err instanceof NotFoundError) throw new RepositoryError(`${ref.file} is missing from ${this.description}`);
      throw err;
    }
    if (data.length !== ref.size || sha256Hex(data) !== ref.sha256) {
      throw new RepositoryError(`${ref.file} is corrupt: expected ${ref.size} bytes with SHA-256 ${ref.sha256.slice(0, 12)}…, found ${data.length} bytes with ${sha256Hex(data).slice(0, 12)}…`);
    }
    return data;
  }

  /** Writes an index from entries held in memory (tests, small tools); backups stream theirs through writeLinesGz. */
  async writeIndex(path: string, entries: Iterable<IndexEntry>): Promise<FileRef> {
    const { count: _count, ...ref } = await this.writeLinesGz(path, () => linesOf(entries, (e) => JSON.stringify(indexRow(e))));
    return ref;
  }

  /** Parses an index or journal file's bytes (already checked by the caller where a reference exists). */
  parseIndex(data: Buffer, where: string): IndexEntry[] {
    let text: string;
    try {
      text = gunzipSync(data).toString('utf8');
    } catch {
      throw new RepositoryError(`${where} is corrupt: not a gzip stream`);
    }
    const out: IndexEntry[] = [];
    for (const line of text.split('\n')) {
      if (line !== '') out.push(parseIndexLine(line, where));
    }
    return out;
  }

  async readIndex(ref: FileRef): Promise<IndexEntry[]> {
    return this.parseIndex(await this.readVerified(ref), ref.file);
  }

  /**
   * Writes a gzip file of lines as they are produced, without holding them: the index and the
   * referenced-key list of a backup with millions of objects stream through here.
   */
  async writeLinesGz(path: string, lines: () => AsyncIterable<string>, signal?: AbortSignal): Promise<FileRef & { count: number }> {
    // A streamed put cannot be replayed by the store's retries: a transient fault (503 SlowDown)
    // writes the whole file again, from a fresh pass over `lines`.
    // The store's own policy, which may count the retries for the run's summary.
    return withRetry(() => this.#writeLinesGzOnce(path, lines(), signal), policyOf(this.rawStore), signal);
  }

  async #writeLinesGzOnce(path: string, lines: AsyncIterable<string>, signal?: AbortSignal): Promise<FileRef & { count: number }> {
    let count = 0;
    async function* text(): AsyncGenerator<Buffer> {
      let batch: string[] = [];
      for await (const line of lines) {
        count++;
        batch.push(line);
        if (batch.length >= 1024) {
          yield Buffer.from(`${batch.join('\n')}\n`);
          batch = [];
        }
      }
      if (batch.length > 0) yield Buffer.from(`${batch.join('\n')}\n`);
    }
    const gzip = createGzip();
    const source = Readable.from(text());
    source.on('error', (err) => gzip.destroy(err));
    const ref = await this.writeStream(path, source.pipe(gzip), signal);
    return { ...ref, count };
  }

  /** Streams an index file's entries; its size and SHA-256 are checked when it ends (a mismatch throws then). */
  async *streamIndex(ref: FileRef): AsyncGenerator<IndexEntry> {
    for await (const line of this.streamLinesGz(ref.file, ref)) yield parseIndexLine(line, ref.file);
  }

  /**
   * An index file no manifest vouches for (an unsealed or damaged backup's), streamed with no
   * checksum to check; a damaged file ends with an error after the entries read before it.
   */
  async *streamUnsealedIndex(path: string): AsyncGenerator<IndexEntry> {
    for await (const line of this.streamLinesGz(path)) yield parseIndexLine(line, path);
  }

  /** Streams a referenced-key list, checked like streamIndex. */
  async *streamReferenced(ref: FileRef): AsyncGenerator<string> {
    yield* this.streamLinesGz(ref.file, ref);
  }

  /**
   * The lines of a gzip file; with `ref`, its size and SHA-256 are checked when it ends. When the
   * body breaks mid-read (a reset connection), the file is read again from its start and the lines
   * already handed out are skipped; the bytes they came from must hash the same the second time
   * (PrefixCheck), and the final checksum covers the read that completed.
   */
  private async *streamLinesGz(path: string, ref?: FileRef): AsyncGenerator<string> {
    const policy = policyOf(this.rawStore);
    let handedOut = 0;
    // The longest prefix a broken read passed on, which the next read must repeat.
    let seen = { bytes: 0, sha256: '' };
    for (let attempt = 1; ; attempt++) {
      let body: Readable;
      try {
        body = await this.store.get(path);
      } catch (err) {
        if (err instanceof NotFoundError) throw new RepositoryError(`${path} is missing from ${this.description}`);
        throw err;
      }
      const check = seen.bytes > 0 ? new PrefixCheck(seen.bytes, seen.sha256, () => new RepositoryError(`${path} is corrupt: the bytes of its first ${handedOut} lines read differently after a broken read`)) : undefined;
      const digest = new DigestStream();
      const gunzip = createGunzip();
      let broke: unknown;
      body.on('error', (err) => {
        broke ??= err;
        (check ?? digest).destroy(err);
      });
      check?.on('error', (err) => digest.destroy(err));
      digest.on('error', (err) => gunzip.destroy(err));
      (check ? body.pipe(check) : body).pipe(digest).pipe(gunzip);
      const lines = createInterface({ input: gunzip, crlfDelay: Infinity });
      let skip = handedOut;
      try {
        for await (const line of lines) {
          if (line === '') continue;
          if (skip > 0) {
            skip--;
            continue;
          }
          handedOut++;
          yield line;
        }
      } catch (err) {
        if (err instanceof RepositoryError) throw err;
        const failure = broke === undefined ? undefined : asRetryable(broke, `reading ${path}`);
        if (failure !== undefined && isRetryable(failure) && attempt < policy.attempts) {
          if (digest.bytes > seen.bytes) seen = { bytes: digest.bytes, sha256: digest.hexSoFar };
          await backOff(failure as StoreError, attempt, policy);
          continue;
        }
        // Damage: the data itself (not a broken transfer) fails to decompress, decrypt or add up.
        if ((failure === undefined || !isRetryable(failure)) && ((ref && digest.bytes !== ref.size) || (err as NodeJS.ErrnoException).code?.startsWith('Z_'))) {
          throw new RepositoryError(`${path} is corrupt: ${(err as Error).message}`);
        }
        throw failure ?? err;
      } finally {
        lines.close();
        body.destroy();
      }
      if (ref && (digest.bytes !== ref.size || digest.sha256 !== ref.sha256)) {
        throw new RepositoryError(`${ref.file} is corrupt: expected ${ref.size} bytes with SHA-256 ${ref.sha256.slice(0, 12)}…, found ${digest.bytes} bytes with ${digest.sha256.slice(0, 12)}…`);
      }
      return;
    }
  }

  async writeReferenced(id: string, keys: string[]): Promise<FileRef & { count: number }> {
    return this.writeLinesGz(layout.referenced(id), () => linesOf(keys, (k) => k));
  }

  async readReferenced(ref: FileRef): Promise<string[]> {
    const text = gunzipSync(await this.readVerified(ref)).toString('utf8');
    return text.split('\n').filter((line) => line !== '');
  }

  /** The entries of a backup's journals, one journal file (at most ~1,000 entries) at a time, in the order they were written. */
  async *streamJournals(id: string): AsyncGenerator<IndexEntry> {
    for await (const info of this.store.list(layout.journalPrefix(id))) {
      let entries: IndexEntry[];
      try {
        entries = this.parseIndex(await this.readSmall(info.key), info.key);
      } catch {
        // A journal torn by a crash is ignored: its objects are simply copied again.
        continue;
      }
      yield* entries;
    }
  }

  async listBackups(): Promise<BackupListing> {
    const byId = new Map<string, { files: number; bytes: number; manifest: boolean }>();
    for await (const info of this.store.list(layout.backupsPrefix)) {
      const id = info.key.slice(layout.backupsPrefix.length).split('/')[0];
      if (!id) continue;
      const entry = byId.get(id) ?? { files: 0, bytes: 0, manifest: false };
      entry.files++;
      entry.bytes += info.size;
      if (info.key === layout.manifest(id)) entry.manifest = true;
      byId.set(id, entry);
    }
    const listing: BackupListing = { sealed: [], incomplete: [], damaged: [] };
    for (const [id, entry] of [...byId].sort(([a], [b]) => a.localeCompare(b))) {
      if (!entry.manifest) {
        listing.incomplete.push({ id, files: entry.files, bytes: entry.bytes });
        continue;
      }
      try {
        listing.sealed.push(await this.readManifest(id));
      } catch (err) {
        listing.damaged.push({ id, problem: (err as Error).message });
      }
    }
    return listing;
  }

  async readManifest(id: string): Promise<Manifest> {
    let text: string;
    try {
      text = (await this.readSmall(layout.manifest(id))).toString('utf8');
    } catch (err) {
      if (err instanceof NotFoundError) {
        throw new RepositoryError(`backup ${id} has no manifest in ${this.description}: it is incomplete or does not exist (see pachbackup list)`);
      }
      throw err;
    }
    const manifest = parseManifest(text, `backup ${id} manifest`);
    if (manifest.id !== id) throw new ManifestError(`backup ${id} manifest names backup ${manifest.id}: the manifest is damaged or misplaced`);
    return manifest;
  }

  /** Resolves `latest` or an id to a sealed backup's manifest. */
  async resolve(idOrLatest: string): Promise<Manifest> {
    if (idOrLatest !== 'latest') return this.readManifest(idOrLatest);
    const { sealed, damaged } = await this.listBackups();
    const latest = sealed[sealed.length - 1];
    // "latest" must never silently mean an older backup than the newest one that was sealed.
    const newerDamaged = damaged.filter((d) => !latest || d.id > latest.id);
    if (newerDamaged.length > 0) {
      const d = newerDamaged[newerDamaged.length - 1]!;
      throw new RepositoryError(`the newest backup ${d.id} is damaged (${d.problem}); run pachbackup verify ${d.id}, or name an older backup explicitly (pachbackup list)`);
    }
    if (!latest) throw new RepositoryError(`${this.description} holds no complete backup yet`);
    return latest;
  }

  /**
   * The commit point of a backup: after this write it is complete and offered for restore. In an
   * encrypted repository the manifest is stamped with the data key's id (and its checksum redone).
   * Returns the manifest as stored.
   */
  async seal(manifest: Manifest): Promise<Manifest> {
    let stored = manifest;
    if (this.#dataKey) {
      const { checksum: _unsealed, ...fields } = manifest;
      // Parsed, so the fields are in schema order: the order readers compute the checksum in.
      stored = sealManifest(manifestSchema.omit({ checksum: true }).parse({ ...fields, encryption: { keyId: this.#dataKey.id } }));
    }
    await this.store.put(layout.manifest(manifest.id), Buffer.from(`${JSON.stringify(stored, null, 2)}\n`), {
      ifNoneMatch: true,
      contentType: 'application/json',
    });
    return stored;
  }
}

async function* linesOf<T>(items: Iterable<T>, line: (item: T) => string): AsyncGenerator<string> {
  for (const item of items) yield line(item);
}

/** An index entry as the JSON array an index, journal or scratch file holds: `[key, size, checksum]`. */
export function indexRow(e: IndexEntry): [string, number, Checksum] {
  return [e.key, e.size, e.checksum];
}

function parseIndexLine(line: string, where: string): IndexEntry {
  const row = safeJson(line);
  if (!Array.isArray(row) || typeof row[0] !== 'string' || typeof row[1] !== 'number' || !isChecksum(row[2])) {
    throw new RepositoryError(`${where} is corrupt: bad entry ${line.slice(0, 80)}`);
  }
  return { key: row[0], size: row[1], checksum: row[2] };
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

export function newBackupId(now = new Date()): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${stamp}-${randomBytes(3).toString('hex')}`;
}

/**
 * Passes a re-read through and checks that its first `bytes` hash to `sha256`, what a broken read
 * of the same file passed on before it broke; fails at that point (or at an earlier end) otherwise.
 */
class PrefixCheck extends Transform {
  #left: number;
  readonly #hash: Hash = createHash('sha256');
  constructor(
    bytes: number,
    private readonly sha256: string,
    private readonly mismatch: () => Error,
  ) {
    super();
    this.#left = bytes;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    if (this.#left > 0) {
      const part = chunk.subarray(0, this.#left);
      this.#hash.update(part);
      this.#left -= part.length;
      if (this.#left === 0 && this.#hash.digest('hex') !== this.sha256) return callback(this.mismatch());
    }
    callback(null, chunk);
  }

  override _flush(callback: TransformCallback): void {
    callback(this.#left > 0 ? this.mismatch() : null);
  }
}
