/**
 * Object copy, S3 to S3 on one local Ceph RADOS Gateway: pachbackup's copy core
 * (copyMissingObjects into a fresh repository, streamed or server-side) against `rclone copy`
 * (streamed between two remotes, or server-side within one) and `aws s3 sync` (always
 * server-side), at equal concurrency. Sets: many small objects, few large ones, and the small set
 * again through a TCP proxy adding latency (a cloud link).
 *
 * Every contender runs as a child process measured by GNU time (client CPU includes its start-up),
 * into a fresh destination bucket that is deleted afterwards; rounds alternate the order.
 *
 *   node dist/bench/copy.js [--scale 1] [--concurrency 16] [--rounds 1] [--sets small,large,proxy]
 */
import { rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  AWS_CLI,
  awsEnv,
  fixed,
  formatSize,
  log,
  machineNotes,
  measureCommand,
  median,
  numberFlag,
  parseFlags,
  peerEnv,
  populateBucket,
  printTable,
  rcloneEnv,
  ratio,
  scaled,
  startBenchCeph,
  syntheticChunkKeys,
  workDir,
  type BenchCeph,
  type Cell,
} from './common.js';
import type { WorkerReport, WorkerSpec } from './copy-worker.js';
import { startLatencyProxy } from './latency-proxy.js';

/** pachbackup's contender: its copy core alone in a process (bench/copy-worker.ts). */
const WORKER = join(dirname(fileURLToPath(import.meta.url)), 'copy-worker.js');

type Path = 'stream' | 'server-side';
interface Contender {
  name: string;
  path: Path;
  /** Runs the copy of `source` into the (existing, empty) bucket `target` through `endpoint`. */
  command(endpoint: string, source: string, target: string): { command: string; args: string[]; env: NodeJS.ProcessEnv };
  /** Where the copies land in the target bucket. */
  prefix: string;
}

// ---- the benchmark
const flags = parseFlags('copy: object copy S3→S3 on one Ceph RGW, pachbackup vs rclone vs aws s3 sync', {
  scale: { default: '1', help: 'object counts × this (1 = 20,000 × 16 KiB and 200 × 8 MiB)' },
  'small-scale': { default: '', help: 'overrides --scale for the small and proxy sets' },
  'large-scale': { default: '', help: 'overrides --scale for the large set' },
  concurrency: { default: '16', help: 'objects in flight for every contender' },
  rounds: { default: '1', help: 'runs per contender per set (order alternates between rounds; medians reported)' },
  sets: { default: 'small,proxy,large', help: 'which sets: small, proxy (the small set through the latency proxy), large' },
  'delay-ms': { default: '20', help: 'latency the proxy adds per request round trip and per new connection' },
  'proxy-scale': { default: '1', help: 'object count of the proxy set relative to the small set' },
  'small-store': { default: 'memstore', help: 'OSD store for the small set: memstore or bluestore' },
  'large-store': { default: 'bluestore', help: 'OSD store for the large set (memstore holds ~2.5× the data in RAM)' },
  'worker-node-args': { default: '', help: 'extra node flags for the pachbackup workers, space-separated, e.g. --worker-node-args="--cpu-prof --cpu-prof-dir=/tmp/prof"' },
  contenders: { default: 'pachbackup-stream,rclone-stream,pachbackup-server-side,rclone-server-side,aws-s3-sync', help: 'contenders to run' },
});
const scale = numberFlag(flags.scale, 'scale');
const smallScale = flags['small-scale'] ? numberFlag(flags['small-scale'], 'small-scale') : scale;
const largeScale = flags['large-scale'] ? numberFlag(flags['large-scale'], 'large-scale') : scale;
const concurrency = Math.round(numberFlag(flags.concurrency, 'concurrency'));
const rounds = Math.round(numberFlag(flags.rounds, 'rounds'));
const sets = new Set(flags.sets.split(','));
const delayMs = numberFlag(flags['delay-ms'], 'delay-ms');
const work = await workDir('pbbench-copy-');

