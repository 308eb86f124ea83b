import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { accessSync, constants, readdirSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { scrubSecrets } from '../config/secret.js';
import { ProgramFailure, runProgram } from '../process/runProgram.js';

export class ToolError extends Error {
  override name = 'ToolError';
}

/**
 * Finds a PostgreSQL client program: in `binDir` when given, else the newest Debian-style
 * /usr/lib/postgresql/N/bin, else PATH. Debian's /usr/bin/pg_dump wrapper is skipped in favour of
 * the versioned binaries, whose version we can check.
 */
export function findPgTool(name: 'pg_dump' | 'pg_restore' | 'psql', binDir?: string): string {
  const candidates: string[] = [];
  if (binDir) {
    candidates.push(join(binDir, name));
  } else {
    try {
      const versions = readdirSync('/usr/lib/postgresql').filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
      for (const v of versions) candidates.push(join('/usr/lib/postgresql', v, 'bin', name));
    } catch {
      // Not a Debian layout.
    }
    for (const dir of (process.env.PATH ?? '').split(delimiter)) if (dir) candidates.push(join(dir, name));
  }
  for (const path of candidates) {
    try {
      accessSync(path, constants.X_OK);
      return path;
    } catch {
      // try the next
    }
  }
  const where = binDir ? `in ${binDir} (cluster.postgres.binDir)` : 'in /usr/lib/postgresql/*/bin or on PATH';
  throw new ToolError(`${name} not found ${where}; install the PostgreSQL client of the server's major version or newer (apt-get install postgresql-client-15) or set cluster.postgres.binDir`);
}

/** Major version of a PostgreSQL program, from `--version` ("pg_dump (PostgreSQL) 15.18 ..."). */
export async function toolVersion(path: string): Promise<{ major: number; full: string }> {
  const { stdout } = await runTool(path, ['--version'], process.env);
  const match = /\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?/.exec(stdout);
  if (!match) throw new ToolError(`${path} --version printed "${stdout.trim()}", not a PostgreSQL version`);
  return { major: Number(match[1]), full: match[2] ? `${match[1]}.${match[2]}` : match[1]! };
}

/** Runs a PostgreSQL program to completion, capturing its output. */
export async function runTool(path: string, args: string[], env: NodeJS.ProcessEnv, options: { timeoutMs?: number } = {}): Promise<{ stdout: string; stderr: string }> {
  try {
    return await runProgram(path, args, { env, timeoutMs: options.timeoutMs ?? 60_000 });
  } catch (err) {
    if (!(err instanceof ProgramFailure)) throw err;
    if (err.kind === 'start') throw new ToolError(`cannot run ${path}: ${err.why}`);
    throw new ToolError(`${path} ${args[0] ?? ''} failed (${err.why}): ${err.output || 'no error output'}`);
  }
}

/** Starts a long-running program whose stdin/stdout the caller streams; `done` settles when it exits. */
export function startTool(path: string, args: string[], env: NodeJS.ProcessEnv): { child: ChildProcessWithoutNullStreams; done: Promise<void> } {
  const child = spawn(path, args, { env, stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-16_384)));
  const name = path.split('/').pop();
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err) => reject(new ToolError(`cannot run ${path}: ${err.message}`)));
    child.on('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new ToolError(`${name} failed (${signal ?? `exit ${code}`}): ${scrubSecrets(stderr.trim()) || 'no error output'}`));
    });
  });
  // The caller may stop reading after an error; the close handler above still reports the exit.
  done.catch(() => undefined);
  return { child, done };
}

/** How long a program stopped with SIGTERM has to exit before it is killed. */
const STOP_GRACE_MS = 5_000;

/**
 * Runs a long program that reads and writes files, not pipes (pg_dump --format=directory,
 * pg_restore from a file), until it exits; `signal` stops it: SIGTERM (pg_dump and pg_restore
 * then cancel their queries), SIGKILL if it has not exited STOP_GRACE_MS later (its cancel
 * requests can hang on a server it cannot reach, and whoever stops it waits for it).
 */
export async function runToolToEnd(path: string, args: string[], env: NodeJS.ProcessEnv, signal?: AbortSignal): Promise<void> {
  signal?.throwIfAborted();
  const tool = startTool(path, args, env);
  tool.child.stdin.end();
  tool.child.stdout.resume();
  let kill: NodeJS.Timeout | undefined;
  const onAbort = (): void => {
    tool.child.kill('SIGTERM');
    kill = setTimeout(() => tool.child.kill('SIGKILL'), STOP_GRACE_MS);
  };
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await tool.done;
  } finally {
    clearTimeout(kill);
    signal?.removeEventListener('abort', onAbort);
  }
  signal?.throwIfAborted();
}

/**
 * After a streaming failure: stops the tool and picks the error worth showing. If the tool had
 * already failed on its own (e.g. pg_dump lost its connection), its stderr explains more than the
 * broken pipe; if we killed it, the original error (e.g. the store refusing a write) is the cause.
 */
export async function stopTool(tool: { child: ChildProcessWithoutNullStreams; done: Promise<void> }, err: unknown): Promise<unknown> {
  const exitedByItself = tool.child.exitCode !== null || tool.child.signalCode !== null;
  if (!exitedByItself) tool.child.kill('SIGKILL');
  const exit = await tool.done.then(() => undefined, (e: unknown) => e);
  return exitedByItself && exit instanceof Error ? exit : err;
}
