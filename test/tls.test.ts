/**
 * Issue 6: TLS to PostgreSQL against a real server with a self-signed CA (made with the openssl
 * CLI). The server accepts only TLS connections (pg_hba `hostssl`), so every successful backup or
 * restore proves that the driver, pg_dump and pg_restore all used TLS. Then:
 * `sslmode=require` works; `verify-full` with the right CA works for backup and restore;
 * `verify-ca` skips the host name for the driver and pg_dump alike; a wrong CA and a host name
 * the certificate does not cover fail before anything is paused, with a message that says so.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, before, describe, test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { diffFingerprints, fingerprintDatabase } from '../src/demo/compare.js';
import { startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import { createPachydermFixture } from '../src/demo/pachydermFixture.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { describeRun, type CliResult } from './helpers/cluster.js';

const run = promisify(execFile);
const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const EXIT_FAILED = 1;
const PASSWORD_ENV = 'PBT_TLS_PGPASSWORD';

function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

async function opensslMissing(): Promise<string | undefined> {
  try {
    await run('openssl', ['version']);
    return undefined;
  } catch {
    return 'the openssl CLI is not installed (apt-get install openssl)';
  }
}

/** A CA, a server certificate it signed for 127.0.0.1 and localhost, and an unrelated second CA. */
async function makeCertificates(dir: string): Promise<{ ca: string; otherCa: string; cert: string; key: string }> {
  const openssl = (...args: string[]) => run('openssl', args, { cwd: dir });
  const ca = async (name: string, cn: string): Promise<void> => {
    await openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.crt`, '-days', '2', '-subj', `/CN=${cn}`,
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
  };
  await ca('ca', 'pachbackup test CA');
  await ca('other-ca', 'some other CA');
  await openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1');
  await writeFile(join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n');
  await openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'server.crt', '-days', '2', '-extfile', 'server.ext');
  return { ca: join(dir, 'ca.crt'), otherCa: join(dir, 'other-ca.crt'), cert: join(dir, 'server.crt'), key: join(dir, 'server.key') };
}

const skip = await opensslMissing();

describe('TLS to PostgreSQL with a self-signed CA', () => {
  let work: string;
  let pg: LocalPostgres;
  let certs: Awaited<ReturnType<typeof makeCertificates>>;
  let runs = 0;

  before(async () => {
    if (skip) return;
    work = await mkdtemp(join(tmpdir(), 'pachbackup-tls-'));
    certs = await makeCertificates(work);
    // Listening on 127.0.0.2 too gives an address the certificate does not name.
    pg = await startLocalPostgres({ ssl: { certFile: certs.cert, keyFile: certs.key }, extraConf: { listen_addresses: '127.0.0.1,127.0.0.2', log_connections: 'on' } });
    // TLS or nothing: a connection without TLS finds no pg_hba entry.
    const hba = join(pg.dataDir, 'pg_hba.conf');
    const lines = (await readFile(hba, 'utf8')).split('\n').filter((l) => !/^\s*host\s/.test(l));
    lines.push('hostssl all all 127.0.0.0/8 scram-sha-256', 'hostnossl all all 0.0.0.0/0 reject');
    await writeFile(hba, `${lines.join('\n')}\n`);
    await pg.query('postgres', 'SELECT pg_reload_conf()');
    const { rows } = await pg.query<{ ssl: boolean }>('postgres', 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()');
    assert.equal(rows[0]?.ssl, true, 'the test server speaks TLS');
    for (const dir of ['cluster-bucket', 'repository']) await mkdir(join(work, dir), { recursive: true });
    await createPachydermFixture(pg, new FsObjectStore(join(work, 'cluster-bucket')), { chunks: 8 });
  });
  after(async () => {
    await pg?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** A config for this server with the given TLS settings; restores go to new databases on the same server. */
  async function config(postgres: Record<string, unknown>, name: string, restore?: Record<string, unknown>): Promise<string> {
    const server = (overrides: Record<string, unknown>) => ({
      host: '127.0.0.1',
      port: pg.port,
      user: pg.user,
      password: { env: PASSWORD_ENV },
      binDir: pg.binDir,
      connectTimeoutSeconds: 10,
      ...overrides,
    });
    await mkdir(join(work, `restored-${name}`), { recursive: true });
    const raw = {
      cluster: { postgres: server(postgres), objectStore: { url: pathToFileURL(join(work, 'cluster-bucket')).href } },
      repository: { url: pathToFileURL(join(work, 'repository')).href },
      pause: { strategy: 'none' },
      restore: {
        postgres: server(restore ?? postgres),
        databases: { pachyderm: `pachyderm_${name}`, dex: `dex_${name}` },
        objectStore: { url: pathToFileURL(join(work, `restored-${name}`)).href },
      },
    };
    const file = join(work, `${name}.yaml`);
    await writeFile(file, stringify(raw));
    return file;
  }

  function cli(args: string[]): Promise<CliResult> {
    runs++;
    return new Promise((resolve, reject) => {
      const child = spawn(process.execPath, [CLI, ...args], { cwd: work, env: { ...process.env, [PASSWORD_ENV]: pg.password, CI: 'true' }, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
      child.on('error', reject);
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        const events = stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, any>);
        resolve({ code, signal, stdout, stderr, events, result: events.find((e) => e.type === 'result') });
      });
    });
  }

  /** Lines the server logged for pachbackup's connections (log_connections), from `from` on. */
  async function pachbackupConnections(from: number): Promise<string[]> {
    const log = (await readFile(pg.logFile)).subarray(from).toString('utf8');
    return log.split('\n').filter((l) => /connection authorized: .*application_name=pachbackup/.test(l));
  }
  async function logSize(): Promise<number> {
    return (await readFile(pg.logFile)).length;
  }

  test('sslmode=require: backup works, every connection (driver and pg_dump) encrypted', { skip, timeout: 300_000 }, async (t) => {
    const from = await logSize();
    const backup = await cli(['--config', await config({ sslmode: 'require' }, 'require'), '--json', '--yes', 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    const connections = await pachbackupConnections(from);
    assert.ok(connections.length >= 4, `the driver and pg_dump connected (${connections.length} connections logged)`);
    for (const line of connections) assert.match(line, /SSL enabled/, line);
    record(t, { category: 'TLS', fault: 'sslmode=require against a TLS-only server', runs: 1, detail: `backup sealed; ${connections.length} connections, all TLS` });
  });

  test('sslmode=verify-full with the right CA: backup and restore work (pg_dump and pg_restore verify too), data equal', { skip, timeout: 300_000 }, async (t) => {
    const file = await config({ sslmode: 'verify-full', sslrootcert: certs.ca }, 'full');
    const from = await logSize();
    const backup = await cli(['--config', file, '--json', '--yes', 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    const restore = await cli(['--config', file, '--json', '--yes', 'restore', backup.result!.id]);
    assert.equal(restore.code, 0, describeRun(restore));
    const connections = await pachbackupConnections(from);
    for (const line of connections) assert.match(line, /SSL enabled/, line);
    assert.ok(connections.some((l) => /database=pachyderm_full /.test(l)), 'pg_restore connected to the new database over TLS');
    for (const db of ['pachyderm', 'dex']) {
      assert.deepEqual(diffFingerprints(`table ${db}`, await fingerprintDatabase(pg, db), await fingerprintDatabase(pg, `${db}_full`)), []);
    }
    record(t, { category: 'TLS', fault: 'sslmode=verify-full with the CA that signed the server certificate', runs: 2, detail: `backup and restore completed over ${connections.length} TLS connections; restored rows equal` });
  });

  test('sslmode=verify-ca skips the host name check, for the driver and pg_dump alike', { skip, timeout: 300_000 }, async (t) => {
    const backup = await cli(['--config', await config({ sslmode: 'verify-ca', sslrootcert: certs.ca, host: '127.0.0.2' }, 'verifyca'), '--json', '--yes', 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    record(t, { category: 'TLS', fault: 'sslmode=verify-ca with the right CA, through an address the certificate does not name', runs: 1, detail: 'backup sealed (the chain is checked, the host name is not, as libpq does)' });
  });

  test('sslmode=verify-full with the wrong CA: fails in preflight saying the certificate could not be verified', { skip, timeout: 300_000 }, async (t) => {
    const backup = await cli(['--config', await config({ sslmode: 'verify-full', sslrootcert: certs.otherCa }, 'wrongca'), '--yes', 'backup']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    const message = errorLine(backup);
    assert.match(message, /TLS/, describeRun(backup));
    assert.match(message, /unable to verify|self[- ]signed|not verified|could not be verified/i, `says the certificate could not be verified: ${message}`);
    assert.match(message, /sslrootcert/, 'names the setting to fix');
    assert.doesNotMatch(backup.stderr, /▸ pause/, 'failed before the pause');
    record(t, { category: 'TLS', fault: 'sslmode=verify-full with a CA that did not sign the server certificate', runs: 1, detail: `refused in preflight: "${message}"` });
  });

  test('sslmode=verify-full through a host name the certificate does not cover: fails saying so', { skip, timeout: 300_000 }, async (t) => {
    const backup = await cli(['--config', await config({ sslmode: 'verify-full', sslrootcert: certs.ca, host: '127.0.0.2' }, 'wronghost'), '--yes', 'backup']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    const message = errorLine(backup);
    assert.match(message, /TLS/, describeRun(backup));
    assert.match(message, /127\.0\.0\.2/, 'names the host');
    assert.match(message, /does not match|altnames|not in the cert/i, `says the certificate does not cover the host: ${message}`);
    record(t, { category: 'TLS', fault: 'sslmode=verify-full to an address the certificate does not name', runs: 1, detail: `refused in preflight: "${message}"` });
  });

  test('restore with the wrong CA for the target server: refused before any database is created', { skip, timeout: 300_000 }, async (t) => {
    const good = await config({ sslmode: 'verify-full', sslrootcert: certs.ca }, 'targetca-backup');
    const backup = await cli(['--config', good, '--json', '--yes', 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    const file = await config({ sslmode: 'verify-full', sslrootcert: certs.ca }, 'targetca', { sslmode: 'verify-full', sslrootcert: certs.otherCa });
    const restore = await cli(['--config', file, '--yes', 'restore', backup.result!.id]);
    assert.equal(restore.code, EXIT_FAILED, describeRun(restore));
    assert.match(errorLine(restore), /TLS.*restore\.postgres|restore\.postgres.*TLS/, describeRun(restore));
    const { rows } = await pg.query<{ n: string }>('postgres', "SELECT count(*) AS n FROM pg_database WHERE datname LIKE '%_targetca'");
    assert.equal(Number(rows[0]?.n), 0, 'no database created');
    record(t, { category: 'TLS', fault: 'restore to a target server whose certificate the configured CA did not sign', runs: 2, detail: `refused before creating anything: "${errorLine(restore)}"` });
  });

  test('sslrootcert that does not exist: names the file and the key', { skip, timeout: 300_000 }, async (t) => {
    const missing = join(work, 'no-such-ca.crt');
    const backup = await cli(['--config', await config({ sslmode: 'verify-full', sslrootcert: missing }, 'missingca'), '--yes', 'backup']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    assert.match(errorLine(backup), new RegExp(`cluster\\.postgres\\.sslrootcert.*${missing.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`), describeRun(backup));
    record(t, { category: 'TLS', fault: 'sslrootcert names a file that does not exist', runs: 1, detail: `"${errorLine(backup)}"` });
  });

  test('the server refuses connections without TLS (the test is meaningful)', { skip, timeout: 120_000 }, async (t) => {
    const backup = await cli(['--config', await config({ sslmode: 'disable' }, 'plain'), '--yes', 'backup']);
    assert.equal(backup.code, EXIT_FAILED, describeRun(backup));
    assert.match(errorLine(backup), /pg_hba|no encryption|rejected/i, describeRun(backup));
    assert.ok(runs > 0);
    record(t, { category: 'TLS', fault: 'sslmode=disable against the TLS-only test server (control)', runs: 1, detail: `refused by the server: "${errorLine(backup)}"` });
  });
});

function errorLine(r: CliResult): string {
  return (r.stderr.split('\n').find((l) => l.startsWith('pachbackup: error: ')) ?? '').replace('pachbackup: error: ', '');
}
