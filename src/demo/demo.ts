import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Renderer } from '../cli/render.js';
import { backupSummaryText, restoreSummaryText, verifyReportText } from '../cli/commands.js';
import { validateConfig } from '../config/load.js';
import { runBackup } from '../engine/backup.js';
import { openRepository } from '../engine/context.js';
import { restoreTargetsFromConfig, runRestore } from '../engine/restore.js';
import { verifyBackup } from '../engine/verify.js';
import { FsObjectStore } from '../objectstore/fs.js';
import { createStrategy } from '../quiesce/factory.js';
import { diffFingerprints, fingerprintDatabase, fingerprintStore } from './compare.js';
import { startLocalPostgres, type LocalPostgres } from './localPostgres.js';
import { createPachydermFixture } from './pachydermFixture.js';

/** Helm values of the demo cluster, so the restore shows the rewrite too. */
const DEMO_HELM_VALUES = `# Demo cluster values (a local-dev style install with an external database)
deployTarget: LOCAL
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
postgresql:
  enabled: false
`;

/**
 * The embedded default: a demo cluster on this machine (PostgreSQL in a temporary directory with
 * Pachyderm-shaped `pachyderm` and `dex` databases, and a directory object store holding the
 * matching chunk objects), backed up, wiped, restored into new databases and a new store, and
 * compared table by table and object by object. Everything is removed afterwards.
 */
export async function runDemo(options: { chunks: number; renderer: Renderer; signal: AbortSignal }): Promise<boolean> {
  const { renderer, signal } = options;
  const work = await mkdtemp(join(tmpdir(), 'pachbackup-demo-'));
  let pg: LocalPostgres | undefined;
  try {
    renderer.line(`demo: working in ${work}`);
    pg = await startLocalPostgres();
    renderer.line(`demo: PostgreSQL ${pg.majorVersion} started on 127.0.0.1:${pg.port}`);
    const bucket = join(work, 'cluster-bucket');
    // The chart mounts <hostPath>pachd as a LOCAL cluster's bucket root, so the restored store is named pachd.
    const restored = join(work, 'restored', 'pachd');
    await mkdir(bucket);
    await mkdir(restored, { recursive: true });
    await mkdir(join(work, 'repository'));
    const fixture = await createPachydermFixture(pg, new FsObjectStore(bucket), { chunks: options.chunks, chunkSize: 16 * 1024 });
    renderer.line(`demo: cluster created: databases pachyderm and dex, ${fixture.keys.length} chunk objects`);
    const valuesFile = join(work, 'values.yaml');
    await writeFile(valuesFile, DEMO_HELM_VALUES);

    const before = {
      pachyderm: await fingerprintDatabase(pg, 'pachyderm'),
      dex: await fingerprintDatabase(pg, 'dex'),
      objects: await fingerprintStore(new FsObjectStore(bucket)),
    };
    // The password reaches pachbackup the way it would in production: by reference.
    process.env.PACHBACKUP_DEMO_PGPASSWORD = pg.password;
    const server = { host: pg.host, port: pg.port, user: pg.user, password: { env: 'PACHBACKUP_DEMO_PGPASSWORD' }, sslmode: 'disable', binDir: pg.binDir };
    const config = validateConfig(
      {
        cluster: { postgres: server, objectStore: { url: pathToFileURL(bucket).href }, helmValues: valuesFile },
        repository: { url: pathToFileURL(join(work, 'repository')).href },
        pause: { strategy: 'command', command: { pause: ['true'], resume: ['true'], timeoutSeconds: 30 }, quiescence: { settleSeconds: 0.5 } },
        restore: {
          postgres: server,
          databases: { pachyderm: 'pachyderm_restored', dex: 'dex_restored' },
          objectStore: { url: pathToFileURL(restored).href },
          helmValuesOut: join(work, 'values-restored.yaml'),
        },
      },
      'demo config',
    );
    renderer.line('demo: backing up (the demo pause and resume commands are no-ops: there is no pachd here)');
    const backup = await runBackup({ config, strategy: await createStrategy(config.pause), emit: renderer.sink, signal });
    renderer.line(backupSummaryText(backup));

    const repo = openRepository(config);
    await repo.open(false);
    const report = await verifyBackup({ repo, manifest: await repo.resolve(backup.id), emit: renderer.sink, concurrency: 8, signal });
    renderer.line(verifyReportText(report));
    if (!report.ok) return false;

    renderer.line('demo: wiping the cluster (dropping pachyderm and dex, deleting the bucket)');
    await pg.query('postgres', 'DROP DATABASE pachyderm WITH (FORCE)');
    await pg.query('postgres', 'DROP DATABASE dex WITH (FORCE)');
    await rm(bucket, { recursive: true, force: true });

    const restore = await runRestore({
      config,
      backup: 'latest',
      targets: restoreTargetsFromConfig(config),
      force: false,
      dryRun: false,
      noOwner: true,
      concurrency: 8,
      emit: renderer.sink,
      signal,
    });
    renderer.line(restoreSummaryText(restore));

    const differences = [
      ...diffFingerprints('table pachyderm', before.pachyderm, await fingerprintDatabase(pg, 'pachyderm_restored')),
      ...diffFingerprints('table dex', before.dex, await fingerprintDatabase(pg, 'dex_restored')),
      ...diffFingerprints('object', before.objects, await fingerprintStore(new FsObjectStore(restored))),
    ];
    const tables = before.pachyderm.size + before.dex.size;
    const rows = [...before.pachyderm.values(), ...before.dex.values()].reduce((n, t) => n + t.rows, 0);
    if (differences.length > 0) {
      renderer.result('demo', { ok: false, differences }, () => `demo FAILED: the restored cluster differs:\n  ${differences.join('\n  ')}`);
      return false;
    }
    renderer.result(
      'demo',
      { ok: true, backupId: backup.id, tables, rows, objects: before.objects.size, downtimeMs: backup.downtimeMs },
      () =>
        `demo OK: restored cluster equals the original: ${tables} tables (${rows} rows) compared by ordered checksum, ${before.objects.size} objects compared by SHA-256; downtime ${backup.downtimeMs} ms`,
    );
    return true;
  } finally {
    delete process.env.PACHBACKUP_DEMO_PGPASSWORD;
    await pg?.stop().catch(() => undefined);
    await rm(work, { recursive: true, force: true });
  }
}