function contenders(ceph: BenchCeph, awsVars: Record<string, string>): Contender[] {
  const creds = { PBBENCH_S3_KEY: ceph.accessKeyId, PBBENCH_S3_SECRET: ceph.secretAccessKey };
  const rclone = (endpoint: string): Record<string, string> => rcloneEnv(endpoint, ceph, ['ceph', 'src', 'dst'], join(work, 'rclone.conf'));
  const pachbackup = (serverSide: boolean, serviceChecksums = true, extraEnv: Record<string, string> = {}): Contender['command'] => (endpoint, source, target) => ({
    command: process.execPath,
    args: [...flags['worker-node-args'].split(' ').filter(Boolean), WORKER, JSON.stringify({ endpoint, source, target, concurrency, serverSide, serviceChecksums } satisfies WorkerSpec)],
    env: { ...process.env, ...creds, ...extraEnv },
  });
  const all: Contender[] = [
    { name: 'pachbackup-stream', path: 'stream', prefix: 'objects/', command: pachbackup(false) },
    // backup.serviceChecksums: false, every byte hashed with SHA-256 here (the only mode before 0.3).
    { name: 'pachbackup-stream-sha256', path: 'stream', prefix: 'objects/', command: pachbackup(false, false) },
    // Object reads on Node's HTTP client instead of pachbackup's own sockets (the path before 0.3).
    { name: 'pachbackup-stream-node-http', path: 'stream', prefix: 'objects/', command: pachbackup(false, true, { PACHBACKUP_OBJECT_READS: 'node' }) },
    {
      name: 'rclone-stream',
      path: 'stream',
      prefix: '',
      // Two remotes with the same settings: rclone streams between them (no --server-side-across-configs).
      command: (endpoint, source, target) => ({
        command: 'rclone',
        args: ['copy', `src:${source}`, `dst:${target}`, '--transfers', String(concurrency), '--checkers', String(concurrency)],
        env: peerEnv(rclone(endpoint)),
      }),
    },
    { name: 'pachbackup-server-side', path: 'server-side', prefix: 'objects/', command: pachbackup(true) },
    { name: 'pachbackup-server-side-sha256', path: 'server-side', prefix: 'objects/', command: pachbackup(true, false) },
    {
      name: 'rclone-server-side',
      path: 'server-side',
      prefix: '',
      // One remote: rclone copies with CopyObject inside the service.
      command: (endpoint, source, target) => ({
        command: 'rclone',
        args: ['copy', `ceph:${source}`, `ceph:${target}`, '--transfers', String(concurrency), '--checkers', String(concurrency)],
        env: peerEnv(rclone(endpoint)),
      }),
    },
    {
      name: 'aws-s3-sync',
      path: 'server-side',
      prefix: '',
      // Bucket to bucket, the aws CLI always copies server-side.
      command: (endpoint, source, target) => ({
        command: AWS_CLI,
        args: ['--endpoint-url', endpoint, 's3', 'sync', `s3://${source}`, `s3://${target}`, '--only-show-errors'],
        env: peerEnv(awsVars),
      }),
    },
  ];
  const wanted = flags.contenders.split(',');
  return all.filter((c) => wanted.includes(c.name));
}

interface Run {
  wallMs: number;
  cpuSeconds: number;
  serverCpuSeconds: number;
  rssKiB: number;
  note?: string;
}

/** A source bucket with nothing in it, for each contender's fixed cost. */
const EMPTY_BUCKET = 'src-empty';

