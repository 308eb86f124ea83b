/**
 * Shared machinery of the benchmarks: a throw-away Ceph RADOS Gateway, fast bucket population,
 * a Pachyderm-shaped cluster (PostgreSQL + bucket) sized on demand, running a child process while
 * measuring its wall time and CPU seconds, and printing aligned tables.
 *
 * Every benchmark measures all its contenders in the same run, on the same servers, so a machine
 * busy with other work slows all of them alike and the ratios stay meaningful.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { Agent as HttpAgent } from 'node:http';
import { createServer } from 'node:net';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import {
  CreateBucketCommand,
  DeleteBucketCommand,
  DeleteObjectsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { stringify } from 'yaml';
import { findFreePort, startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import { createPachydermFixture } from '../src/demo/pachydermFixture.js';
import { FsObjectStore } from '../src/objectstore/fs.js';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

/** The repository root, for scripts/ceph-rgw: above this file (bench/ or dist/bench/), else the working directory. */
export const REPO_ROOT = findRepoRoot();
/** The compiled CLI next to this compiled file, run as a child like an operator would run it. */
export const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'src', 'cli', 'main.js');

function findRepoRoot(): string {
  const starts = [dirname(fileURLToPath(import.meta.url)), process.cwd()];
  for (const start of starts) {
    for (let dir = start; ; dir = dirname(dir)) {
      if (existsSync(join(dir, 'scripts', 'ceph-rgw', 'start.sh'))) return dir;
      if (dirname(dir) === dir) break;
    }
  }
  throw new Error('cannot find scripts/ceph-rgw/start.sh above the benchmark or the working directory; run from the repository');
}

// ---------------------------------------------------------------- flags

export interface FlagSpec {
  [name: string]: { default: string; help: string };
}

/** Parses `--name value` flags; `--help` prints them with their defaults and exits. */
export function parseFlags<S extends FlagSpec>(usage: string, spec: S, argv = process.argv.slice(2)): { [K in keyof S]: string } {
  const options: Record<string, { type: 'string' | 'boolean' }> = { help: { type: 'boolean' } };
  for (const name of Object.keys(spec)) options[name] = { type: 'string' };
  const { values } = parseArgs({ args: argv, options, strict: true, allowPositionals: false });
  if (values['help']) {
    const width = Math.max(...Object.keys(spec).map((n) => n.length));
    process.stdout.write(`${usage}\n\n${Object.entries(spec).map(([n, s]) => `  --${n.padEnd(width)}  ${s.help}${s.default === '' ? '' : ` (default ${s.default})`}`).join('\n')}\n`);
    process.exit(0);
  }
  const out: Record<string, string> = {};
  for (const [name, s] of Object.entries(spec)) out[name] = (values[name] as string | undefined) ?? s.default;
  return out as { [K in keyof S]: string };
}

