/**
 * Dump and restore time of a database of several large tables, by backup.dumpJobs / restore.jobs:
 *
 * - pachbackup with `backup.dumpJobs` 1 (one custom-format stream, the default), 2 and 4 (pg_dump
 *   --format=directory --jobs=N into $TMPDIR, then uploaded file by file), each restored with
 *   `restore.jobs` equal to its dumpJobs (pg_restore --jobs=N; 1: streamed, --single-transaction);
 * - the manual runbook as the peer: `pg_dump -Fc` of both databases to files, one after the other,
 *   and `pg_restore --single-transaction` of each (single-threaded, as a runbook does it).
 *
 * The pachyderm database gets `--tables` extra tables (bigint key, ~200 bytes of half-compressible
 * text, an integer, a secondary index) of equal size, `--mib` MiB in all; a handful of objects in a
 * directory bucket keep the object copy negligible. Everything runs as child processes on one
 * throw-away PostgreSQL server (restores go into new databases on the same server), so the machine's
 * load slows every contender alike; each is timed in the same run.
 *
 *   node dist/bench/dump.js [--mib 400] [--tables 4] [--jobs 1,2,4] [--rounds 1]
 */
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parse, stringify } from 'yaml';
import {
  alternatingRounds,
  createBenchCluster,
  fixed,
  formatSize,
  log,
  machineNotes,
  measureCommand,
  median,
  numberFlag,
  parseFlags,
  printTable,
  ratio,
  runPachbackup,
  workDir,
  type BenchCluster,
  type Cell,
  type Contender,
} from './common.js';

const flags = parseFlags('dump: pachbackup dump and restore time by backup.dumpJobs / restore.jobs, vs pg_dump -Fc / pg_restore', {
  mib: { default: '400', help: 'total size of the large tables in MiB (pg_total_relation_size, indexes included)' },
  tables: { default: '4', help: 'how many large tables share that size' },
  jobs: { default: '1,2,4', help: 'backup.dumpJobs values to run (restore.jobs is set to the same)' },
  rounds: { default: '1', help: 'runs per contender (order alternates between rounds; medians reported)' },
});
const mib = numberFlag(flags.mib, 'mib');
const tableCount = Math.round(numberFlag(flags.tables, 'tables'));
const rounds = Math.round(numberFlag(flags.rounds, 'rounds'));
const jobValues = flags.jobs.split(',').map((j) => Math.round(numberFlag(j.trim(), 'jobs')));

interface Outcome {
  /** Dump: the dump phase (pachbackup) or both pg_dump runs (runbook). */
  dumpMs: number;
  backupMs: number;
  dumpBytes: number;
  /** Restore: the pg_restore part (pachbackup's restore-databases phase; both pg_restore runs for the runbook). */
  restoreDbMs: number;
  restoreMs: number;
  cpuSeconds: number;
}

