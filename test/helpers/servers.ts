/**
 * Real servers for integration tests: s3rver (an in-process fake S3, always available) and Ceph's
 * RADOS Gateway (a production S3, when the Debian packages are installed). Both listen on
 * 127.0.0.1 on free ports with their state in a temp directory, so test files can run in parallel.
 */
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CreateBucketCommand, S3Client, type S3ClientConfig } from '@aws-sdk/client-s3';
import { findFreePort } from '../../src/demo/localPostgres.js';

export interface S3TestServer {
  readonly kind: 's3rver' | 'ceph-rgw';
  /** e.g. `http://127.0.0.1:41234` */
  readonly endpoint: string;
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  readonly region: string;
  /**
   * Settings for an `S3Client` that works against this server: path-style addressing, and no
   * aws-chunked trailing checksums, which neither server understands.
   */
  readonly clientConfig: S3ClientConfig;
  createBucket(name: string): Promise<void>;
  /**
   * Ceph only: a second key of the same user that may only read (a subuser with `--access=read`):
   * real read-only credentials, refused every write with 403 AccessDenied.
   */
  readOnlyKey?(): Promise<{ accessKeyId: string; secretAccessKey: string }>;
  stop(): Promise<void>;
}

/** Creates a temp directory, runs `fn` in it, and removes the directory afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>, prefix = 'pachbackup-test-'): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

// s3rver ships no type declarations; this is the part of its API used here.
interface S3rverInstance {
  run(): Promise<{ address: string; port: number }>;
  close(): Promise<void>;
}
type S3rverConstructor = new (options: {
  address: string;
  port: number;
  directory: string;
  silent: boolean;
  resetOnClose: boolean;
}) => S3rverInstance;

/** s3rver accepts any bucket name and only this key pair (its built-in dummy account). */
const S3RVER_CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' };

export async function startS3rver(): Promise<S3TestServer> {
  const S3rver = createRequire(import.meta.url)('s3rver') as S3rverConstructor;
  const directory = await mkdtemp(join(tmpdir(), 'pachbackup-s3rver-'));
  const server = new S3rver({ address: '127.0.0.1', port: 0, directory, silent: true, resetOnClose: false });
  let address: { port: number };
  try {
    address = await server.run();
  } catch (err) {
    await rm(directory, { recursive: true, force: true });
    throw err;
  }
  let stopped: Promise<void> | undefined;
  return makeServer('s3rver', `http://127.0.0.1:${address.port}`, S3RVER_CREDENTIALS, () => {
    stopped ??= server.close().finally(() => rm(directory, { recursive: true, force: true }));
    return stopped;
  });
}

const CEPH_COMMANDS = ['ceph-mon', 'ceph-osd', 'radosgw', 'radosgw-admin', 'ceph', 'monmaptool'];
const CEPH_INSTALL_HINT = 'apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd';

/** Why Ceph RGW tests cannot run here, or undefined when they can. Usable as `test(..., { skip })`. */
export function cephRgwSkipReason(): string | undefined {
  const missing = CEPH_COMMANDS.filter((command) => findOnPath(command) === undefined);
  if (missing.length > 0) return `Ceph RGW not installed (missing ${missing.join(', ')}): ${CEPH_INSTALL_HINT}`;
  if (findRepoScript('start.sh') === undefined) return 'scripts/ceph-rgw/start.sh not found above this test file';
  return undefined;
}

/**
 * Starts a single-node Ceph with radosgw through the repo's `scripts/ceph-rgw/start.sh`, on
 * free ports under a fresh temp directory. Resolves to a skip reason (a string) when Ceph is not
 * installed, so a test can `t.skip(reason)`.
 */