export function numberFlag(value: string, name: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number, got "${value}"`);
  return n;
}

/** Scales a count, never below `min`. */
export function scaled(count: number, scale: number, min = 1): number {
  return Math.max(min, Math.round(count * scale));
}

// ---------------------------------------------------------------- tables

export type Cell = string | number;

export interface Table {
  title: string;
  columns: string[];
  rows: Cell[][];
  notes?: string[];
}

/** A Markdown table with aligned columns (numbers right-aligned), readable as printed and pasteable. */
export function formatTable(table: Table): string {
  const text = table.rows.map((row) => row.map((cell) => String(cell)));
  const numeric = table.columns.map((_, i) => table.rows.every((row) => typeof row[i] === 'number' || /^[-+]?[\d.,]+( ?[×x%s])?$|^—$/.test(String(row[i] ?? ''))));
  const widths = table.columns.map((c, i) => Math.max(c.length, 3, ...text.map((row) => (row[i] ?? '').length)));
  const line = (cells: string[]): string => `| ${cells.map((c, i) => (numeric[i] ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (numeric[i] ? `${'-'.repeat(w + 1)}:` : `${'-'.repeat(w + 2)}`)).join('|')}|`;
  const out = [`### ${table.title}`, '', line(table.columns), rule, ...text.map(line)];
  if (table.notes && table.notes.length > 0) out.push('', ...table.notes.map((n) => `- ${n}`));
  return `${out.join('\n')}\n`;
}

export function printTable(table: Table): void {
  process.stdout.write(`\n${formatTable(table)}\n`);
}

/** Fixed decimals, for table cells. */
export function fixed(n: number, digits = 1): string {
  return Number.isFinite(n) ? n.toFixed(digits) : '—';
}

export function ratio(n: number, d: number): string {
  return d > 0 && Number.isFinite(n / d) ? `${(n / d).toFixed(2)}×` : '—';
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  if (sorted.length === 0) return NaN;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** One contender of a benchmark: its name in the table, and one timed run. */
export interface Contender<Outcome, Arg = number> {
  name: string;
  run(arg: Arg): Promise<Outcome>;
}

/**
 * Runs every contender once per round, the order alternating between rounds (A B C, then C B A)
 * so that a machine getting busier or quieter does not favour one; returns the outcomes by name.
 */
export async function alternatingRounds<C extends { name: string }, O>(contenders: C[], rounds: number, runOne: (contender: C, round: number) => Promise<O>): Promise<Map<string, O[]>> {
  const outcomes = new Map<string, O[]>(contenders.map((c) => [c.name, []]));
  for (let round = 1; round <= rounds; round++) {
    for (const contender of round % 2 === 1 ? contenders : [...contenders].reverse()) outcomes.get(contender.name)!.push(await runOne(contender, round));
  }
  return outcomes;
}

export function log(message: string): void {
  process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

/** Date, machine, load and tool versions, printed under every benchmark's table (call it when printing). */
export function machineNotes(): string[] {
  const version = (cmd: string, args: string[]): string => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8', env: peerEnv(), stdio: ['ignore', 'pipe', 'pipe'] }).split('\n')[0]!.trim();
    } catch {
      return 'not installed';
    }
  };
  const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  return [
    `date ${new Date().toISOString()}; ${cpus().length} × ${cpus()[0]?.model.trim() ?? 'unknown CPU'}, ${(totalmem() / 1024 ** 3).toFixed(0)} GiB RAM; load average (1/5/15 min) when printed ${load}`,
    `node ${process.version}; ${version('radosgw', ['--version'])}; ${version('rclone', ['version'])}; ${version(AWS_CLI, ['--version'])}; ${version(join(pgBinDir(), 'pg_dump'), ['--version'])}`,
  ];
}

// ---------------------------------------------------------------- peers

/** Debian's aws-cli (v2); a pyenv shim earlier on PATH may hold another version. */
export const AWS_CLI = existsSync('/usr/bin/aws') ? '/usr/bin/aws' : 'aws';

/**
 * The environment for rclone and the aws CLI: this machine's AWS_CA_BUNDLE makes both fail on a
 * plain-http endpoint, so it is removed for them only. `extra` is added on top.
 */
export function peerEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env['AWS_CA_BUNDLE'];
  delete env['AWS_PROFILE'];
  delete env['AWS_ENDPOINT_URL'];
  return { ...env, ...extra };
}

/** rclone remotes configured by environment (`RCLONE_CONFIG_<NAME>_*`), all pointing at `endpoint`. */
export function rcloneEnv(endpoint: string, creds: S3Credentials, remotes: string[], configFile: string): Record<string, string> {
  const env: Record<string, string> = { RCLONE_CONFIG: configFile };
  for (const remote of remotes) {
    const p = `RCLONE_CONFIG_${remote.toUpperCase()}_`;
    Object.assign(env, {
      [`${p}TYPE`]: 's3',
      [`${p}PROVIDER`]: 'Ceph',
      [`${p}ENDPOINT`]: endpoint,
      [`${p}ACCESS_KEY_ID`]: creds.accessKeyId,
      [`${p}SECRET_ACCESS_KEY`]: creds.secretAccessKey,
      [`${p}REGION`]: creds.region,
    });
  }
  return env;
}

