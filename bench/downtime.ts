/**
 * Downtime of one cluster (about 200 MiB of database, 20,000 objects in a Ceph RGW bucket):
 *
 * - the manual runbook: pause, pg_dump both databases to files, copy the whole bucket to a backup
 *   bucket (`rclone copy`, or `aws s3 sync`), resume; the downtime is pause to resume;
 * - pachbackup paused with pre-copy (the default): downtime from its summary (pause start to
 *   resume); the cluster is resumed once the snapshot is exported and the objects are copied, and
 *   pg_dump then reads the exported snapshot while the cluster runs;
 * - the same with `pause.holdDuringDump: true`: pg_dump inside the pause (the order before 17087be);
 * - pachbackup paused without pre-copy: what the pre-copy saves;
 * - pachbackup online: no pause at all; its total time.
 *
 * Pausing and resuming are no-op commands for every contender (there is no pachd here), so the
 * downtime measured is what each procedure needs between the two. Every contender writes to a fresh
 * bucket, deleted afterwards.
 *
 *   node dist/bench/downtime.js [--scale 1] [--rounds 1] [--runbook-copy rclone]
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  AWS_CLI,
  awsEnv,
  createBenchCluster,
  fixed,
  formatSize,
  log,
  machineNotes,
  measureCommand,
  median,
  numberFlag,
  parseFlags,
  peerEnv,
  printTable,
  rcloneEnv,
  runPachbackup,
  scaled,
  startBenchCeph,
  workDir,
  type BenchCeph,
  type BenchCluster,
  type Cell,
  type Contender as BenchContender,
} from './common.js';

const flags = parseFlags('downtime: the manual runbook vs pachbackup paused (with and without pre-copy) vs online', {
  scale: { default: '1', help: 'objects and database size × this (1 = 20,000 objects, 200 MiB of database)' },
  'object-size': { default: '16384', help: 'bytes per object' },
  concurrency: { default: '16', help: 'objects in flight, for pachbackup and the runbook copy' },
  rounds: { default: '1', help: 'runs per contender (order alternates between rounds; medians reported)' },
  'runbook-copy': { default: 'rclone', help: 'the runbook copy tool: rclone (rclone copy within one remote) or aws (aws s3 sync)' },
  'dump-variants': { default: 'yes', help: 'also time pg_dump variants of the pachyderm database (what the dump phase could cost)' },
});
const scale = numberFlag(flags.scale, 'scale');
const objectSize = Math.round(numberFlag(flags['object-size'], 'object-size'));
const concurrency = Math.round(numberFlag(flags.concurrency, 'concurrency'));
const rounds = Math.round(numberFlag(flags.rounds, 'rounds'));
const objects = scaled(20_000, scale, 10);
const databaseMiB = Math.max(1, Math.round(200 * scale));

interface Outcome {
  downtimeMs: number | null;
  totalMs: number;
  /** Time spent dumping the databases (inside the pause or not, see dumpInPause), and copying objects inside the pause. */
  dumpMs: number;
  /** Whether the dump ran between pause and resume; null without a pause. */
  dumpInPause: boolean | null;
  objectsInPauseMs: number;
  clientCpuSeconds: number;
  detail: string;
}

type Contender = BenchContender<Outcome, string>;

