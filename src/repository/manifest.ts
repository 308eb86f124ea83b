import { z } from 'zod';
import { sha256Hex } from './digest.js';

/**
 * Format of manifest.json. Bump when a reader of the old format could misread the new one.
 * 2: the object index may hold `md5:` checksums (docs/repository-format.md). A backup whose index
 * holds none is still written as version 1, so older releases keep reading it.
 */
export const MANIFEST_FORMAT_VERSION = 2;

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
export type TableCount = z.infer<typeof tableCountSchema>;
export type FileRef = z.infer<typeof fileRef>;

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
  return result.data;
}