/** An aws CLI config file with the s3 transfer concurrency set, and the environment that uses it. */
export async function awsEnv(dir: string, creds: S3Credentials, concurrency: number): Promise<Record<string, string>> {
  const file = join(dir, 'aws-config');
  await writeFile(file, `[default]\nregion = ${creds.region}\ns3 =\n  max_concurrent_requests = ${concurrency}\n  max_queue_size = 10000\n`);
  const empty = join(dir, 'aws-credentials-empty');
  await writeFile(empty, '');
  return {
    AWS_CONFIG_FILE: file,
    AWS_SHARED_CREDENTIALS_FILE: empty,
    AWS_ACCESS_KEY_ID: creds.accessKeyId,
    AWS_SECRET_ACCESS_KEY: creds.secretAccessKey,
    AWS_DEFAULT_REGION: creds.region,
    AWS_PAGER: '',
  };
}

// ---------------------------------------------------------------- measuring a child

export interface Measured {
  wallMs: number;
  /** User + system CPU seconds of the child and the children it waited for (GNU time). */
  cpuSeconds: number;
  /** Peak resident set of the child process itself, KiB (GNU time %M, i.e. VmHWM). */
  maxRssKiB: number;
  stdout: string;
  stderr: string;
}

const GNU_TIME = '/usr/bin/time';

/**
 * Runs `command args` under GNU time and returns wall time (measured here), CPU seconds and peak
 * RSS (from GNU time). Fails with the child's stderr when it exits non-zero.
 */
