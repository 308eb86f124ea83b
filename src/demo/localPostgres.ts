/**
 * A throw-away PostgreSQL server for the demo and the tests: a fresh data directory under the OS
 * temp dir, password (scram-sha-256) auth on 127.0.0.1 and on a unix socket inside that directory,
 * a free port, and `stop()` that shuts it down and deletes everything.
 *
 * PostgreSQL refuses to run as root, so as root every server binary runs as the `postgres` OS
 * user (created by Debian's postgresql packages) through `runuser`; otherwise as the current user.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { access, appendFile, chmod, chown, copyFile, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';

export interface LocalPostgresOptions {
  /** Superuser password; random when omitted. */
  password?: string;
  /** Superuser name; default `pbadmin`. */
  user?: string;
  /** TCP port on 127.0.0.1; a free one is picked when omitted. */
  port?: number;
  /** Serve TLS with this certificate and key (PEM files; copied into the data directory). */
  ssl?: { certFile: string; keyFile: string };
  /** Extra `postgresql.conf` settings, applied last (so they override the defaults here). */
  extraConf?: Record<string, string>;
  /** Directory holding `initdb`, `pg_ctl`, `postgres`; default `findPostgresBinDir()`. */
  binDir?: string;
}

export interface QueryResultRows<R> {
  rows: R[];
  rowCount: number;
}

export interface LocalPostgres {
  readonly host: '127.0.0.1';
  readonly port: number;
  readonly user: string;
  readonly password: string;
  /** The cluster's data directory (inside `baseDir`). */
  readonly dataDir: string;
  /** The temp directory holding data, log and unix socket; removed by `stop()`. */
  readonly baseDir: string;
  /** Directory of the unix socket (`host` for libpq when connecting over the socket). */
  readonly socketDir: string;
  /** The server binaries used; client tools of the same major version live here too. */
  readonly binDir: string;
  /** Server major version, e.g. 15. */
  readonly majorVersion: number;
  readonly logFile: string;
  /** Runs one statement over a pooled connection to `database` as the superuser. */
  query<R extends Record<string, unknown> = Record<string, unknown>>(
    database: string,
    sql: string,
    params?: readonly unknown[],
  ): Promise<QueryResultRows<R>>;
  /** Creates the database unless it already exists. */
  createDatabase(name: string): Promise<void>;
  /** A libpq URL for `database` (default `postgres`). It contains the password. */
  connectionString(database?: string): string;
  /** libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE) for pg_dump/psql. */
  clientEnv(database?: string): Record<string, string>;
  /** Fast shutdown, then removes `baseDir`. Safe to call more than once. */
  stop(): Promise<void>;
}

const POSTGRES_ROOT = '/usr/lib/postgresql';
const INSTALL_HINT = 'install postgresql-15: apt-get install postgresql-15';
const READY_TIMEOUT_MS = 30_000;
const START_ATTEMPTS = 5;

/** Finds `/usr/lib/postgresql/<highest major>/bin` (Debian's layout) or throws saying what to install. */
export async function findPostgresBinDir(): Promise<string> {
  let entries: string[];
  try {
    entries = await readdir(POSTGRES_ROOT);
  } catch {
    throw new Error(`PostgreSQL server binaries not found (no ${POSTGRES_ROOT}): ${INSTALL_HINT}`);
  }
  const majors = entries
    .filter((name) => /^\d+$/.test(name))
    .map(Number)
    .sort((a, b) => b - a);
  for (const major of majors) {
    const binDir = join(POSTGRES_ROOT, String(major), 'bin');
    if ((await isExecutable(join(binDir, 'initdb'))) && (await isExecutable(join(binDir, 'pg_ctl')))) {
      return binDir;
    }
  }
  throw new Error(`PostgreSQL server binaries (initdb, pg_ctl) not found under ${POSTGRES_ROOT}/*/bin: ${INSTALL_HINT}`);
}

/**
 * Returns a TCP port on 127.0.0.1 that was free a moment ago. Another process can still take it
 * before the caller binds, so callers retry on "address in use".
 */
export async function findFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolve(port) : reject(new Error('could not determine a free port'))));
    });
  });
}

