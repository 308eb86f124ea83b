import { spawn } from 'node:child_process';
import { scrubSecrets } from '../config/secret.js';

/** How a program run ended when it did not succeed; callers phrase the message for their user. */
export class ProgramFailure extends Error {
  override name = 'ProgramFailure';
  constructor(
    /** `start`: it could not be started (`code` holds the errno, e.g. ENOENT); `exit`: it ran and failed. */
    readonly kind: 'start' | 'exit',
    /** e.g. `exit 3`, `timed out after 5s`, `killed by SIGTERM`, or the start error. */
    readonly why: string,
    /** The end of its stderr (or stdout when stderr is empty), scrubbed of secrets. */
    readonly output: string,
    readonly code?: string,
  ) {
    super(`${why}: ${output || 'no output'}`);
  }
}

/**
 * Runs a program to completion with an argument array (never a shell string), capturing the end
 * of its output. It is killed after `timeoutMs` by our own timer: spawn's `timeout` is cleared only
 * on exit, so it would keep this process alive after a program that never started.
 */
export function runProgram(file: string, args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs: number }): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], ...(options.env ? { env: options.env } : {}) });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, options.timeoutMs);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout = (stdout + d.toString()).slice(-16_384)));
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-16_384)));
    child.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new ProgramFailure('start', err.message, '', err.code));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) return resolve({ stdout, stderr });
      const why = timedOut ? `timed out after ${Math.round(options.timeoutMs / 1000)}s` : signal ? `killed by ${signal}` : `exit ${code}`;
      reject(new ProgramFailure('exit', why, scrubSecrets(stderr.trim() || stdout.trim())));
    });
  });
}