const work = await workDir('pbbench-dump-');
let cluster: BenchCluster | undefined;
try {
  cluster = await createBenchCluster({ store: { kind: 'fs', dir: join(work, 'bucket') }, objects: 20, objectSize: 4096, databaseMiB: 0 });
  const c = cluster;
  await buildTables(c, mib, tableCount);
  const env = c.env;
  const pgEnv = { ...process.env, PGPASSWORD: c.pg.password, PGHOST: c.pg.host, PGPORT: String(c.pg.port), PGUSER: c.pg.user };
  const binDir = c.pg.binDir;

  /** A pachbackup config with a fresh repository, dumpJobs and restore.jobs = jobs, restore into new databases. */
  async function configFor(name: string, jobs: number): Promise<{ file: string; repository: string; restored: string; databases: { pachyderm: string; dex: string } }> {
    const repository = join(work, `repo-${name}`);
    const restored = join(work, `restored-${name}`);
    await mkdir(repository, { recursive: true });
    await mkdir(restored, { recursive: true });
    const file = await c.writeConfig(join(work, `${name}.yaml`), repository, { dumpJobs: jobs });
    const raw = parse(await readFile(file, 'utf8')) as Record<string, any>;
    const databases = { pachyderm: `restored_${name}_pachyderm`, dex: `restored_${name}_dex` };
    raw.restore = { postgres: raw.cluster.postgres, databases, objectStore: { url: pathToFileURL(restored).href }, jobs };
    await writeFile(file, stringify(raw));
    return { file, repository, restored, databases };
  }

  async function dropDatabases(names: string[]): Promise<void> {
    for (const name of names) await c.pg.query('postgres', `DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
  }

  const contenders: Array<Contender<Outcome>> = jobValues.map((jobs) => ({
    name: `pachbackup dumpJobs ${jobs}, restore.jobs ${jobs}`,
    async run(round) {
      const name = `j${jobs}_r${round}`;
      const cfg = await configFor(name, jobs);
      try {
        const backup = await runPachbackup(cfg.file, ['backup'], env);
        const phases = backup.result['phases'] as Array<{ name: string; ms: number }>;
        const dbs = backup.result['databases'] as Array<{ bytes: number }>;
        const restore = await runPachbackup(cfg.file, ['restore', String(backup.result['id'])], env);
        const restorePhases = restore.result['phases'] as Array<{ name: string; ms: number }>;
        return {
          dumpMs: phases.find((p) => p.name === 'dump')?.ms ?? NaN,
          backupMs: backup.wallMs,
          dumpBytes: dbs.reduce((n, d) => n + d.bytes, 0),
          restoreDbMs: restorePhases.find((p) => p.name === 'restore-databases')?.ms ?? NaN,
          restoreMs: restore.wallMs,
          cpuSeconds: backup.cpuSeconds + restore.cpuSeconds,
        };
      } finally {
        await dropDatabases(Object.values(cfg.databases));
        await rm(cfg.repository, { recursive: true, force: true });
        await rm(cfg.restored, { recursive: true, force: true });
      }
    },
  }));
  contenders.push({
    name: 'runbook: pg_dump -Fc to files, pg_restore --single-transaction',
    async run(round) {
      const dir = join(work, `runbook-r${round}`);
      await rm(dir, { recursive: true, force: true });
      await mkdir(dir, { recursive: true });
      const targets = ['pachyderm', 'dex'].map((db) => ({ db, file: join(dir, `${db}.dump`), target: `restored_runbook_r${round}_${db}` }));
      try {
        let dumpMs = 0;
        let cpu = 0;
        for (const t of targets) {
          const m = await measureCommand(join(binDir, 'pg_dump'), ['-Fc', `--file=${t.file}`, `--dbname=${t.db}`], { env: pgEnv });
          dumpMs += m.wallMs;
          cpu += m.cpuSeconds;
        }
        let dumpBytes = 0;
        for (const t of targets) dumpBytes += (await stat(t.file)).size;
        let restoreMs = 0;
        for (const t of targets) {
          await c.pg.query('postgres', `CREATE DATABASE "${t.target}"`);
          const m = await measureCommand(join(binDir, 'pg_restore'), ['--single-transaction', '--exit-on-error', '--no-owner', '--no-acl', `--dbname=${t.target}`, t.file], { env: pgEnv });
          restoreMs += m.wallMs;
          cpu += m.cpuSeconds;
        }
        return { dumpMs, backupMs: dumpMs, dumpBytes, restoreDbMs: restoreMs, restoreMs, cpuSeconds: cpu };
      } finally {
        await dropDatabases(targets.map((t) => t.target));
        await rm(dir, { recursive: true, force: true });
      }
    },
  });

  const results = await alternatingRounds(contenders, rounds, async (contender, round) => {
    log(`round ${round}: ${contender.name}`);
    const outcome = await contender.run(round);
    log(`  dump ${fixed(outcome.dumpMs / 1000)} s, restore of the databases ${fixed(outcome.restoreDbMs / 1000)} s`);
    return outcome;
  });

  const med = (name: string, pick: (o: Outcome) => number): number => median(results.get(name)!.map(pick));
  const baseline = contenders[0]!.name;
  const rows: Cell[][] = contenders.map((k) => [
    k.name,
    fixed(med(k.name, (o) => o.dumpMs) / 1000),
    ratio(med(baseline, (o) => o.dumpMs), med(k.name, (o) => o.dumpMs)),
    fixed(med(k.name, (o) => o.backupMs) / 1000),
    formatSize(med(k.name, (o) => o.dumpBytes)),
    fixed(med(k.name, (o) => o.restoreDbMs) / 1000),
    ratio(med(baseline, (o) => o.restoreDbMs), med(k.name, (o) => o.restoreDbMs)),
    fixed(med(k.name, (o) => o.restoreMs) / 1000),
    fixed(med(k.name, (o) => o.cpuSeconds)),
  ]);
  printTable({
    title: `Dump and restore by dumpJobs / restore.jobs: ${tableCount} tables, ${formatSize(await tablesBytes(c))} (database ${formatSize(await c.databaseBytes())})`,
    columns: ['contender', 'dump s', 'dump speed-up', 'backup total s', 'dump size', 'pg_restore s', 'restore speed-up', 'restore total s', 'client CPU s'],
    rows,
    notes: [
      `${rounds} round(s), medians; speed-ups are against the first row (wall time of the first row over this row's)`,
      "dump s: pachbackup's dump phase (pg_dump of both databases at once, after the resume, upload included; directory dumps also wait for pg_dump to finish before uploading) or the runbook's two pg_dump runs",
      'backup total s: the whole pachbackup backup process (preflight, pause, copy of 20 small objects, dump, seal) or the runbook dumps alone',
      "pg_restore s: pachbackup's restore-databases phase (createdb + pg_restore of both; with jobs > 1 the download and check of the dump happens in preflight, counted in restore total s) or the runbook's two pg_restore runs",
      'pachbackup uses pg_dump --compress=1 (backup.dumpCompression default); the runbook uses pg_dump -Fc with its default compression (gzip level 6 in PostgreSQL 15), as a runbook would',
      'client CPU s: user + system CPU of the pachbackup processes or the pg_dump/pg_restore runs and their children (GNU time), not of the PostgreSQL server, which runs on the same 2 cores',
      ...machineNotes(),
    ],
  });
} finally {
  await cluster?.stop().catch(() => undefined);
  await rm(work, { recursive: true, force: true });
}