export async function measureCommand(command: string, args: string[], options: { env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<Measured> {
  if (!existsSync(GNU_TIME)) throw new Error(`${GNU_TIME} not found: apt-get install -y time`);
  const out = join(await mkdtemp(join(tmpdir(), 'pbbench-time-')), 'time.txt');
  const started = performance.now();
  const { stdout, stderr, code } = await new Promise<{ stdout: string; stderr: string; code: number | null }>((resolve, reject) => {
    const child = spawn(GNU_TIME, ['-f', '%e %U %S %M', '-o', out, command, ...args], { env: options.env ?? process.env, cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const so: Buffer[] = [];
    const se: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => so.push(b));
    child.stderr.on('data', (b: Buffer) => se.push(b));
    child.on('error', reject);
    child.on('close', (c) => resolve({ stdout: Buffer.concat(so).toString('utf8'), stderr: Buffer.concat(se).toString('utf8'), code: c }));
  });
  const wallMs = performance.now() - started;
  const timing = await readFile(out, 'utf8').finally(() => rm(dirname(out), { recursive: true, force: true }));
  if (code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${code}:\n${stderr.slice(-4000)}\n${stdout.slice(-2000)}\n${timing}`);
  const fields = timing.trim().split('\n').pop()!.split(' ').map(Number);
  const [, user, sys, rss] = fields;
  return { wallMs, cpuSeconds: (user ?? NaN) + (sys ?? NaN), maxRssKiB: rss ?? NaN, stdout, stderr };
}

/** Runs `node <CLI> --json ... args` and returns the measurement and its `result` event. */
export async function runPachbackup(configFile: string, args: string[], env: NodeJS.ProcessEnv): Promise<Measured & { result: Record<string, unknown> }> {
  const measured = await measureCommand(process.execPath, [CLI, '--config', configFile, '--json', '--yes', ...args], { env });
  const events = measured.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  const result = events.find((e) => e['type'] === 'result');
  if (!result) throw new Error(`pachbackup ${args.join(' ')} printed no result:\n${measured.stdout.slice(-3000)}\n${measured.stderr.slice(-3000)}`);
  return { ...measured, result };
}

// ---------------------------------------------------------------- Ceph

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
}

export interface BenchCeph extends S3Credentials {
  endpoint: string;
  osdStore: 'memstore' | 'bluestore';
  client: S3Client;
  createBucket(name: string): Promise<void>;
  /** Deletes every object, then the bucket, then lets radosgw collect the deleted tails. */
  deleteBucket(name: string): Promise<void>;
  summarize(bucket: string, prefix?: string): Promise<{ count: number; bytes: number }>;
  /** CPU seconds used so far by radosgw, the OSD and the monitor together. */
  serverCpuSeconds(): number;
  stop(): Promise<void>;
}

/**
 * Starts Ceph (mon, OSD, radosgw) with the repository's scripts/ceph-rgw/start.sh on free ports.
 * memstore keeps data in the OSD's RAM (~2.5× the payload); bluestore writes a sparse file.
 */
export async function startBenchCeph(options: { osdStore: 'memstore' | 'bluestore'; capacityBytes: number }): Promise<BenchCeph> {
  const script = join(REPO_ROOT, 'scripts', 'ceph-rgw', 'start.sh');
  const stopScript = join(REPO_ROOT, 'scripts', 'ceph-rgw', 'stop.sh');
  const missing = ['radosgw', 'ceph-mon', 'ceph-osd'].filter((c) => !['/usr/bin', '/usr/sbin', '/bin'].some((d) => existsSync(join(d, c))));
  if (missing.length > 0) throw new Error(`Ceph is not installed (missing ${missing.join(', ')}): apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd`);
  const dir = await mkdtemp(join(tmpdir(), 'pbbench-rgw-'));
  const creds = { accessKeyId: randomBytes(10).toString('hex').toUpperCase(), secretAccessKey: randomBytes(20).toString('hex'), region: 'us-east-1' };
  const rgwPort = await findFreePort();
  const env = {
    ...process.env,
    PATH: `${process.env['PATH'] ?? ''}:/usr/sbin:/sbin`,
    RGW_DIR: dir,
    RGW_PORT: String(rgwPort),
    MON_PORT: String(await findFreePort()),
    OSD_PORT_MIN: String(await freePortBlock()),
    OSD_STORE: options.osdStore,
    OSD_MEM_BYTES: String(options.capacityBytes),
    OSD_BLOCK_BYTES: String(options.capacityBytes),
    ACCESS_KEY: creds.accessKeyId,
    SECRET_KEY: creds.secretAccessKey,
  };
  const stopEnv = { ...process.env, RGW_DIR: dir, STOP_GRACE: '1' };
  const stopSync = (): void => {
    try {
      execFileSync('bash', [stopScript], { env: stopEnv, stdio: 'ignore' });
    } catch {
      // exiting anyway
    }
  };
  process.on('exit', stopSync);
  await new Promise<void>((resolve, reject) =>
    execFile('bash', [script], { env, timeout: 180_000 }, (err, _stdout, stderr) => (err ? reject(new Error(`ceph start failed: ${stderr}`)) : resolve())),
  ).catch((err: unknown) => {
    stopSync();
    throw err;
  });
  const pids = ['mon.a', 'osd.0', 'client.rgw.a'].map((n) => Number(readFileSync(join(dir, 'run', `${n}.pid`), 'utf8').trim()));
  const endpoint = `http://127.0.0.1:${rgwPort}`;
  const client = s3Client(endpoint, creds, 64);
  const conf = join(dir, 'ceph.conf');
  return {
    ...creds,
    endpoint,
    osdStore: options.osdStore,
    client,
    async createBucket(name) {
      await client.send(new CreateBucketCommand({ Bucket: name }));
    },
    async deleteBucket(name) {
      const keys: string[] = [];
      let token: string | undefined;
      do {
        const page = await client.send(new ListObjectsV2Command({ Bucket: name, ContinuationToken: token }));
        for (const o of page.Contents ?? []) if (o.Key) keys.push(o.Key);
        token = page.IsTruncated ? page.NextContinuationToken : undefined;
      } while (token);
      const batches: string[][] = [];
      for (let i = 0; i < keys.length; i += 1000) batches.push(keys.slice(i, i + 1000));
      await forEachLimit(batches, 4, async (batch) => {
        await client.send(new DeleteObjectsCommand({ Bucket: name, Delete: { Objects: batch.map((Key) => ({ Key })), Quiet: true } }));
      });
      await client.send(new DeleteBucketCommand({ Bucket: name }));
      // Deleted tails (data beyond an object's first 4 MiB) wait for radosgw's GC: free them now.
      await new Promise<void>((resolve) => execFile('radosgw-admin', ['-c', conf, 'gc', 'process', '--include-all'], { timeout: 300_000 }, () => resolve()));
    },
    async summarize(bucket, prefix) {
      let count = 0;
      let bytes = 0;
      let token: string | undefined;
      do {
        const page = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }));
        for (const o of page.Contents ?? []) {
          count++;
          bytes += o.Size ?? 0;
        }
        token = page.IsTruncated ? page.NextContinuationToken : undefined;
      } while (token);
      return { count, bytes };
    },
    serverCpuSeconds() {
      let ticks = 0;
      for (const pid of pids) {
        try {
          // Fields after the command name: state is 3rd, utime 14th, stime 15th (1-based, whole line).
          const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
          const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
          ticks += Number(rest[11]) + Number(rest[12]);
        } catch {
          // a daemon gone: nothing to add
        }
      }
      return ticks / 100;
    },
    async stop() {
      client.destroy();
      await new Promise<void>((resolve) => execFile('bash', [stopScript], { env: stopEnv, timeout: 60_000 }, () => resolve()));
      process.off('exit', stopSync);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** The OSD binds ports anywhere in [min, min+99]: a random block below the ephemeral range. */
async function freePortBlock(): Promise<number> {
  const free = (port: number): Promise<boolean> =>
    new Promise((resolve) => {
      const server = createServer();
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
    });
  for (let attempt = 0; attempt < 50; attempt++) {
    const min = 20_000 + 100 * Math.floor(Math.random() * 120);
    if ((await free(min)) && (await free(min + 1)) && (await free(min + 2)) && (await free(min + 3))) return min;
  }
  throw new Error('no free port block for the Ceph OSD');
}

export function s3Client(endpoint: string, creds: S3Credentials, maxSockets: number): S3Client {
  return new S3Client({
    endpoint,
    region: creds.region,
    credentials: { accessKeyId: creds.accessKeyId, secretAccessKey: creds.secretAccessKey },
    forcePathStyle: true,
    // Ceph Pacific does not understand aws-chunked trailing checksums.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: 5,
    requestHandler: { httpAgent: new HttpAgent({ keepAlive: true, maxSockets }) },
  });
}

export async function forEachLimit<T>(items: readonly T[], limit: number, work: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        await work(items[i]!, i);
      }
    }),
  );
}

