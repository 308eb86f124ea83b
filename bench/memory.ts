/**
 * Peak RSS of a `pachbackup backup` process against the number of objects in the cluster: tiny
 * objects in a directory store (so the run is about bookkeeping, not bytes), a fresh repository for
 * the first backup, then a second, unchanged backup into the same repository. Peak RSS is the
 * child's VmHWM as GNU time reports it (%M).
 *
 *   node dist/bench/memory.js [--counts 1000,10000,100000] [--dir /dev/shm]
 */
import { existsSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { createBenchCluster, fixed, formatSize, log, machineNotes, parseFlags, printTable, runPachbackup, workDir, type BenchCluster, type Cell } from './common.js';

const flags = parseFlags('memory: peak RSS of a backup process at growing object counts', {
  counts: { default: '1000,10000,100000', help: 'object counts to measure at, ascending' },
  'object-size': { default: '256', help: 'bytes per object' },
  dir: { default: existsSync('/dev/shm') ? '/dev/shm' : '', help: 'where the cluster directory and the repositories live (tmpfs keeps fsync cheap); empty = the OS temp dir' },
  concurrency: { default: '16', help: 'objects in flight' },
  'heap-limits': { default: '', help: 'also run the largest count under these V8 heap limits (MiB, e.g. 128,192,256): which complete shows the live heap a backup needs' },
});
const counts = flags.counts.split(',').map(Number).sort((a, b) => a - b);
const objectSize = Number(flags['object-size']);
const concurrency = Number(flags.concurrency);

const work = await workDir('pbbench-memory-', flags.dir || undefined);
let cluster: BenchCluster | undefined;
try {
  const bucket = join(work, 'cluster-bucket');
  await mkdir(bucket);
  cluster = await createBenchCluster({ store: { kind: 'fs', dir: bucket }, objects: 0, objectSize, databaseMiB: 0 });
  const c = cluster;
  const measured: Array<{ count: number; first: number; second: number; firstMs: number; secondMs: number }> = [];
  for (const count of counts) {
    await c.addObjects(count - c.keys.length);
    const repo = join(work, `repository-${count}`);
    await mkdir(repo);
    const config = await c.writeConfig(join(work, `config-${count}.yaml`), repo, { concurrency });
    const first = await runPachbackup(config, ['backup'], c.env);
    const second = await runPachbackup(config, ['backup'], c.env);
    const held = (second.result as { objects: { heldCount: number } }).objects.heldCount;
    if (held !== count) throw new Error(`second backup holds ${held} objects, expected ${count}`);
    log(`${count} objects: first backup peak RSS ${fixed(first.maxRssKiB / 1024, 0)} MiB in ${fixed(first.wallMs / 1000, 1)} s, second ${fixed(second.maxRssKiB / 1024, 0)} MiB in ${fixed(second.wallMs / 1000, 1)} s`);
    measured.push({ count, first: first.maxRssKiB * 1024, second: second.maxRssKiB * 1024, firstMs: first.wallMs, secondMs: second.wallMs });
    await rm(repo, { recursive: true, force: true });
  }
  const rows: Cell[][] = measured.map((m, i) => {
    const prev = measured[i - 1];
    const perObject = (now: number, before: number | undefined): string => (prev && before !== undefined ? fixed((now - before) / (m.count - prev.count), 0) : '—');
    return [
      m.count,
      fixed(m.first / 1024 ** 2, 0),
      perObject(m.first, prev?.first),
      fixed(m.second / 1024 ** 2, 0),
      perObject(m.second, prev?.second),
      fixed(m.firstMs / 1000, 1),
      fixed(m.secondMs / 1000, 1),
    ];
  });
  const limits = flags['heap-limits'] ? flags['heap-limits'].split(',').map(Number) : [];
  const limitRows: Cell[][] = [];
  const largest = counts[counts.length - 1]!;
  for (const limit of limits) {
    const repo = join(work, `repository-heap-${limit}`);
    await mkdir(repo);
    const config = await c.writeConfig(join(work, `config-heap-${limit}.yaml`), repo, { concurrency });
    const env = { ...c.env, NODE_OPTIONS: `--max-old-space-size=${limit}` };
    const outcome = async (): Promise<string> => {
      try {
        const m = await runPachbackup(config, ['backup'], env);
        return `completes (${fixed(m.wallMs / 1000, 1)} s, ${fixed(m.cpuSeconds, 1)} s CPU)`;
      } catch (err) {
        return /heap out of memory/.test((err as Error).message) ? 'JavaScript heap out of memory' : `failed: ${(err as Error).message.split('\n')[0]}`;
      }
    };
    const first = await outcome();
    const second = first.startsWith('completes') ? await outcome() : 'not run (no first backup)';
    log(`heap limit ${limit} MiB at ${largest} objects: first ${first}; second ${second}`);
    limitRows.push([limit, fixed((limit * 1024 ** 2) / largest, 0), first, second]);
    await rm(repo, { recursive: true, force: true });
  }
  const last = measured[measured.length - 1]!;
  const firstRow = measured[0]!;
  const slope = (last.first - firstRow.first) / (last.count - firstRow.count);
  printTable({
    title: `Peak RSS of a backup process (objects of ${formatSize(objectSize)} in a directory store)`,
    columns: ['objects', 'first backup peak RSS MiB', 'first: bytes/object (marginal)', 'unchanged second peak RSS MiB', 'second: bytes/object (marginal)', 'first s', 'second s'],
    rows,
    notes: [
      `peak RSS = VmHWM of the node process (GNU time %M); paused mode with pre-copy, concurrency ${concurrency}; cluster directory and repository on ${flags.dir || 'the OS temp dir'}`,
      `marginal bytes/object: RSS growth from the previous row divided by the objects added; from ${firstRow.count} to ${last.count} objects the first backup grows ${fixed(slope, 0)} bytes per object, i.e. ${fixed((slope * 1e6) / 1024 ** 3, 2)} GiB per million objects`,
      ...machineNotes(),
    ],
  });
  if (limitRows.length > 0) {
    printTable({
      title: `Backups of ${largest} objects under a V8 heap limit (--max-old-space-size)`,
      columns: ['heap limit MiB', 'bytes/object allowed', 'first backup', 'unchanged second backup'],
      rows: limitRows,
      notes: ['the smallest limit that completes bounds the live heap a backup needs; peak RSS above also holds garbage not yet collected, code and buffers', ...machineNotes()],
    });
  }
} finally {
  await cluster?.stop().catch(() => undefined);
  await rm(work, { recursive: true, force: true });
}