const work = await workDir('pbbench-downtime-');
let ceph: BenchCeph | undefined;
let cluster: BenchCluster | undefined;
try {
  ceph = await startBenchCeph({ osdStore: 'memstore', capacityBytes: 12 * 1024 ** 3 });
  log(`Ceph RGW at ${ceph.endpoint}`);
  await ceph.createBucket('pachyderm-bucket');
  cluster = await createBenchCluster({ store: { kind: 'ceph', ceph, bucket: 'pachyderm-bucket' }, objects, objectSize, databaseMiB });
  const databaseBytes = await cluster.databaseBytes();
  const c = cluster;
  const s3 = ceph;
  const pgEnv = { ...process.env, PGHOST: c.pg.host, PGPORT: String(c.pg.port), PGUSER: c.pg.user, PGPASSWORD: c.pg.password };
  const pgDump = join(c.pg.binDir, 'pg_dump');
  const awsVars = await awsEnv(work, s3, concurrency);

  const runbook: Contender = {
    name: `runbook (pause, pg_dump ×2, ${flags['runbook-copy'] === 'aws' ? 'aws s3 sync' : 'rclone copy'}, resume)`,
    async run(target) {
      const started = performance.now();
      let cpu = 0;
      const step = async (command: string, args: string[], env: NodeJS.ProcessEnv): Promise<number> => {
        const m = await measureCommand(command, args, { env });
        cpu += m.cpuSeconds;
        return m.wallMs;
      };
      await step('true', [], process.env);
      const dumpStarted = performance.now();
      // As the runbook writes it: one database after the other, custom format, default compression.
      await step(pgDump, ['--format=custom', `--file=${join(work, `pachyderm-${target}.dump`)}`, '--dbname=pachyderm'], pgEnv);
      await step(pgDump, ['--format=custom', `--file=${join(work, `dex-${target}.dump`)}`, '--dbname=dex'], pgEnv);
      const dumpMs = performance.now() - dumpStarted;
      const copyMs =
        flags['runbook-copy'] === 'aws'
          ? await step(AWS_CLI, ['--endpoint-url', s3.endpoint, 's3', 'sync', 's3://pachyderm-bucket', `s3://${target}`, '--only-show-errors'], peerEnv(awsVars))
          : await step('rclone', ['copy', 'ceph:pachyderm-bucket', `ceph:${target}`, '--transfers', String(concurrency), '--checkers', String(concurrency)], peerEnv(rcloneEnv(s3.endpoint, s3, ['ceph'], join(work, 'rclone.conf'))));
      await step('true', [], process.env);
      const downtimeMs = performance.now() - started;
      const landed = await s3.summarize(target);
      if (landed.count !== c.keys.length) throw new Error(`runbook copy: ${landed.count} objects in ${target}, expected ${c.keys.length}`);
      await rm(join(work, `pachyderm-${target}.dump`), { force: true });
      await rm(join(work, `dex-${target}.dump`), { force: true });
      return { downtimeMs, totalMs: downtimeMs, dumpMs, dumpInPause: true, objectsInPauseMs: copyMs, clientCpuSeconds: cpu, detail: 'everything inside the pause' };
    },
  };

  const pachbackup = (name: string, args: string[], pause: Record<string, unknown> = {}): Contender => ({
    name,
    async run(target) {
      const config = await c.writeConfig(join(work, `${target}.yaml`), target, { concurrency }, pause);
      const m = await runPachbackup(config, ['backup', ...args], c.env);
      const r = m.result as { downtimeMs: number | null; totalMs: number; copyPath: string; phases: Array<{ name: string; ms: number }>; objects: { count: number; newCount: number } };
      if (r.objects.count !== c.keys.length) throw new Error(`${name}: backup holds ${r.objects.count} objects, expected ${c.keys.length}`);
      const phase = (n: string): number => r.phases.filter((p) => p.name === n).reduce((sum, p) => sum + p.ms, 0);
      // Phases are listed in the order they ran: the dump was inside the pause if it came before the resume.
      const resumeAt = r.phases.findIndex((p) => p.name === 'resume');
      const dumpAt = r.phases.findIndex((p) => p.name === 'dump');
      if (dumpAt < 0) throw new Error(`${name}: no dump phase in the summary (phases ${r.phases.map((p) => p.name).join(', ')})`);
      return {
        downtimeMs: r.downtimeMs,
        totalMs: r.totalMs,
        dumpMs: phase('dump'),
        dumpInPause: resumeAt < 0 ? null : dumpAt < resumeAt,
        objectsInPauseMs: r.downtimeMs === null ? 0 : phase('copy'),
        clientCpuSeconds: m.cpuSeconds,
        detail: `copy path ${r.copyPath}; phases ${r.phases.map((p) => `${p.name} ${fixed(p.ms / 1000, 1)}`).join(', ')}`,
      };
    },
  });

  const contenders: Contender[] = [
    runbook,
    pachbackup('pachbackup paused, pre-copy', ['--mode', 'paused']),
    pachbackup('pachbackup paused, pre-copy, dump held in the pause (pause.holdDuringDump)', ['--mode', 'paused'], { holdDuringDump: true }),
    pachbackup('pachbackup paused, no pre-copy', ['--mode', 'paused', '--no-precopy']),
    pachbackup('pachbackup online', ['--mode', 'online']),
  ];
  const outcomes = new Map<string, Outcome[]>(contenders.map((x) => [x.name, []]));
  let seq = 0;
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 === 0 ? contenders : [...contenders].reverse();
    for (const contender of order) {
      const target = `backup-${++seq}`;
      await s3.createBucket(target);
      try {
        log(`${contender.name} → s3://${target}`);
        const outcome = await contender.run(target);
        log(`  downtime ${outcome.downtimeMs === null ? 'none' : `${fixed(outcome.downtimeMs / 1000, 1)} s`}, total ${fixed(outcome.totalMs / 1000, 1)} s; ${outcome.detail}`);
        outcomes.get(contender.name)!.push(outcome);
      } finally {
        await s3.deleteBucket(target);
      }
    }
  }

  const med = (name: string, pick: (o: Outcome) => number): number => median(outcomes.get(name)!.map(pick));
  /** The contenders whose dumps ran inside the pause (true), after it (false), or without one (null), as measured. */
  const whereDumped = (inPause: boolean | null): string =>
    contenders.filter((x) => outcomes.get(x.name)!.some((o) => o.dumpInPause === inPause)).map((x) => x.name).join('; ') || 'none';
  const runbookDowntime = med(runbook.name, (o) => o.downtimeMs ?? 0);
  const rows: Cell[][] = contenders.map((x) => {
    const downtime = med(x.name, (o) => o.downtimeMs ?? NaN);
    return [
      x.name,
      Number.isNaN(downtime) ? 'none' : fixed(downtime / 1000, 1),
      Number.isNaN(downtime) ? '∞ (no pause)' : `${fixed(runbookDowntime / downtime, 1)}×`,
      fixed(med(x.name, (o) => o.dumpMs) / 1000, 1),
      Number.isNaN(downtime) ? '—' : fixed(med(x.name, (o) => o.objectsInPauseMs) / 1000, 1),
      fixed(med(x.name, (o) => o.totalMs) / 1000, 1),
      fixed(med(x.name, (o) => o.clientCpuSeconds), 1),
    ];
  });
  printTable({
    title: `Downtime: ${c.keys.length} objects × ${formatSize(objectSize)} + ${formatSize(databaseBytes)} of database`,
    columns: ['procedure', 'downtime s', 'runbook ÷ downtime', 'databases s', 'objects during pause s', 'total s', 'client CPU s'],
    rows,
    notes: [
      `scale ${scale}; concurrency ${concurrency}; ${rounds} round(s), medians; objects and repository buckets on one Ceph RGW (memstore), PostgreSQL ${c.pg.majorVersion} local`,
      'downtime s: pause to resume; for pachbackup the summary\'s downtimeMs (pause, snapshot, copy, [dump,] resume phases)',
      'databases s: the runbook\'s two pg_dump runs one after the other (default compression, as the runbook writes them); pachbackup\'s dump phase (both databases dumped in parallel from the snapshots exported in the pause, backup.dumpCompression: default 1, streamed into the repository)',
      `databases s inside the pause: ${whereDumped(true)}; after the resume, cluster running: ${whereDumped(false)}; no pause: ${whereDumped(null)}`,
      'objects during pause s: the runbook\'s full bucket copy; pachbackup\'s copy phase (the rest of the quiescence settle interval, the bucket listing that is the quiescence check\'s second, copy what changed since the pre-copy, check referenced keys)',
      ...[...outcomes.entries()].filter(([n]) => n !== runbook.name).map(([n, o]) => `${n}: ${o[0]?.detail ?? ''}`),
      ...machineNotes(),
    ],
  });

  if (flags['dump-variants'] === 'yes') {
    // What the dump phase could cost with other pg_dump settings (pachbackup: custom format, backup.dumpCompression, default 1).
    const variants: Array<{ name: string; args: (file: string) => string[] }> = [
      { name: 'custom format, default compression (what the runbook uses)', args: (f) => ['--format=custom', `--file=${f}`] },
      { name: 'custom format, --compress=1 (what pachbackup uses by default)', args: (f) => ['--format=custom', '--compress=1', `--file=${f}`] },
      { name: 'custom format, --compress=0', args: (f) => ['--format=custom', '--compress=0', `--file=${f}`] },
      { name: 'directory format, --jobs=2, default compression', args: (f) => ['--format=directory', '--jobs=2', `--file=${f}`] },
    ];
    const rowsDump: Cell[][] = [];
    for (const v of variants) {
      const file = join(work, 'variant.dump');
      const m = await measureCommand(pgDump, [...v.args(file), '--dbname=pachyderm'], { env: pgEnv });
      const du = await measureCommand('du', ['-sb', file]);
      rowsDump.push([v.name, fixed(m.wallMs / 1000, 1), fixed(m.cpuSeconds, 1), formatSize(Number(du.stdout.split('\t')[0]))]);
      await rm(file, { recursive: true, force: true });
    }
    printTable({
      title: `pg_dump of the pachyderm database (${formatSize(databaseBytes)}) to a local file`,
      columns: ['pg_dump settings', 'wall s', 'pg_dump CPU s', 'dump size'],
      rows: rowsDump,
      notes: ['pg_dump CPU excludes the server process; the directory format\'s jobs only help with several large tables (here one table holds most of the data)', ...machineNotes()],
    });
  }
} finally {
  await cluster?.stop().catch(() => undefined);
  await ceph?.stop().catch(() => undefined);
  await rm(work, { recursive: true, force: true });
}