export async function startLocalPostgres(options: LocalPostgresOptions = {}): Promise<LocalPostgres> {
  const binDir = options.binDir ?? (await findPostgresBinDir());
  const runAs = await serverUser();
  const user = options.user ?? 'pbadmin';
  const password = options.password ?? randomBytes(18).toString('base64url');

  const baseDir = await mkdtemp(join(tmpdir(), 'pachbackup-pg-'));
  const dataDir = join(baseDir, 'data');
  const logFile = join(baseDir, 'server.log');
  const server = new ServerProcess(binDir, runAs, baseDir, dataDir, logFile);
  try {
    if (runAs.ids !== undefined) {
      await chown(baseDir, runAs.ids.uid, runAs.ids.gid);
      await server.checkDirectoryAccess();
    }
    await server.initdb(user, password);
    const majorVersion = Number((await readFile(join(dataDir, 'PG_VERSION'), 'utf8')).trim());
    await server.prepareConf(options.ssl);

    const port = await startOnFreePort(server, options);
    const instance = new RunningPostgres(server, { port, user, password, majorVersion, ssl: options.ssl !== undefined });
    await instance.waitUntilAcceptingLogins();
    return instance;
  } catch (err) {
    await server.destroy();
    throw err;
  }
}

interface ServerUser {
  /** Command prefix that runs a binary as the server's OS user; empty when that is us. */
  prefix: string[];
  /** Set when files must be handed over to another OS user. */
  ids?: { uid: number; gid: number };
}

async function serverUser(): Promise<ServerUser> {
  if (process.getuid?.() !== 0) return { prefix: [] };
  let uid: number;
  let gid: number;
  try {
    uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim());
    gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim());
  } catch {
    throw new Error(`running as root, but there is no "postgres" OS user to run the server as: ${INSTALL_HINT}`);
  }
  if (await isExecutable('/usr/sbin/runuser')) return { prefix: ['/usr/sbin/runuser', '-u', 'postgres', '--'], ids: { uid, gid } };
  if (await isExecutable('/sbin/runuser')) return { prefix: ['/sbin/runuser', '-u', 'postgres', '--'], ids: { uid, gid } };
  // su only takes a shell command; "$0" "$@" passes the arguments through without re-parsing them.
  return { prefix: ['su', 'postgres', '-s', '/bin/sh', '-c', 'exec "$0" "$@"', '--'], ids: { uid, gid } };
}

async function startOnFreePort(server: ServerProcess, options: LocalPostgresOptions): Promise<number> {
  let lastError: unknown;
  for (let attempt = 1; attempt <= START_ATTEMPTS; attempt++) {
    const port = options.port ?? (await findFreePort());
    await server.writeRuntimeConf(port, options.extraConf ?? {});
    try {
      await server.start();
      return port;
    } catch (err) {
      lastError = err;
      // Only a lost race for the port is worth another try; a fixed port cannot change.
      if (options.port !== undefined || !(await server.logShowsPortInUse())) throw err;
    }
  }
  throw lastError;
}

/** The server's files and its lifecycle commands; knows nothing about SQL. */
class ServerProcess {
  private readonly confFile: string;
  private sslSettings: Record<string, string> = {};
  /** Where the current start attempt's part of the (appended-to) server log begins. */
  private logOffset = 0;

  constructor(
    readonly binDir: string,
    private readonly runAs: ServerUser,
    readonly baseDir: string,
    readonly dataDir: string,
    readonly logFile: string,
  ) {
    this.confFile = join(dataDir, 'pachbackup.conf');
  }

  async checkDirectoryAccess(): Promise<void> {
    try {
      await this.run('test', ['-w', this.baseDir]);
    } catch {
      throw new Error(
        `the postgres OS user cannot write ${this.baseDir}; a parent directory is probably not ` +
          `traversable by it. Set TMPDIR to a directory such as /tmp.`,
      );
    }
  }

  async initdb(user: string, password: string): Promise<void> {
    // initdb reads the password from a file so that it never appears in a process listing.
    const pwFile = join(this.baseDir, 'initdb.pw');
    await writeFile(pwFile, password + '\n', { mode: 0o600 });
    try {
      await this.handOver(pwFile);
      await this.run(join(this.binDir, 'initdb'), [
        '--pgdata', this.dataDir,
        '--username', user,
        `--pwfile=${pwFile}`,
        '--auth-host=scram-sha-256',
        '--auth-local=scram-sha-256',
        '--encoding=UTF8',
        '--locale=C',
        '--no-sync',
        '--no-instructions',
      ]);
    } finally {
      await rm(pwFile, { force: true });
    }
  }

  /** Copies the TLS files in and points postgresql.conf at our own settings file. */
  async prepareConf(ssl: LocalPostgresOptions['ssl']): Promise<void> {
    if (ssl !== undefined) {
      const certFile = join(this.dataDir, 'server.crt');
      const keyFile = join(this.dataDir, 'server.key');
      await copyFile(ssl.certFile, certFile);
      await copyFile(ssl.keyFile, keyFile);
      // The server refuses a key readable by others or owned by someone else.
      await chmod(keyFile, 0o600);
      await this.handOver(certFile);
      await this.handOver(keyFile);
      this.sslSettings = { ssl: 'on', ssl_cert_file: certFile, ssl_key_file: keyFile };
    }
    await appendFile(
      join(this.dataDir, 'postgresql.conf'),
      `\n# The throw-away pachbackup server's settings live in their own file, rewritten per start.\ninclude '${quoteConf(this.confFile)}'\n`,
    );
  }