/**
 * Object bodies: one random buffer per size, with the object's index written into its first bytes
 * so that every object differs (no store could deduplicate them) without generating GBs of random.
 */
export function objectBody(index: number, size: number, base: Buffer): Buffer {
  const body = Buffer.allocUnsafe(size);
  base.copy(body, 0, 0, size);
  if (size >= 8) body.writeBigUInt64BE(BigInt(index), 0);
  return body;
}

/** Writes objects `keys[i]` of `size` bytes into a bucket with many PUTs in flight. */
export async function populateBucket(ceph: BenchCeph, bucket: string, keys: readonly string[], size: number, concurrency = 32): Promise<void> {
  const base = randomBytes(size);
  const client = s3Client(ceph.endpoint, ceph, concurrency);
  try {
    let done = 0;
    const started = performance.now();
    await forEachLimit(keys, concurrency, async (key, i) => {
      await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: objectBody(i, size, base), ContentLength: size }));
      if (++done % 5000 === 0) log(`  populated ${done}/${keys.length}`);
    });
    log(`populated s3://${bucket}: ${keys.length} × ${formatSize(size)} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } finally {
    client.destroy();
  }
}

/** Pachyderm-style chunk keys (`chunk/<sha256 hex>.<gen as 16 hex digits>`) for synthetic objects. */
export function syntheticChunkKeys(count: number, salt: string): string[] {
  const keys: string[] = [];
  for (let i = 0; i < count; i++) {
    const id = createHash('sha256').update(`${salt} ${i}`).digest('hex');
    keys.push(`chunk/${id}.${(i + 1).toString(16).padStart(16, '0')}`);
  }
  return keys;
}

export function formatSize(bytes: number): string {
  if (bytes >= 1024 ** 3) return `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
  if (bytes >= 1024 ** 2) return `${(bytes / 1024 ** 2).toFixed(bytes % 1024 ** 2 ? 1 : 0)} MiB`;
  if (bytes >= 1024) return `${(bytes / 1024).toFixed(bytes % 1024 ? 1 : 0)} KiB`;
  return `${bytes} B`;
}

// ---------------------------------------------------------------- a Pachyderm-shaped cluster

export function pgBinDir(): string {
  const root = '/usr/lib/postgresql';
  try {
    const majors = execFileSync('ls', [root], { encoding: 'utf8' }).split('\n').filter((n) => /^\d+$/.test(n)).map(Number).sort((a, b) => b - a);
    return join(root, String(majors[0] ?? 15), 'bin');
  } catch {
    return '/usr/bin';
  }
}

