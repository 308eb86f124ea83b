import { spawn } from 'node:child_process';
import { scrubSecrets } from '../config/secret.js';
import type { PauseRecord, QuiesceEvents, QuiesceStrategy } from './strategy.js';

export type CommandSpec = string | string[];

export interface CommandStrategyOptions {
  pause: CommandSpec;
  resume: CommandSpec;
  status?: CommandSpec;
  timeoutSeconds: number;
}

export class CommandError extends Error {
  override name = 'CommandError';
}

/**
 * Runs user-given commands. A list is executed directly; a string is run by /bin/sh -c, since
 * users write these as they would in a runbook (`kubectl scale ... && ...`).
 */
export function runCommand(spec: CommandSpec, timeoutMs: number, label: string): Promise<{ stdout: string }> {
  const [file, args] = typeof spec === 'string' ? ['/bin/sh', ['-c', spec]] : [spec[0]!, spec.slice(1)];
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let timedOut = false;
    // Our own timer rather than spawn's `timeout`, which is only cleared when a child exits: a
    // command that could not start would keep the process alive for the whole timeout.
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout = (stdout + d.toString()).slice(-16_384)));
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-16_384)));
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new CommandError(`${label} command could not start: ${err.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) return resolve({ stdout });
      const why = timedOut ? `timed out after ${timeoutMs / 1000}s` : signal ? `killed by ${signal}` : `exit ${code}`;
      reject(new CommandError(`${label} command failed (${why}): ${scrubSecrets(stderr.trim() || stdout.trim()) || 'no output'}`));
    });
  });
}

export class CommandPause implements QuiesceStrategy {
  readonly name = 'command';
  readonly needsConfirmation = true;

  constructor(private readonly options: CommandStrategyOptions) {}

  async describeTarget(): Promise<string> {
    const spec = this.options.pause;
    return `the cluster paused by: ${typeof spec === 'string' ? spec : spec.join(' ')}`;
  }

  async plan(): Promise<PauseRecord> {
    return { strategy: this.name, target: await this.describeTarget(), startedAt: new Date().toISOString(), state: { resume: this.options.resume } };
  }

  async pause(record: PauseRecord, events: QuiesceEvents, signal?: AbortSignal): Promise<PauseRecord> {
    const timeoutMs = this.options.timeoutSeconds * 1000;
    await runCommand(this.options.pause, timeoutMs, 'pause');
    if (!this.options.status) return record;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      signal?.throwIfAborted();
      try {
        await runCommand(this.options.status, Math.max(1000, deadline - Date.now()), 'pause status');
        return record;
      } catch (err) {
        if (Date.now() >= deadline) throw new CommandError(`the cluster did not report paused within ${this.options.timeoutSeconds}s: ${(err as Error).message}`);
        events.info('waiting for the pause status command to report paused');
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  async resume(record: PauseRecord): Promise<void> {
    const spec = (record.state.resume as CommandSpec | undefined) ?? this.options.resume;
    await runCommand(spec, this.options.timeoutSeconds * 1000, 'resume');
  }
}