let bucketSeq = 0;
async function runOnce(ceph: BenchCeph, contender: Contender, endpoint: string, source: string, expected: { count: number; bytes: number }): Promise<Run> {
  const target = `dst-${contender.name}-${++bucketSeq}`;
  await ceph.createBucket(target);
  try {
    const { command, args, env } = contender.command(endpoint, source, target);
    const serverBefore = ceph.serverCpuSeconds();
    const m = await measureCommand(command, args, { env });
    const serverCpuSeconds = ceph.serverCpuSeconds() - serverBefore;
    const landed = await ceph.summarize(target, contender.prefix);
    if (landed.count !== expected.count || landed.bytes !== expected.bytes) {
      throw new Error(`${contender.name}: ${target} holds ${landed.count} objects / ${landed.bytes} bytes, expected ${expected.count} / ${expected.bytes}`);
    }
    let note: string | undefined;
    if (command === process.execPath) {
      const report = JSON.parse(m.stdout.trim().split('\n').pop() ?? '{}') as WorkerReport;
      const notes = [`${report.md5} MD5 checked by the service, ${report.copied - report.md5} SHA-256 here; ${(report.copyMs / 1000).toFixed(1)} s from start of the copy core to its end (${report.setupMs} ms of it opening the repository and listing), ${report.startMs} ms of start-up before it; ${report.majorGcs} full GCs`];
      if (contender.path === 'server-side' && report.serverSide !== expected.count) notes.push(`only ${report.serverSide} of ${expected.count} copied server-side`);
      note = notes.join('; ');
    }
    log(`  ${contender.name}${expected.count === 0 ? ' (empty bucket)' : ''}: ${(m.wallMs / 1000).toFixed(expected.count === 0 ? 2 : 1)} s wall, ${m.cpuSeconds.toFixed(1)} s client CPU, ${serverCpuSeconds.toFixed(1)} s server CPU${note ? ` (${note})` : ''}`);
    return { wallMs: m.wallMs, cpuSeconds: m.cpuSeconds, serverCpuSeconds, rssKiB: m.maxRssKiB, ...(note ? { note } : {}) };
  } finally {
    await ceph.deleteBucket(target);
  }
}

async function runSet(options: { ceph: BenchCeph; title: string; source: string; count: number; size: number; scale: number; endpoint: string; rounds: number; extraNotes: string[] }): Promise<void> {
  const { ceph, count, size } = options;
  const awsVars = await awsEnv(work, ceph, concurrency);
  const list = contenders(ceph, awsVars);
  const runs = new Map<string, Run[]>(list.map((c) => [c.name, []]));
  // Each contender's fixed cost: the same command on an empty bucket (process start-up, listing,
  // pachbackup's repository creation, exit). Wall time less this is the time spent copying, so
  // throughput is compared without the start-up that a longer copy amortizes.
  const fixedRuns = new Map<string, number[]>(list.map((c) => [c.name, []]));
  await ceph.createBucket(EMPTY_BUCKET).catch(() => undefined);
  for (let round = 0; round < options.rounds; round++) {
    const order = round % 2 === 0 ? list : [...list].reverse();
    log(`${options.title}: round ${round + 1}/${options.rounds}`);
    for (const c of order) {
      fixedRuns.get(c.name)!.push((await runOnce(ceph, c, options.endpoint, EMPTY_BUCKET, { count: 0, bytes: 0 })).wallMs);
      runs.get(c.name)!.push(await runOnce(ceph, c, options.endpoint, options.source, { count, bytes: count * size }));
    }
  }
  const wallOf = (name: string): number => median(runs.get(name)!.map((r) => r.wallMs));
  const fixedOf = (name: string): number => median(fixedRuns.get(name)!);
  const netOf = (name: string): number => wallOf(name) - fixedOf(name);
  const rows: Cell[][] = list.map((c) => {
    const r = runs.get(c.name)!;
    const wall = wallOf(c.name);
    const cpu = median(r.map((x) => x.cpuSeconds));
    const reference = c.path === 'stream' ? 'pachbackup-stream' : 'pachbackup-server-side';
    const refWall = runs.has(reference) ? wallOf(reference) : NaN;
    const net = netOf(c.name);
    const refNet = runs.has(reference) ? netOf(reference) : NaN;
    const spread = r.length > 1 ? ` (${fixed(Math.min(...r.map((x) => x.wallMs)) / 1000)}–${fixed(Math.max(...r.map((x) => x.wallMs)) / 1000)})` : '';
    return [
      c.name,
      c.path,
      fixed(count / (wall / 1000), 0),
      fixed((count * size) / 1e6 / (wall / 1000), 1),
      `${fixed(wall / 1000, 1)}${spread}`,
      fixed(cpu, 1),
      fixed((cpu * 1e6) / count, 0),
      fixed(median(r.map((x) => x.serverCpuSeconds)), 1),
      fixed(median(r.map((x) => x.rssKiB)) / 1024, 0),
      ratio(wall, refWall),
      fixed(fixedOf(c.name) / 1000, 2),
      fixed((count * size) / 1e6 / (net / 1000), 1),
      ratio(net, refNet),
      r.find((x) => x.note)?.note ?? '',
    ];
  });
  const table = {
    title: options.title,
    columns: ['contender', 'path', 'objects/s', 'MB/s', 'wall s', 'client CPU s', 'client CPU µs/object', 'server CPU s', 'client peak RSS MiB', 'time ÷ pachbackup (same path)', 'fixed cost s (empty bucket)', 'MB/s net of fixed cost', 'net time ÷ pachbackup', 'note'],
    rows,
    notes: [
      `${count} objects × ${formatSize(size)} (${formatSize(count * size)}), concurrency ${concurrency} for every contender, scale ${options.scale}, ${options.rounds} round(s), medians; Ceph OSD ${ceph.osdStore}`,
      ...options.extraNotes,
      'wall and client CPU include process start-up (node + AWS SDK, rclone, python); server CPU = radosgw + OSD + mon; MB = 10^6 bytes',
      'fixed cost = median wall time of the same command on an empty bucket, run in the same rounds (start-up, listing, pachbackup creating its repository, exit); net = wall − fixed cost, the time spent copying',
      ...machineNotes(),
    ],
  };
  printTable(table);
}

