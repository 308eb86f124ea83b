import { z } from 'zod';
import { sha256Hex } from './digest.js';

/**
 * The newest format of manifest.json this release reads. Bump when a reader of the old format could misread the new one.
 * 2: the object index may hold `md5:` checksums (docs/repository-format.md).
 * 3: a database may have a directory-format dump (`databases[].format`, `files`), which a release
 * that reads only up to 2 would try to restore as one file.
 * A backup is written with the lowest version that describes it (manifestFormatVersion), so older
 * releases keep reading what they can.
 */
export const MANIFEST_FORMAT_VERSION = 3;

/** The format version a manifest is written with: the lowest whose readers read it right. */
export function manifestFormatVersion(databases: Array<{ format?: DumpFormat | undefined }>, md5Count: number): number {
  if (databases.some((d) => dumpFormat(d) === 'directory')) return 3;
  return md5Count > 0 ? 2 : 1;
}

const fileRef = z.object({ file: z.string(), size: z.number().int().nonnegative(), sha256: z.string().regex(/^[0-9a-f]{64}$/) });

export const tableCountSchema = z.object({ schema: z.string(), table: z.string(), rows: z.number().int().nonnegative() });

export const manifestSchema = z.object({
  format: z.literal('pachbackup-manifest'),
  formatVersion: z.number().int(),
  id: z.string(),
  repositoryId: z.string(),
  toolVersion: z.string(),
  mode: z.enum(['paused', 'online']),
  startedAt: z.string(),
  finishedAt: z.string(),
  source: z.object({
    postgres: z.object({ host: z.string(), port: z.number(), user: z.string(), sslmode: z.string() }),
    objectStore: z.string(),
  }),
  databases: z.array(
    fileRef.extend({
      role: z.enum(['pachyderm', 'dex']),
      name: z.string(),
      serverVersion: z.string(),
      pgDumpVersion: z.string(),
      tables: z.array(tableCountSchema),
      /**
       * Absent (written so, for older readers) means `custom`: one pg_dump custom-format file,
       * `file`. `directory`: pg_dump's directory format, its files in `files`; `file` is then the
       * prefix they share, `size` their total and `sha256` the digest of the list (dumpListDigest).
       */
      format: z.enum(['custom', 'directory']).optional(),
      files: z.array(fileRef).optional(),
    }),
  ),
  objects: z.object({
    index: fileRef,
    count: z.number().int().nonnegative(),
    bytes: z.number().int().nonnegative(),
    newCount: z.number().int().nonnegative(),
    newBytes: z.number().int().nonnegative(),
    copyPath: z.enum(['stream', 'server-side', 'mixed', 'none']),
    /** Objects whose index checksum is the MD5 the S3 service checked (`md5:`), the rest SHA-256. Absent before format 2. */
    md5Count: z.number().int().nonnegative().optional(),
  }),
  /** Chunk keys the pachyderm database referenced in the dump's snapshot; every one is in the index. */
  referenced: fileRef.extend({ count: z.number().int().nonnegative() }),
  helmValues: fileRef.extend({ redacted: z.boolean() }).nullable(),
  pause: z
    .object({ strategy: z.string(), target: z.string(), pausedAt: z.string(), resumedAt: z.string(), downtimeMs: z.number().nonnegative() })
    .nullable(),
  phases: z.array(z.object({ name: z.string(), ms: z.number().nonnegative() })),
  /** Sizes measured at preflight, the inputs of the next backup's prediction. */
  sourceStats: z.object({ databaseBytes: z.number().nonnegative(), objects: z.number().int().nonnegative() }).optional(),
  /** What `plan` predicted for this backup before it paused, kept to show the prediction's error. */
  prediction: z.object({ downtimeMs: z.number().nonnegative(), totalMs: z.number().nonnegative(), basis: z.string() }).optional(),
  /** Present when the repository is encrypted: the id (a fingerprint, never the key) of the data key. */
  encryption: z.object({ keyId: z.string() }).optional(),
  /** SHA-256 of the manifest's canonical JSON without this field: catches a damaged manifest. */
  checksum: z.string(),
});

