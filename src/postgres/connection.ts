import { readFileSync } from 'node:fs';
import pg from 'pg';
import type { PostgresConfig } from '../config/schema.js';
import { resolveSecret, scrubSecrets, type Secret } from '../config/secret.js';

/** A PostgreSQL server to talk to, with its password resolved. `keyPath` names its config section in errors. */
export interface PgServer {
  config: PostgresConfig;
  password: Secret | undefined;
  keyPath: string;
}

export function pgServer(config: PostgresConfig, keyPath: string): PgServer {
  return { config, password: config.password ? resolveSecret(config.password, `${keyPath}.password`) : undefined, keyPath };
}

export function describeServer(server: PgServer): string {
  return `${server.config.user}@${server.config.host}:${server.config.port}`;
}

export class PgError extends Error {
  override name = 'PgError';
}

/** Environment for pg_dump / pg_restore: the password travels in PGPASSWORD, never in arguments. */
export function childEnv(server: PgServer): NodeJS.ProcessEnv {
  const c = server.config;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PGHOST: c.host,
    PGPORT: String(c.port),
    PGUSER: c.user,
    PGSSLMODE: c.sslmode,
    PGCONNECT_TIMEOUT: String(c.connectTimeoutSeconds),
    PGAPPNAME: 'pachbackup',
  };
  delete env.PGPASSWORD;
  delete env.PGPASSFILE;
  if (server.password) env.PGPASSWORD = server.password.reveal();
  if (c.sslrootcert) env.PGSSLROOTCERT = c.sslrootcert;
  return env;
}

function sslOption(server: PgServer): pg.ClientConfig['ssl'] {
  const c = server.config;
  if (c.sslmode === 'disable' || c.sslmode === 'allow' || c.sslmode === 'prefer') return false;
  if (c.sslmode === 'require') return { rejectUnauthorized: false };
  let ca: string;
  try {
    ca = readFileSync(c.sslrootcert ?? '', 'utf8');
  } catch {
    throw new PgError(`${server.keyPath}.sslrootcert: cannot read CA file ${c.sslrootcert}; check the path`);
  }
  if (c.sslmode === 'verify-ca') {
    // verify-ca checks the chain but not the host name, as libpq does.
    return { ca, rejectUnauthorized: true, checkServerIdentity: () => undefined };
  }
  return { ca, rejectUnauthorized: true };
}

/** Connects to `database`, translating failures into one error that names the cause and the fix. */
export async function connect(server: PgServer, database: string): Promise<pg.Client> {
  const c = server.config;
  const client = new pg.Client({
    host: c.host,
    port: c.port,
    user: c.user,
    database,
    ...(server.password ? { password: server.password.reveal() } : {}),
    ssl: sslOption(server),
    connectionTimeoutMillis: c.connectTimeoutSeconds * 1000,
    application_name: 'pachbackup',
    // The snapshot's session sits idle through the whole copy; TCP keepalives every 30 s keep a
    // NAT or load balancer that drops idle connections (e.g. after 350 s) from ending it.
    keepAlive: true,
    keepAliveInitialDelayMillis: 30_000,
  });
  // An idle client whose server goes away emits 'error'; without a listener the process would crash.
  client.on('error', () => undefined);
  try {
    await client.connect();
  } catch (err) {
    await client.end().catch(() => undefined);
    throw explainPgError(err, server, database);
  }
  return client;
}

export function explainPgError(err: unknown, server: PgServer, database: string): PgError {
  const e = err as { code?: string; message?: string };
  const where = `PostgreSQL ${describeServer(server)}`;
  const msg = scrubSecrets(e.message ?? String(err));
  switch (e.code) {
    case 'ECONNREFUSED':
      return new PgError(`cannot reach ${where}: connection refused; check ${server.keyPath}.host and .port and that the server is running`);
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new PgError(`cannot resolve host "${server.config.host}" for ${where}; check ${server.keyPath}.host`);
    case 'ETIMEDOUT':
    case 'EHOSTUNREACH':
      return new PgError(`cannot reach ${where}: ${e.code}; check ${server.keyPath}.host, the network, or raise connectTimeoutSeconds`);
    case '28P01':
      return new PgError(`password authentication failed for ${where}; check the secret ${server.keyPath}.password points at the right password`);
    case '28000':
      return new PgError(`${where} rejected the connection (${msg}); check pg_hba.conf, ${server.keyPath}.user and sslmode`);
    case '3D000':
      return new PgError(`database "${database}" does not exist on ${where}; check the database names in the config`);
    case '42501':
      return new PgError(`permission denied on ${where} for database "${database}": ${msg}`);
    default:
      break;
  }
  if (/timeout/i.test(msg)) {
    return new PgError(`cannot reach ${where}: timed out after ${server.config.connectTimeoutSeconds}s; check ${server.keyPath}.host and .port`);
  }
  if (/self[- ]signed|certificate|Hostname\/IP|altnames|SSL/i.test(msg)) {
    return new PgError(`TLS to ${where} failed: ${msg}; check ${server.keyPath}.sslmode and sslrootcert (the CA that signed the server certificate, and a host name it covers)`);
  }
  return new PgError(`${where}, database "${database}": ${msg}`);
}

export function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}
