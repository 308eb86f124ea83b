/**
 * pachbackup's contender in bench/copy.ts: the copy core of a backup's pre-copy, alone in its own
 * process so that it is measured like the peers (start-up included). It imports what a backup's
 * copy needs and nothing of the benchmark's own helpers (which load the whole AWS SDK).
 *
 *   node dist/bench/copy-worker.js '<WorkerSpec as JSON>'   (credentials in PBBENCH_S3_KEY/SECRET)
 *
 * Prints one line of JSON, a WorkerReport.
 */
import { constants as perfConstants, PerformanceObserver } from 'node:perf_hooks';
import { objectStoreSchema } from '../src/config/schema.js';
import { copyMissingObjects, CopyJournal, listSource, ServerSideCopier, ServiceMd5 } from '../src/engine/objects.js';
import { openStore } from '../src/objectstore/open.js';
import { tuneHeapForStreaming } from '../src/process/heapTuning.js';
import { algorithmOf } from '../src/repository/checksum.js';
import { layout, Repository, type IndexEntry } from '../src/repository/repository.js';

export interface WorkerSpec {
  endpoint: string;
  source: string;
  target: string;
  concurrency: number;
  serverSide: boolean;
  /** `backup.serviceChecksums`: let the service check MD5s (the default) or hash every byte here. */
  serviceChecksums: boolean;
}

export interface WorkerReport {
  copied: number;
  serverSide: number;
  /** Objects whose checksum is the MD5 the service checked (the rest were hashed with SHA-256 here). */
  md5: number;
  copyMs: number;
  /** Process start to the start of the copy core (node's start-up and module loading): performance.now() counts from the process's start. */
  startMs: number;
  /** Milliseconds of the copy core spent opening (creating) the repository and listing the source, before the first copy. */
  setupMs: number;
  /** Full (mark-compact) garbage collections during the run (see src/process/heapTuning.ts). */
  majorGcs: number;
}

/**
 * What a backup's pre-copy does for the objects: list the cluster bucket, copy every object the
 * repository lacks (checksums the service vouches for, else SHA-256; journal), into a fresh repository in `target`.
 */
async function copyWorker(spec: WorkerSpec): Promise<WorkerReport> {
  const started = performance.now();
  let majorGcs = 0;
  const gcs = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) if ((entry as PerformanceEntry & { detail?: { kind?: number } }).detail?.kind === perfConstants.NODE_PERFORMANCE_GC_MAJOR) majorGcs++;
  });
  gcs.observe({ entryTypes: ['gc'] });
  const storeConfig = (bucket: string) =>
    objectStoreSchema.parse({ url: `s3://${bucket}`, endpoint: spec.endpoint, accessKeyId: { env: 'PBBENCH_S3_KEY' }, secretAccessKey: { env: 'PBBENCH_S3_SECRET' } });
  // As in runBackup: sockets for twice the concurrency (reads and writes overlap).
  const source = openStore(storeConfig(spec.source), 'cluster.objectStore', { maxSockets: spec.concurrency * 2 });
  const target = openStore(storeConfig(spec.target), 'repository', { maxSockets: spec.concurrency * 2 });
  const repo = new Repository(target.store);
  await repo.open(true);
  let serverSide: ServerSideCopier | undefined;
  if (spec.serverSide) {
    const copier = openStore(storeConfig(spec.target), 'repository', { maxSockets: spec.concurrency * 2 }).s3!;
    serverSide = new ServerSideCopier((key, size, signal, sourceMd5, sourceEtag) => copier.copyFrom(source.s3!, key, layout.object(key), size, signal, sourceMd5, sourceEtag));
  }
  const listing = await listSource(source.store);
  const setupMs = Math.round(performance.now() - started);
  const held = new Map<string, IndexEntry>();
  const result = await copyMissingObjects({
    source: source.store,
    repo,
    objects: listing.objects,
    held,
    concurrency: spec.concurrency,
    journal: new CopyJournal(repo, 'bench-copy'),
    emit: () => undefined,
    phase: 'precopy',
    ...(serverSide ? { serverSide } : {}),
    serviceMd5: new ServiceMd5(spec.serviceChecksums),
  });
  if (serverSide?.disabled) process.stderr.write(`server-side copy fell back to streaming: ${serverSide.reason}\n`);
  const md5 = result.entries.filter((e) => algorithmOf(e.checksum) === 'md5').length;
  return { copied: result.newCount, serverSide: result.serverSideCount, md5, copyMs: Math.round(performance.now() - started), setupMs, startMs: Math.round(started), majorGcs };
}

// As the CLI's commands do.
tuneHeapForStreaming();
process.stdout.write(`${JSON.stringify(await copyWorker(JSON.parse(process.argv[2] ?? '{}') as WorkerSpec))}\n`);
process.exit(0);