export type Manifest = z.infer<typeof manifestSchema>;

/** What the schema cannot say: a directory dump lists its files, each under the dump's prefix with a plain name. */
function dumpEntryProblem(db: DatabaseEntry, at: number): string | undefined {
  const where = `databases.${at}`;
  if (dumpFormat(db) === 'custom') return db.files === undefined ? undefined : `${where}.files: a custom-format dump has no file list`;
  if (!db.files || db.files.length === 0) return `${where}.files: a directory-format dump needs its file list`;
  for (const f of db.files) {
    const name = f.file.startsWith(db.file) ? f.file.slice(db.file.length) : '';
    if (!/^[A-Za-z0-9._-]+$/.test(name) || name === '.' || name === '..') return `${where}.files: ${JSON.stringify(f.file)} is not a plain file name under ${db.file}`;
  }
  return undefined;
}
export type TableCount = z.infer<typeof tableCountSchema>;
export type FileRef = z.infer<typeof fileRef>;
export type DatabaseEntry = Manifest['databases'][number];
export type DumpFormat = 'custom' | 'directory';

/** A database entry's dump format; entries written before directory dumps existed have none and are `custom`. */
export function dumpFormat(db: { format?: DumpFormat | undefined }): DumpFormat {
  return db.format ?? 'custom';
}

/**
 * The files a database's dump consists of, each with its size and SHA-256: the one custom-format
 * file, or every file of a directory-format dump.
 */
export function dumpFiles(db: DatabaseEntry): FileRef[] {
  if (dumpFormat(db) === 'custom') return [{ file: db.file, size: db.size, sha256: db.sha256 }];
  return db.files ?? [];
}

/**
 * The `sha256` of a directory-format dump: SHA-256 of one line per file, in byte order of the
 * names, `<sha256 hex>  <name>\n` where the name is relative to the dump's prefix (what
 * `sha256sum * | LC_ALL=C sort -k2` prints in the dump directory, fed to `sha256sum` again).
 */
export function dumpListDigest(prefix: string, files: FileRef[]): string {
  const lines = files
    .map((f) => ({ name: f.file.startsWith(prefix) ? f.file.slice(prefix.length) : f.file, sha256: f.sha256 }))
    .sort((a, b) => Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)))
    .map((f) => `${f.sha256}  ${f.name}\n`);
  return sha256Hex(lines.join(''));
}

export function manifestChecksum(manifest: Omit<Manifest, 'checksum'> & { checksum?: string }): string {
  const { checksum: _ignored, ...rest } = manifest;
  return sha256Hex(JSON.stringify(rest));
}

export function sealManifest(manifest: Omit<Manifest, 'checksum'>): Manifest {
  return { ...manifest, checksum: manifestChecksum(manifest) };
}

export class ManifestError extends Error {
  override name = 'ManifestError';
}

/** Parses and checks a manifest's format and self-checksum; throws ManifestError naming the problem. */
export function parseManifest(text: string, where: string): Manifest {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new ManifestError(`${where} is not valid JSON: the manifest is damaged`);
  }
  const version = (json as { formatVersion?: unknown }).formatVersion;
  if (typeof version === 'number' && version > MANIFEST_FORMAT_VERSION) {
    throw new ManifestError(`${where} has format version ${version}; this pachbackup reads up to ${MANIFEST_FORMAT_VERSION}: upgrade pachbackup`);
  }
  const result = manifestSchema.safeParse(json);
  if (!result.success) {
    const issue = result.error.issues[0];
    throw new ManifestError(`${where} does not match the manifest schema (${issue?.path.join('.')}: ${issue?.message}): the manifest is damaged`);
  }
  if (manifestChecksum(result.data) !== result.data.checksum) {
    throw new ManifestError(`${where} fails its checksum: the manifest was modified or damaged`);
  }
  const problem = result.data.databases.map(dumpEntryProblem).find((p) => p !== undefined);
  if (problem) throw new ManifestError(`${where} does not match the manifest schema (${problem}): the manifest is damaged`);
  return result.data;
}