  async writeRuntimeConf(port: number, extraConf: Record<string, string>): Promise<void> {
    const settings: Record<string, string> = {
      port: String(port),
      listen_addresses: '127.0.0.1',
      unix_socket_directories: this.baseDir,
      // A throw-away server: surviving an OS crash is worthless, speed is not.
      fsync: 'off',
      synchronous_commit: 'off',
      full_page_writes: 'off',
      logging_collector: 'off',
      ...this.sslSettings,
      ...extraConf,
    };
    await writeFile(this.confFile, renderConf(settings), { mode: 0o644 });
    await this.handOver(this.confFile);
  }

  async start(): Promise<void> {
    this.logOffset = await fileSize(this.logFile);
    try {
      await this.run(join(this.binDir, 'pg_ctl'), [
        'start', '--pgdata', this.dataDir, '--log', this.logFile, '--wait', '--timeout', String(READY_TIMEOUT_MS / 1000),
      ]);
    } catch (err) {
      throw new Error(`${errorMessage(err)}\n--- server log (tail) ---\n${await this.logTail()}`, { cause: err });
    }
  }

  async logShowsPortInUse(): Promise<boolean> {
    return /could not bind|Address already in use|could not create any TCP\/IP sockets/i.test(await this.logTail());
  }

  async stop(): Promise<void> {
    await this.run(join(this.binDir, 'pg_ctl'), ['stop', '--pgdata', this.dataDir, '--mode', 'fast', '--wait']);
  }

  /** Stops the server if it runs and removes every file; never throws for a server already gone. */
  async destroy(): Promise<void> {
    let stopError: unknown;
    if (await exists(join(this.dataDir, 'postmaster.pid'))) {
      try {
        await this.stop();
      } catch (err) {
        stopError = err;
      }
    }
    await rm(this.baseDir, { recursive: true, force: true });
    if (stopError !== undefined) throw stopError;
  }

  /** Synchronous last resort for process exit, when no promise can be awaited. */
  destroySync(): void {
    try {
      execFileSync(...this.command(join(this.binDir, 'pg_ctl'), ['stop', '--pgdata', this.dataDir, '--mode', 'immediate', '--wait']), {
        stdio: 'ignore',
        cwd: this.baseDir,
      });
    } catch {
      // Removing the data directory below also makes a surviving postmaster shut itself down.
    }
    try {
      execFileSync('rm', ['-rf', this.baseDir], { stdio: 'ignore' });
    } catch {
      // Nothing else can be done while the process exits.
    }
  }

  async logTail(): Promise<string> {
    try {
      const log = (await readFile(this.logFile)).subarray(this.logOffset).toString('utf8');
      return log.trimEnd().split('\n').slice(-30).join('\n');
    } catch {
      return '(no server log)';
    }
  }

  private async handOver(path: string): Promise<void> {
    if (this.runAs.ids !== undefined) await chown(path, this.runAs.ids.uid, this.runAs.ids.gid);
  }

  private command(file: string, args: string[]): [string, string[]] {
    const [head, ...rest] = [...this.runAs.prefix, file, ...args];
    return [head ?? file, rest];
  }

  private run(file: string, args: string[]): Promise<string> {
    // cwd inside our own directory: the server user often cannot enter the caller's cwd (/root).
    return runCommand(...this.command(file, args), this.baseDir);
  }
}

interface RunningState {
  port: number;
  user: string;
  password: string;
  majorVersion: number;
  ssl: boolean;
}

class RunningPostgres implements LocalPostgres {
  readonly host = '127.0.0.1' as const;
  readonly port: number;
  readonly user: string;
  readonly password: string;
  readonly majorVersion: number;
  private readonly pools = new Map<string, pg.Pool>();
  private stopped: Promise<void> | undefined;

  constructor(
    private readonly server: ServerProcess,
    private readonly state: RunningState,
  ) {
    this.port = state.port;
    this.user = state.user;
    this.password = state.password;
    this.majorVersion = state.majorVersion;
    liveServers.add(server);
    ensureExitHook();
  }

  get dataDir(): string {
    return this.server.dataDir;
  }
  get baseDir(): string {
    return this.server.baseDir;
  }
  get socketDir(): string {
    return this.server.baseDir;
  }
  get binDir(): string {
    return this.server.binDir;
  }
  get logFile(): string {
    return this.server.logFile;
  }