try {
  if (sets.has('small') || sets.has('proxy')) {
    const count = scaled(20_000, smallScale, 10);
    const size = 16 * 1024;
    const proxyCount = scaled(count, numberFlag(flags['proxy-scale'], 'proxy-scale'), 10);
    const osdStore = flags['small-store'] === 'bluestore' ? 'bluestore' : 'memstore';
    const ceph = await startBenchCeph({ osdStore, capacityBytes: 12 * 1024 ** 3 });
    try {
      log(`Ceph RGW at ${ceph.endpoint} (${osdStore})`);
      await ceph.createBucket('src-small');
      const keys = syntheticChunkKeys(Math.max(count, proxyCount), 'copy-small');
      await populateBucket(ceph, 'src-small', keys.slice(0, count), size);
      if (sets.has('small')) {
        await runSet({ ceph, title: `Object copy: ${count} × 16 KiB, S3→S3 on one Ceph RGW (loopback)`, source: 'src-small', count, size, scale: smallScale, endpoint: ceph.endpoint, rounds, extraNotes: [] });
      }
      if (sets.has('proxy')) {
        let source = 'src-small';
        if (proxyCount !== count) {
          source = 'src-proxy';
          await ceph.createBucket(source);
          await populateBucket(ceph, source, keys.slice(0, proxyCount), size);
        }
        const [host, port] = new URL(ceph.endpoint).host.split(':');
        const proxy = await startLatencyProxy({ targetHost: host!, targetPort: Number(port), delayMs });
        try {
          await runSet({
            ceph,
            title: `Object copy through a +${delayMs} ms latency proxy: ${proxyCount} × 16 KiB`,
            source,
            count: proxyCount,
            size,
            scale: (smallScale * proxyCount) / count,
            endpoint: proxy.endpoint,
            rounds: 1,
            extraNotes: [`every client→server chunk and every new connection delayed ${delayMs} ms (bench/latency-proxy.ts); bandwidth not limited`],
          });
        } finally {
          await proxy.stop();
        }
      }
    } finally {
      await ceph.stop();
    }
  }
  if (sets.has('large')) {
    const count = scaled(200, largeScale, 4);
    const size = 8 * 1024 * 1024;
    const osdStore = flags['large-store'] === 'memstore' ? 'memstore' : 'bluestore';
    const ceph = await startBenchCeph({ osdStore, capacityBytes: (osdStore === 'memstore' ? 12 : 40) * 1024 ** 3 });
    try {
      log(`Ceph RGW at ${ceph.endpoint} (${osdStore})`);
      await ceph.createBucket('src-large');
      await populateBucket(ceph, 'src-large', syntheticChunkKeys(count, 'copy-large'), size, 8);
      await runSet({ ceph, title: `Object copy: ${count} × 8 MiB, S3→S3 on one Ceph RGW (loopback)`, source: 'src-large', count, size, scale: largeScale, endpoint: ceph.endpoint, rounds, extraNotes: [] });
    } finally {
      await ceph.stop();
    }
  }
} finally {
  await rm(work, { recursive: true, force: true });
}
