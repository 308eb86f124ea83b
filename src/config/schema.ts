import { z } from 'zod';

/**
 * The configuration file's schema. The TypeScript types are derived from it, so the validator and
 * the code that reads the config cannot drift apart.
 */

/** Bounds of numeric keys that command-line flags also set (the flags are checked against them too). */
export const LIMITS = { concurrency: 512, jobs: 64, port: 65535 } as const;

const secretRef = z.union(
  [z.object({ env: z.string().min(1) }).strict(), z.object({ file: z.string().min(1) }).strict()],
  { error: 'must be a reference, {env: VARIABLE} or {file: /path/to/file}; literal secrets are not accepted in the config file' },
);

const sslMode = z.enum(['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full']);

export const postgresSchema = z
  .object({
    host: z.string().min(1).default('localhost'),
    port: z.number().int().min(1).max(LIMITS.port).default(5432),
    user: z.string().min(1),
    password: secretRef.optional(),
    sslmode: sslMode.default('prefer'),
    /** CA certificate file, required for verify-ca and verify-full. */
    sslrootcert: z.string().optional(),
    /** Seconds to wait for a connection before giving up. */
    connectTimeoutSeconds: z.number().int().positive().default(10),
    /** Directory holding pg_dump / pg_restore; default: the newest /usr/lib/postgresql/N/bin, else PATH. */
    binDir: z.string().optional(),
  })
  .strict()
  .superRefine((pg, ctx) => {
    if ((pg.sslmode === 'verify-full' || pg.sslmode === 'verify-ca') && !pg.sslrootcert) {
      ctx.addIssue({ code: 'custom', path: ['sslrootcert'], message: `sslmode ${pg.sslmode} needs sslrootcert: the CA certificate file that signed the server's certificate` });
    }
  });

/**
 * Whether a URL holds credentials (`scheme://user:password@host`). Store URLs and endpoints are
 * printed in messages and recorded in manifests, and pachbackup never authenticates with
 * userinfo, so such a URL is refused (without quoting it) instead of carried around.
 */
function holdsUserinfo(url: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*@/i.test(url);
}

const NO_USERINFO = 'must not hold credentials (user:password@ before the host or bucket): give S3 credentials as accessKeyId and secretAccessKey, {env: VARIABLE} or {file: /path} references';

export const objectStoreSchema = z
  .object({
    /** `s3://bucket[/prefix]` or `file:///absolute/path`, like pachd.storage.storageURL. */
    url: z.string().min(1).refine((url) => !holdsUserinfo(url), NO_USERINFO),
    endpoint: z
      .url({ error: 'must be a URL such as https://s3.eu-west-1.amazonaws.com or http://127.0.0.1:9000' })
      .refine((url) => !holdsUserinfo(url), NO_USERINFO)
      .optional(),
    region: z.string().default('us-east-1'),
    forcePathStyle: z.boolean().default(true),
    accessKeyId: secretRef.optional(),
    secretAccessKey: secretRef.optional(),
    /**
     * `when_required` sends checksums only where S3 demands them. Many S3-compatible stores
     * (Ceph RGW, older MinIO) reject the SDK's default streaming trailer checksums.
     */
    checksums: z.enum(['when_supported', 'when_required']).default('when_required'),
    /** Per-request timeout in seconds. */
    requestTimeoutSeconds: z.number().positive().default(120),
    /**
     * CA certificates (PEM file) trusted for an https endpoint besides Node's bundled roots: a
     * store behind a private CA. Default: the file named by AWS_CA_BUNDLE, when that is set.
     */
    caFile: z.string().min(1).optional(),
  })
  .strict();

export const databasesSchema = z
  .object({
    pachyderm: z.string().min(1).default('pachyderm'),
    dex: z.string().min(1).nullable().default('dex'),
  })
  .strict();

const commandSpec = z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]);

