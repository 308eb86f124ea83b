import { ProgramFailure, runProgram } from '../process/runProgram.js';
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
export async function runCommand(spec: CommandSpec, timeoutMs: number, label: string): Promise<{ stdout: string }> {
  const [file, args] = typeof spec === 'string' ? ['/bin/sh', ['-c', spec]] : [spec[0]!, spec.slice(1)];
  try {
    return await runProgram(file, args, { timeoutMs });
  } catch (err) {
    if (!(err instanceof ProgramFailure)) throw err;
    if (err.kind === 'start') throw new CommandError(`${label} command could not start: ${err.why}`);
    throw new CommandError(`${label} command failed (${err.why}): ${err.output || 'no output'}`);
  }
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
