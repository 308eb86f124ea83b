import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { gunzipSync, gzipSync } from 'node:zlib';
import { z } from 'zod';
import { NotFoundError, PreconditionFailedError, type ObjectStore } from '../objectstore/store.js';
import { pipeWithDigest, sha256Hex } from './digest.js';
import { ManifestError, parseManifest, type FileRef, type Manifest } from './manifest.js';

/** Layout of a repository; docs/repository-format.md is the specification of these names. */
export const layout = {
  config: 'pachbackup.json',
  objectsPrefix: 'objects/',
  object: (key: string) => `objects/${key}`,
  backupsPrefix: 'backups/',
  backupPrefix: (id: string) => `backups/${id}/`,
  dump: (id: string, database: string) => `backups/${id}/db/${database}.dump`,
  helmValues: (id: string) => `backups/${id}/helm-values.yaml`,
  journal: (id: string, seq: number) => `backups/${id}/journal/${String(seq).padStart(6, '0')}.jsonl.gz`,
  journalPrefix: (id: string) => `backups/${id}/journal/`,
  index: (id: string) => `backups/${id}/index.jsonl.gz`,
  referenced: (id: string) => `backups/${id}/referenced.txt.gz`,
  manifest: (id: string) => `backups/${id}/manifest.json`,
} as const;

export const REPOSITORY_FORMAT_VERSION = 1;

const repoConfigSchema = z.object({
  format: z.literal('pachbackup-repository'),
  formatVersion: z.number().int(),
  id: z.string(),
  createdAt: z.string(),
});
export type RepositoryConfig = z.infer<typeof repoConfigSchema>;

/** One object a backup holds: its key in the cluster bucket, size and SHA-256 of its bytes. */
export interface IndexEntry {
  key: string;
  size: number;
  sha256: string;
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

export class Repository {
  #config: RepositoryConfig | undefined;

  constructor(readonly store: ObjectStore) {}

  get description(): string {
    return this.store.description;
  }

  get id(): string {
    if (!this.#config) throw new Error('repository not opened');
    return this.#config.id;
  }

  /** Reads the repository's config, creating the repository if `create` and it does not exist yet. */
  async open(create: boolean): Promise<RepositoryConfig> {
    const existing = await this.readConfig();
    if (existing) return (this.#config = existing);
    if (!create) {
      throw new RepositoryError(`${this.description} is not a pachbackup repository (no ${layout.config}); check repository.url, or run a backup to create it`);
    }
    const config: RepositoryConfig = {
      format: 'pachbackup-repository',
      formatVersion: REPOSITORY_FORMAT_VERSION,
      id: randomBytes(8).toString('hex'),
      createdAt: new Date().toISOString(),
    };
    try {
      await this.store.put(layout.config, Buffer.from(`${JSON.stringify(config, null, 2)}\n`), { ifNoneMatch: true, contentType: 'application/json' });
    } catch (err) {
      // Another process created it between our read and write: use theirs.
      if (!(err instanceof PreconditionFailedError)) throw err;
    }
    const created = await this.readConfig();
    if (!created) throw new RepositoryError(`${this.description}: wrote ${layout.config} but cannot read it back`);
    return (this.#config = created);
  }

  private async readConfig(): Promise<RepositoryConfig | undefined> {
    let text: string;
    try {
      text = (await this.readSmall(layout.config)).toString('utf8');
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
    const { bytes, sha256 } = await pipeWithDigest(body, (digest) => this.store.put(path, digest, {}, signal), signal);
    return { file: path, size: bytes, sha256 };
  }

  async writeBuffer(path: string, data: Buffer, options: { ifNoneMatch?: boolean } = {}): Promise<FileRef> {
    await this.store.put(path, data, { size: data.length, ...options });
    return { file: path, size: data.length, sha256: sha256Hex(data) };
  }

  async readSmall(path: string): Promise<Buffer> {
    const stream = await this.store.get(path);
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
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

  async writeIndex(path: string, entries: Iterable<IndexEntry>): Promise<FileRef> {
    const lines: string[] = [];
    for (const e of entries) lines.push(JSON.stringify([e.key, e.size, e.sha256]));
    return this.writeBuffer(path, gzipSync(Buffer.from(lines.length ? `${lines.join('\n')}\n` : '')));
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
      if (line === '') continue;
      const row = safeJson(line);
      if (!Array.isArray(row) || typeof row[0] !== 'string' || typeof row[1] !== 'number' || typeof row[2] !== 'string') {
        throw new RepositoryError(`${where} is corrupt: bad entry ${line.slice(0, 80)}`);
      }
      out.push({ key: row[0], size: row[1], sha256: row[2] });
    }
    return out;
  }

  async readIndex(ref: FileRef): Promise<IndexEntry[]> {
    return this.parseIndex(await this.readVerified(ref), ref.file);
  }

  async writeReferenced(id: string, keys: string[]): Promise<FileRef & { count: number }> {
    const ref = await this.writeBuffer(layout.referenced(id), gzipSync(Buffer.from(keys.length ? `${keys.join('\n')}\n` : '')));
    return { ...ref, count: keys.length };
  }

  async readReferenced(ref: FileRef): Promise<string[]> {
    const text = gunzipSync(await this.readVerified(ref)).toString('utf8');
    return text.split('\n').filter((line) => line !== '');
  }

  /** Journal entries every unsealed backup wrote while copying: objects copied and checked. */
  async readJournals(id: string): Promise<IndexEntry[]> {
    const out: IndexEntry[] = [];
    for await (const info of this.store.list(layout.journalPrefix(id))) {
      try {
        out.push(...this.parseIndex(await this.readSmall(info.key), info.key));
      } catch {
        // A journal torn by a crash is ignored: its objects are simply copied again.
      }
    }
    return out;
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
    const { sealed } = await this.listBackups();
    const latest = sealed[sealed.length - 1];
    if (!latest) throw new RepositoryError(`${this.description} holds no complete backup yet`);
    return latest;
  }

  /** The commit point of a backup: after this write it is complete and offered for restore. */
  async seal(manifest: Manifest): Promise<void> {
    await this.store.put(layout.manifest(manifest.id), Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`), {
      ifNoneMatch: true,
      contentType: 'application/json',
    });
  }
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