export type ClusterStore = { kind: 'ceph'; ceph: BenchCeph; bucket: string } | { kind: 'fs'; dir: string };

export interface BenchCluster {
  pg: LocalPostgres;
  store: ClusterStore;
  /** Chunk keys the `pachyderm` database references, all present in the store. */
  keys: string[];
  objectSize: number;
  /** Environment holding the secrets the configs reference, for pachbackup children. */
  env: NodeJS.ProcessEnv;
  /** pg_database_size of pachyderm + dex. */
  databaseBytes(): Promise<number>;
  /** Adds `count` chunk rows and their objects, as an unchanged cluster would have had them. */
  addObjects(count: number): Promise<void>;
  /** Grows the pachyderm database to about `mib` MiB with fileset rows. */
  growDatabase(mib: number): Promise<void>;
  /** Writes a pachbackup config with the repository at `repository` (a bucket name or a directory). */
  /** `backup` and `pause` are merged into the config's sections of those names. */
  writeConfig(file: string, repository: string, backup?: Record<string, unknown>, pause?: Record<string, unknown>): Promise<string>;
  stop(): Promise<void>;
}

/**
 * A cluster the benchmarks back up: the Pachyderm fixture's databases, `objects` chunk rows in
 * `storage.chunk_objects` (uploaded) with their objects in the store, and a bulk table of filesets
 * growing the pachyderm database to about `databaseMiB`.
 */
export async function createBenchCluster(options: { store: ClusterStore; objects: number; objectSize: number; databaseMiB: number }): Promise<BenchCluster> {
  const pg = await startLocalPostgres();
  try {
    log(`PostgreSQL ${pg.majorVersion} on 127.0.0.1:${pg.port}`);
    // The fixture's own chunks go to a scratch directory: the benchmark writes its objects itself.
    const scratch = await mkdtemp(join(tmpdir(), 'pbbench-fixture-'));
    await createPachydermFixture(pg, new FsObjectStore(scratch), { chunks: 0 });
    await rm(scratch, { recursive: true, force: true });
    const env: NodeJS.ProcessEnv = { ...process.env, PBBENCH_PGPASSWORD: pg.password };
    const store = options.store;
    if (store.kind === 'ceph') Object.assign(env, { PBBENCH_S3_KEY: store.ceph.accessKeyId, PBBENCH_S3_SECRET: store.ceph.secretAccessKey });
    const storeConfig = (where: string): Record<string, unknown> =>
      store.kind === 'ceph'
        ? {
            url: `s3://${where}`,
            endpoint: store.ceph.endpoint,
            region: store.ceph.region,
            forcePathStyle: true,
            accessKeyId: { env: 'PBBENCH_S3_KEY' },
            secretAccessKey: { env: 'PBBENCH_S3_SECRET' },
          }
        : { url: pathToFileURL(where).href };
    const keys: string[] = [];
    const cluster: BenchCluster = {
      pg,
      store,
      keys,
      objectSize: options.objectSize,
      env,
      async databaseBytes() {
        const sizes = await pg.query<{ bytes: string }>('postgres', "SELECT sum(pg_database_size(datname))::text AS bytes FROM pg_database WHERE datname IN ('pachyderm','dex')");
        return Number(sizes.rows[0]?.bytes ?? 0);
      },
      async addObjects(count) {
        const added = await insertChunkRows(pg, keys.length + 1, count, options.objectSize);
        if (store.kind === 'ceph') await populateBucket(store.ceph, store.bucket, added, options.objectSize);
        else await populateDirectory(store.dir, added, options.objectSize);
        keys.push(...added);
      },
      growDatabase: (mib) => growDatabase(pg, mib),
      async writeConfig(file, repository, backup = {}, pause = {}) {
        const config = {
          cluster: {
            postgres: { host: pg.host, port: pg.port, user: pg.user, password: { env: 'PBBENCH_PGPASSWORD' }, sslmode: 'disable', binDir: pg.binDir },
            databases: { pachyderm: 'pachyderm', dex: 'dex' },
            objectStore: storeConfig(store.kind === 'ceph' ? store.bucket : store.dir),
          },
          repository: storeConfig(repository),
          // The benchmark has no pachd: pausing and resuming are no-op commands, for every contender.
          pause: { strategy: 'command', command: { pause: ['true'], resume: ['true'], timeoutSeconds: 60 }, ...pause },
          backup: { concurrency: 16, ...backup },
        };
        await mkdir(dirname(file), { recursive: true });
        await writeFile(file, stringify(config));
        return file;
      },
      async stop() {
        await pg.stop();
      },
    };
    if (options.objects > 0) await cluster.addObjects(options.objects);
    await growDatabase(pg, options.databaseMiB);
    log(`databases pachyderm + dex: ${formatSize(await cluster.databaseBytes())}; ${keys.length} referenced objects of ${formatSize(options.objectSize)}`);
    return cluster;
  } catch (err) {
    await pg.stop().catch(() => undefined);
    throw err;
  }
}

