/**
 * A second backup of an unchanged cluster against the first: the first copies every object, the
 * second only lists, finds every object held, and dumps the databases again. Measured for a small
 * database (the fixture's, a few MiB) and a large one (about 200 MiB), because the dump is most of
 * what an unchanged backup still does. Peers in the same run: `rclone copy` and `aws s3 sync` of
 * the bucket into a backup bucket, first and again unchanged (objects only, no databases).
 *
 *   node dist/bench/incremental.js [--scale 1] [--database-mib 0,200]
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
  numberFlag,
  parseFlags,
  peerEnv,
  printTable,
  rcloneEnv,
  ratio,
  runPachbackup,
  scaled,
  startBenchCeph,
  workDir,
  type BenchCeph,
  type BenchCluster,
  type Cell,
} from './common.js';

const flags = parseFlags('incremental: an unchanged second backup vs the first', {
  scale: { default: '1', help: 'objects × this (1 = 20,000 objects)' },
  'object-size': { default: '16384', help: 'bytes per object' },
  'database-mib': { default: '0,200', help: 'pachyderm database sizes to measure at, MiB (0 = the fixture only); × scale' },
  concurrency: { default: '16', help: 'objects in flight' },
  mode: { default: 'paused', help: 'pachbackup mode: paused (with pre-copy) or online' },
});
const scale = numberFlag(flags.scale, 'scale');
const objects = scaled(20_000, scale, 10);
const objectSize = Math.round(numberFlag(flags['object-size'], 'object-size'));
const concurrency = Math.round(numberFlag(flags.concurrency, 'concurrency'));
const sizes = flags['database-mib'].split(',').map((s) => Math.round(Number(s) * scale));

const work = await workDir('pbbench-incremental-');
let ceph: BenchCeph | undefined;
let cluster: BenchCluster | undefined;
try {
  ceph = await startBenchCeph({ osdStore: 'memstore', capacityBytes: 12 * 1024 ** 3 });
  const s3 = ceph;
  log(`Ceph RGW at ${s3.endpoint}`);
  await s3.createBucket('pachyderm-bucket');
  cluster = await createBenchCluster({ store: { kind: 'ceph', ceph: s3, bucket: 'pachyderm-bucket' }, objects, objectSize, databaseMiB: 0 });
  const c = cluster;
  const rows: Cell[][] = [];
  const details: string[] = [];
  let seq = 0;

  for (const mib of sizes) {
    if (mib > 0) await c.growDatabase(mib);
    const databaseBytes = await c.databaseBytes();
    const repo = `repo-${++seq}`;
    await s3.createBucket(repo);
    try {
      const config = await c.writeConfig(join(work, `${repo}.yaml`), repo, { concurrency, mode: flags.mode });
      const runs: number[] = [];
      for (const label of ['first', 'second', 'third']) {
        const m = await runPachbackup(config, ['backup'], c.env);
        const r = m.result as { totalMs: number; downtimeMs: number | null; objects: { newCount: number; heldCount: number }; phases: Array<{ name: string; ms: number }> };
        runs.push(r.totalMs);
        const line = `${formatSize(databaseBytes)} db, ${label} backup: total ${fixed(r.totalMs / 1000, 1)} s, downtime ${r.downtimeMs === null ? 'none' : `${fixed(r.downtimeMs / 1000, 1)} s`}, ${r.objects.newCount} new / ${r.objects.heldCount} held objects, client CPU ${fixed(m.cpuSeconds, 1)} s; phases ${r.phases.map((p) => `${p.name} ${fixed(p.ms / 1000, 1)}`).join(', ')}`;
        log(line);
        if (label !== 'third') details.push(line);
        if (label !== 'first' && r.objects.newCount !== 0) throw new Error(`the ${label} backup of an unchanged cluster copied ${r.objects.newCount} objects`);
      }
      const unchanged = Math.min(runs[1]!, runs[2]!);
      rows.push([`pachbackup backup (${flags.mode}), ${formatSize(databaseBytes)} of database`, fixed(runs[0]! / 1000, 1), fixed(runs[1]! / 1000, 1), fixed(runs[2]! / 1000, 1), ratio(runs[0]!, unchanged)]);
    } finally {
      await s3.deleteBucket(repo);
    }
  }

  // Peers: objects only, into a backup bucket, then again with nothing changed.
  const awsVars = await awsEnv(work, s3, concurrency);
  const peers: Array<{ name: string; run: (target: string) => { command: string; args: string[]; env: NodeJS.ProcessEnv } }> = [
    {
      name: 'rclone copy (objects only)',
      run: (target) => ({
        command: 'rclone',
        args: ['copy', 'ceph:pachyderm-bucket', `ceph:${target}`, '--transfers', String(concurrency), '--checkers', String(concurrency)],
        env: peerEnv(rcloneEnv(s3.endpoint, s3, ['ceph'], join(work, 'rclone.conf'))),
      }),
    },
    {
      name: 'aws s3 sync (objects only)',
      run: (target) => ({ command: AWS_CLI, args: ['--endpoint-url', s3.endpoint, 's3', 'sync', 's3://pachyderm-bucket', `s3://${target}`, '--only-show-errors'], env: peerEnv(awsVars) }),
    },
  ];
  for (const peer of peers) {
    const target = `peer-${++seq}`;
    await s3.createBucket(target);
    try {
      const runs: number[] = [];
      for (let i = 0; i < 3; i++) {
        const { command, args, env } = peer.run(target);
        const m = await measureCommand(command, args, { env });
        runs.push(m.wallMs);
        log(`${peer.name} run ${i + 1}: ${fixed(m.wallMs / 1000, 1)} s, client CPU ${fixed(m.cpuSeconds, 1)} s`);
      }
      rows.push([peer.name, fixed(runs[0]! / 1000, 1), fixed(runs[1]! / 1000, 1), fixed(runs[2]! / 1000, 1), ratio(runs[0]!, Math.min(runs[1]!, runs[2]!))]);
    } finally {
      await s3.deleteBucket(target);
    }
  }

  printTable({
    title: `Incremental: an unchanged cluster backed up again (${c.keys.length} objects × ${formatSize(objectSize)})`,
    columns: ['what', 'first s', 'second s', 'third s', 'first ÷ unchanged'],
    rows,
    notes: [
      `scale ${scale}; concurrency ${concurrency}; cluster bucket and repository on one Ceph RGW (memstore); pachbackup times are the summary's totalMs (preflight to seal), peers' are process wall time`,
      'first ÷ unchanged: the first run\'s time over the faster of the second and third',
      'an unchanged backup still dumps every database (phase dump: pg_dump at backup.dumpCompression, default 1, from the snapshot exported in the pause, after the resume unless pause.holdDuringDump), so its time grows with the database',
      ...details,
      ...machineNotes(),
    ],
  });
} finally {
  await cluster?.stop().catch(() => undefined);
  await ceph?.stop().catch(() => undefined);
  await rm(work, { recursive: true, force: true });
}