/** Fills `count` tables in the pachyderm database with about `totalMiB` MiB (indexes included). */
async function buildTables(c: BenchCluster, totalMiB: number, count: number): Promise<void> {
  const started = performance.now();
  const perTable = (totalMiB * 1024 * 1024) / count;
  for (let t = 1; t <= count; t++) {
    const table = `public.bench_large_${t}`;
    await c.pg.query('pachyderm', `CREATE TABLE ${table} (id bigint PRIMARY KEY, tag integer NOT NULL, body text NOT NULL)`);
    await c.pg.query('pachyderm', `CREATE INDEX ON ${table} (tag)`);
    let next = 1;
    const batch = 25_000;
    for (;;) {
      const { rows } = await c.pg.query<{ b: string }>('pachyderm', `SELECT pg_total_relation_size('${table}')::text AS b`);
      if (Number(rows[0]?.b ?? 0) >= perTable) break;
      // ~200 bytes a row: random hex (incompressible) around repeated words (compressible), about 2:1 in gzip.
      await c.pg.query(
        'pachyderm',
        `INSERT INTO ${table} SELECT i, (i * 7919) % 100000, md5(random()::text) || ' status=ready kind=fileset owner=pipeline-' || (i % 50) || ' ' || md5(i::text) || repeat(' pfs', 12) || md5(random()::text)
         FROM generate_series($1::bigint, $2::bigint) AS i`,
        [next, next + batch - 1],
      );
      next += batch;
    }
    await c.pg.query('pachyderm', `ANALYZE ${table}`);
  }
  log(`built ${count} tables of ${formatSize(perTable)} each in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

async function tablesBytes(c: BenchCluster): Promise<number> {
  const { rows } = await c.pg.query<{ b: string }>('pachyderm', "SELECT sum(pg_total_relation_size(c.oid))::text AS b FROM pg_class c WHERE c.relname LIKE 'bench_large_%' AND c.relkind = 'r'");
  return Number(rows[0]?.b ?? 0);
}