export async function startCephRgw(): Promise<S3TestServer | string> {
  const skip = cephRgwSkipReason();
  if (skip !== undefined) return skip;
  const startScript = findRepoScript('start.sh') as string;
  const stopScript = findRepoScript('stop.sh') as string;

  let lastError: unknown;
  // A port found free can be taken before the daemons bind it; one more try with new ports.
  for (let attempt = 1; attempt <= 2; attempt++) {
    const rgwDir = await mkdtemp(join(tmpdir(), 'pachbackup-rgw-'));
    const credentials = {
      accessKeyId: randomBytes(10).toString('hex').toUpperCase(),
      secretAccessKey: randomBytes(20).toString('hex'),
    };
    const rgwPort = await findFreePort();
    const env = {
      ...process.env,
      PATH: withSbin(process.env['PATH']),
      RGW_DIR: rgwDir,
      RGW_PORT: String(rgwPort),
      MON_PORT: String(await findFreePort()),
      OSD_PORT_MIN: String(await findOsdPortRange()),
      ACCESS_KEY: credentials.accessKeyId,
      SECRET_KEY: credentials.secretAccessKey,
    };
    const stopEnv = { ...process.env, RGW_DIR: rgwDir, STOP_GRACE: '0.5' };
    const stopSync = (): void => {
      try {
        execFileSync('bash', [stopScript], { env: stopEnv, stdio: 'ignore' });
      } catch {
        // The process is exiting; nothing else can be done.
      }
    };
    // Daemonized ceph processes outlive us: make sure a crashed test file does not leak them.
    process.on('exit', stopSync);
    try {
      await runScript(startScript, env, 120_000);
    } catch (err) {
      lastError = err;
      await runScript(stopScript, stopEnv, 30_000).catch(() => undefined);
      process.off('exit', stopSync);
      continue;
    }
    let stopped: Promise<void> | undefined;
    const server = makeServer('ceph-rgw', `http://127.0.0.1:${rgwPort}`, credentials, () => {
      stopped ??= runScript(stopScript, stopEnv, 30_000).then(() => {
        process.off('exit', stopSync);
      });
      return stopped;
    });
    return {
      ...server,
      async readOnlyKey() {
        const key = { accessKeyId: randomBytes(10).toString('hex').toUpperCase(), secretAccessKey: randomBytes(20).toString('hex') };
        // start.sh creates the user "test"; its subuser "test:ro" gets a key of its own.
        execFileSync('radosgw-admin', ['-c', join(rgwDir, 'ceph.conf'), 'subuser', 'create', '--uid=test', '--subuser=test:ro', '--access=read', '--key-type=s3', `--access-key=${key.accessKeyId}`, `--secret-key=${key.secretAccessKey}`], {
          env: { ...process.env, PATH: withSbin(process.env['PATH']) },
          stdio: 'ignore',
        });
        return key;
      },
    };
  }
  throw lastError;
}

function makeServer(
  kind: S3TestServer['kind'],
  endpoint: string,
  credentials: { accessKeyId: string; secretAccessKey: string },
  stop: () => Promise<void>,
): S3TestServer {
  const region = 'us-east-1';
  const clientConfig: S3ClientConfig = {
    endpoint,
    region,
    credentials,
    forcePathStyle: true,
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  };
  return {
    kind,
    endpoint,
    region,
    ...credentials,
    clientConfig,
    async createBucket(name: string): Promise<void> {
      const client = new S3Client(clientConfig);
      try {
        await client.send(new CreateBucketCommand({ Bucket: name }));
      } finally {
        client.destroy();
      }
    },
    stop,
  };
}

/**
 * The OSD binds a few ports anywhere in [min, min+99]. A random block below the kernel's
 * ephemeral range keeps it clear of outgoing connections; the first ports are checked free.
 */
async function findOsdPortRange(): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const min = 20_000 + 100 * Math.floor(Math.random() * 120);
    if ((await isPortFree(min)) && (await isPortFree(min + 1)) && (await isPortFree(min + 2)) && (await isPortFree(min + 3))) {
      return min;
    }
  }
  throw new Error('no free port range for the Ceph OSD between 20000 and 32000');
}

function isPortFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

function runScript(script: string, env: NodeJS.ProcessEnv, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('bash', [script], { env, timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err === null) {
        resolve(stdout);
        return;
      }
      const output = [stderr.trim(), stdout.trim()].filter((s) => s.length > 0).join('\n');
      reject(new Error(`${script} failed (${err.killed ? `killed after ${timeoutMs} ms` : `exit code ${String(err.code)}`}):\n${output}`, { cause: err }));
    });
  });
}

/** Looks for `scripts/ceph-rgw/<name>` in the directories above this file (source or dist). */
function findRepoScript(name: string): string | undefined {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, 'scripts', 'ceph-rgw', name);
    if (existsSync(candidate)) return candidate;
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

// Debian puts some daemons in sbin, which a non-root PATH may lack.
function withSbin(path: string | undefined): string {
  return [...(path ?? '').split(delimiter).filter((dir) => dir !== ''), '/usr/sbin', '/sbin', '/usr/bin', '/bin'].join(delimiter);
}

function findOnPath(command: string): string | undefined {
  for (const dir of withSbin(process.env['PATH']).split(delimiter)) {
    const path = join(dir, command);
    if (existsSync(path)) return path;
  }
  return undefined;
}