/** Inserts `count` uploaded chunk rows (numbered from `first`) the way pachd leaves them; returns their object keys. */
async function insertChunkRows(pg: LocalPostgres, first: number, count: number, size: number): Promise<string[]> {
  const keys: string[] = [];
  const end = first + count - 1;
  for (let from = first; from <= end; from += 50_000) {
    const to = Math.min(end, from + 49_999);
    const rows = await pg.query<{ id: string; gen: string }>(
      'pachyderm',
      `INSERT INTO storage.chunk_objects (chunk_id, size, uploaded, date_uploaded)
       SELECT sha256(convert_to('pachbackup-bench chunk ' || i, 'UTF8')), $1, TRUE, now() FROM generate_series($2::int, $3::int) AS i
       RETURNING encode(chunk_id, 'hex') AS id, gen::text AS gen`,
      [size, from, to],
    );
    for (const r of rows.rows) keys.push(`chunk/${r.id}.${BigInt(r.gen).toString(16).padStart(16, '0')}`);
  }
  return keys;
}

export async function populateDirectory(dir: string, keys: readonly string[], size: number): Promise<void> {
  const base = randomBytes(size);
  const started = performance.now();
  const dirs = new Set(keys.map((k) => dirname(join(dir, k))));
  for (const d of dirs) await mkdir(d, { recursive: true });
  await forEachLimit(keys, 32, async (key, i) => {
    await writeFile(join(dir, key), objectBody(i, size, base));
  });
  log(`populated ${dir}: ${keys.length} × ${formatSize(size)} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

/**
 * Grows the pachyderm database to about `mib` MiB with fileset rows whose metadata looks like
 * Pachyderm's: ~1.1 KB of JSON-ish text around random hex ids (compresses about 2:1, like real
 * metadata, rather than not at all or 100:1).
 */
async function growDatabase(pg: LocalPostgres, mib: number): Promise<void> {
  const size = async (): Promise<number> => Number((await pg.query<{ b: string }>('postgres', "SELECT pg_database_size('pachyderm')::text AS b")).rows[0]?.b ?? 0);
  const started = performance.now();
  const existing = await pg.query<{ n: string }>('pachyderm', 'SELECT count(*)::text AS n FROM storage.filesets');
  const first = Number(existing.rows[0]?.n ?? 0) + 1;
  let next = first;
  while ((await size()) < mib * 1024 * 1024) {
    const batch = 10_000;
    await pg.query(
      'pachyderm',
      `INSERT INTO storage.filesets (id, metadata_pb)
       SELECT md5('pachbackup-bench fileset ' || i)::uuid,
              convert_to((SELECT string_agg('{"path":"/pfs/repo/' || md5(random()::text || j) || '","chunk":"' || md5(j || random()::text) || '"}', ',')
                          FROM generate_series(1, 12 + 0 * i) AS j), 'UTF8')
       FROM generate_series($1::int, $2::int) AS i`,
      [next, next + batch - 1],
    );
    next += batch;
  }
  if (next > first) {
    await pg.query('pachyderm', 'ANALYZE storage.filesets');
    log(`grew pachyderm by ${next - first} fileset rows to ${formatSize(await size())} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
}

/** A work directory removed at the end (also on Ctrl-C via the caller's finally). */
export async function workDir(prefix: string, base = tmpdir()): Promise<string> {
  return mkdtemp(join(base, prefix));
}