export const pauseSchema = z
  .object({
    strategy: z.enum(['none', 'command', 'kubernetes', 'pachctl']).default('none'),
    command: z
      .object({
        pause: commandSpec,
        resume: commandSpec,
        /** Optional: exits 0 once the cluster is paused; polled until then. */
        status: commandSpec.optional(),
        timeoutSeconds: z.number().positive().default(300),
      })
      .strict()
      .optional(),
    kubernetes: z
      .object({
        kubeconfig: z.string().optional(),
        context: z.string().optional(),
        namespace: z.string().default('default'),
        deployments: z.array(z.string()).default(['pachd', 'pachw']),
        workerSelector: z.string().default('suite=pachyderm,component=worker'),
        timeoutSeconds: z.number().positive().default(300),
      })
      .strict()
      .optional(),
    pachctl: z
      .object({
        path: z.string().default('pachctl'),
        context: z.string().optional(),
        timeoutSeconds: z.number().positive().default(300),
      })
      .strict()
      .optional(),
    /** Refuse to pause unless the Kubernetes/pachctl context is exactly this. */
    expectedContext: z.string().optional(),
    /**
     * Keep the cluster paused until pg_dump has finished. Off by default: the cluster is resumed
     * as soon as the database snapshot is exported and the objects are copied, and pg_dump then
     * reads that snapshot while the cluster runs, so downtime does not grow with database size.
     */
    holdDuringDump: z.boolean().default(false),
    /** Abort the backup and resume if the cluster would stay paused longer than this. */
    maxDowntimeSeconds: z.number().positive().optional(),
    /** After pausing, prove the cluster quiet before capturing anything (not for strategy none). */
    quiescence: z
      .object({
        enabled: z.boolean().default(true),
        /** Seconds between the two listings of the bucket that must be identical. */
        settleSeconds: z.number().min(0).default(2),
        /**
         * Accept database sessions idle since before the pause (e.g. pg-bouncer's pooled server
         * connections); active sessions and sessions that did anything after the pause still fail it.
         */
        tolerateIdleSessions: z.boolean().default(true),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .superRefine((p, ctx) => {
    if (p.strategy === 'command' && !p.command) {
      ctx.addIssue({ code: 'custom', path: ['command'], message: 'strategy "command" needs pause.command with pause and resume commands' });
    }
  });

export const configSchema = z
  .object({
    cluster: z
      .object({
        postgres: postgresSchema,
        databases: databasesSchema.prefault({}),
        objectStore: objectStoreSchema,
        /** Helm values file used to deploy the cluster, kept with every backup. */
        helmValues: z.string().optional(),
        /** Read the Helm values from the live release's Secret instead of a file. */
        helmRelease: z
          .object({
            name: z.string().min(1),
            namespace: z.string().min(1).default('default'),
            /** Default: pause.kubernetes.kubeconfig / context. */
            kubeconfig: z.string().optional(),
            context: z.string().optional(),
          })
          .strict()
          .optional(),
      })
      .strict()
      .superRefine((c, ctx) => {
        if (c.helmValues && c.helmRelease) {
          ctx.addIssue({ code: 'custom', path: ['helmRelease'], message: 'set cluster.helmValues or cluster.helmRelease, not both' });
        }
      }),
    repository: objectStoreSchema.extend({
      /**
       * Encrypts the repository it creates (docs/repository-format.md, "Encryption"). `key` is the
       * key-encryption key: 32 bytes as 64 hex digits or base64, or a passphrase of 16+ characters.
       * Must be set for an encrypted repository and absent for an unencrypted one.
       */
      encryption: z.object({ key: secretRef }).strict().optional(),
    }),
    pause: pauseSchema.prefault({}),
    backup: z
      .object({
        concurrency: z.number().int().min(1).max(LIMITS.concurrency).default(16),
        mode: z.enum(['paused', 'online']).default('paused'),
        /** Copy objects while the cluster runs, before pausing, so the pause covers only the delta. */
        precopy: z.boolean().default(true),
        /**
         * pg_dump --compress level (0-9). The dump is most of the downtime; level 1 dumps several
         * times faster than pg_dump's default (6) for a slightly larger file (bench/RESULTS.md).
         */
        dumpCompression: z.number().int().min(0).max(9).default(1),
        /**
         * Let the S3 service check each copied object against the MD5 its listed ETag stands for
         * (Content-MD5 on the upload, the copy's ETag for a server-side copy), so the bytes are not
         * hashed here; the index then records `md5:` checksums. Off: SHA-256 of every object,
         * computed by pachbackup. Objects without a plain MD5 ETag are always hashed here.
         */
        serviceChecksums: z.boolean().default(true),
        /**
         * pg_dump --jobs. 1 streams one custom-format file into the repository (no local disk).
         * More dumps that many tables at once in the directory format, written to $TMPDIR first
         * (free space there of about the dumps' size) and then uploaded file by file.
         */
        dumpJobs: z.number().int().min(1).max(LIMITS.jobs).default(1),
        /** Keep the Helm values' secrets in an unencrypted repository (an encrypted one always keeps them). */
        keepHelmSecrets: z.boolean().default(false),
      })
      .strict()
      .prefault({}),
    restore: z
      .object({
        postgres: postgresSchema.optional(),
        databases: databasesSchema.optional(),
        objectStore: objectStoreSchema.optional(),
        helmValuesOut: z.string().optional(),
        /** Pass --no-owner --no-acl to pg_restore, so the restoring user owns everything. */
        noOwner: z.boolean().default(true),
        /**
         * pg_restore --jobs. Above 1 (and for every directory-format dump) the dump is first
         * downloaded to $TMPDIR, each file checked against the manifest, and restored from there.
         */
        jobs: z.number().int().min(1).max(LIMITS.jobs).default(1),
      })
      .strict()
      .optional(),
    /** Restore drills (`pachbackup drill`): scratch targets that every drill creates and removes again. */
    drill: z
      .object({
        /** Server for the scratch databases; default restore.postgres. The user needs CREATEDB. */
        postgres: postgresSchema.optional(),
        /** Bucket or directory in which each drill creates, then deletes, its own `drill-<id>/` prefix. */
        objectStore: objectStoreSchema.optional(),
      })
      .strict()
      .prefault({}),
  })
  .strict();

export type Config = z.infer<typeof configSchema>;
export type PostgresConfig = z.infer<typeof postgresSchema>;
export type ObjectStoreConfig = z.infer<typeof objectStoreSchema>;
export type DatabasesConfig = z.infer<typeof databasesSchema>;
export type PauseConfig = z.infer<typeof pauseSchema>;