  async waitUntilAcceptingLogins(): Promise<void> {
    // pg_ctl --wait only proves the postmaster answers; a login proves auth and the password work.
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      const client = new pg.Client(this.clientConfig('postgres'));
      try {
        await client.connect();
        await client.query('SELECT 1');
        return;
      } catch (err) {
        if (Date.now() > deadline || isAuthFailure(err)) {
          throw new Error(`PostgreSQL on port ${this.port} does not accept logins: ${errorMessage(err)}\n--- server log (tail) ---\n${await this.server.logTail()}`, { cause: err });
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
      } finally {
        await client.end().catch(() => undefined);
      }
    }
  }

  async query<R extends Record<string, unknown> = Record<string, unknown>>(
    database: string,
    sql: string,
    params: readonly unknown[] = [],
  ): Promise<QueryResultRows<R>> {
    if (this.stopped !== undefined) throw new Error('the local PostgreSQL server has been stopped');
    const result = await this.pool(database).query<R>(sql, [...params]);
    return { rows: result.rows, rowCount: result.rowCount ?? 0 };
  }

  async createDatabase(name: string): Promise<void> {
    const existing = await this.query('postgres', 'SELECT 1 FROM pg_database WHERE datname = $1', [name]);
    if (existing.rowCount > 0) return;
    await this.query('postgres', `CREATE DATABASE ${quoteIdentifier(name)}`);
  }

  connectionString(database = 'postgres'): string {
    const credentials = `${encodeURIComponent(this.user)}:${encodeURIComponent(this.password)}`;
    const sslmode = this.state.ssl ? '?sslmode=require' : '';
    return `postgresql://${credentials}@${this.host}:${this.port}/${encodeURIComponent(database)}${sslmode}`;
  }

  clientEnv(database = 'postgres'): Record<string, string> {
    return {
      PGHOST: this.host,
      PGPORT: String(this.port),
      PGUSER: this.user,
      PGPASSWORD: this.password,
      PGDATABASE: database,
      ...(this.state.ssl ? { PGSSLMODE: 'require' } : {}),
    };
  }

  stop(): Promise<void> {
    this.stopped ??= this.shutDown();
    return this.stopped;
  }

  private async shutDown(): Promise<void> {
    // Pools first: a fast shutdown kills their idle connections, which pg reports as errors.
    await Promise.all([...this.pools.values()].map((pool) => pool.end().catch(() => undefined)));
    this.pools.clear();
    try {
      await this.server.destroy();
    } finally {
      liveServers.delete(this.server);
    }
  }

  private pool(database: string): pg.Pool {
    let pool = this.pools.get(database);
    if (pool === undefined) {
      pool = new pg.Pool({ ...this.clientConfig(database), max: 4 });
      // An idle connection dropped by the server must not crash the process.
      pool.on('error', () => undefined);
      this.pools.set(database, pool);
    }
    return pool;
  }

  private clientConfig(database: string): pg.ClientConfig {
    return {
      host: this.host,
      port: this.port,
      user: this.user,
      password: this.password,
      database,
      // Our own throw-away certificate: encryption is what is being exercised, not trust.
      ...(this.state.ssl ? { ssl: { rejectUnauthorized: false } } : {}),
    };
  }
}

/** Servers not yet stopped; killed synchronously if the process exits without stopping them. */
const liveServers = new Set<ServerProcess>();
let exitHookInstalled = false;

function ensureExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const server of liveServers) server.destroySync();
  });
}

function runCommand(file: string, args: string[], cwd: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
    child.on('error', (err) => reject(new Error(`cannot run ${file}: ${err.message}`, { cause: err })));
    child.on('close', (code, signal) => {
      const out = Buffer.concat(stdout).toString('utf8');
      if (code === 0) {
        resolve(out);
        return;
      }
      const err = Buffer.concat(stderr).toString('utf8').trim();
      const status = signal !== null ? `killed by ${signal}` : `exit code ${code}`;
      reject(new Error(`${[file, ...args].join(' ')} failed (${status})${err || out ? `:\n${err || out.trim()}` : ''}`));
    });
  });
}

function renderConf(settings: Record<string, string>): string {
  return Object.entries(settings)
    .map(([name, value]) => `${name} = '${quoteConf(value)}'\n`)
    .join('');
}

function quoteConf(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/'/g, "''");
}

function quoteIdentifier(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

function isAuthFailure(err: unknown): boolean {
  // 28P01 invalid_password, 28000 invalid_authorization_specification: retrying cannot help.
  const code = typeof err === 'object' && err !== null && 'code' in err ? (err as { code: unknown }).code : undefined;
  return code === '28P01' || code === '28000';
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

async function isExecutable(path: string): Promise<boolean> {
  try {
    await access(path, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

async function fileSize(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch {
    return 0;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}
