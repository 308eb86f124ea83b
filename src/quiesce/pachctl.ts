/**
 * The `pachctl` pause strategy: Pachyderm Enterprise's own pause (`pachctl enterprise pause`), which
 * restarts pachd in paused mode and has it scale the workers down, polled through
 * `pachctl enterprise pause-status` until it prints `paused`; resume is `pachctl enterprise unpause`,
 * polled until `unpaused`. Right after the pause, pause-status still prints `unpaused` until pachd's
 * pods have restarted, and `paused` right after an unpause; both waits poll through that.
 *
 * Choosing the context without touching the user's pachctl config (pachyderm v2.11.6):
 * pachctl has no per-command context flag. `enterprise pause | unpause | pause-status` connect with
 * `NewOnUserMachine(ctx, enterprise=true)`, which resolves `Config.ActiveEnterpriseContext`
 * (src/internal/config/config.go): env `PACH_ENTERPRISE_CONTEXT`, else the config's
 * active-enterprise-context, else `ActiveContext`: env `PACH_CONTEXT`, else active-context. So
 * with a configured context both variables are set to it; setting only PACH_CONTEXT would be
 * ignored by a user whose config names an active enterprise context. `pachctl config get
 * active-enterprise-context` resolves the same way, so it names the context the pause will hit,
 * and fails when the configured context does not exist.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { z } from 'zod';
import { ProgramFailure, runProgram } from '../process/runProgram.js';
import { assertExpectedContext, type PauseRecord, type QuiesceEvents, type QuiesceStrategy } from './strategy.js';

export interface PachctlPauseOptions {
  /** The pachctl executable: a path, or a name looked up on PATH. */
  path: string;
  /** pachctl context to pause; default: pachctl's active (enterprise) context. */
  context?: string | undefined;
  /** Limit for the pause to be reported; the unpause gets this too, but at least 60 s. */
  timeoutSeconds: number;
  expectedContext?: string | undefined;
  /** How often pause-status is polled; default 2000 ms. */
  pollIntervalMs?: number;
  /** Environment for pachctl (default process.env); the context variables are added to it. */
  env?: NodeJS.ProcessEnv;
}

export class PachctlError extends Error {
  override name = 'PachctlError';
}

/** What `pachctl enterprise pause-status` prints (enterprise PauseStatusResponse). */
export type PachydermPauseStatus = 'unpaused' | 'partially-paused' | 'paused';

const pachctlStateSchema = z.object({
  /** The context that was paused; undefined when pachctl's active context was used. */
  context: z.string().min(1).optional(),
});

/** The longest a single pachctl call may take, so that a hung connection cannot eat the whole budget. */
const MAX_CALL_MS = 120_000;

/**
 * A short timeoutSeconds bounds how long a pause may take; the resume must not give up as quickly,
 * since giving up leaves the cluster paused.
 */
const MIN_RESUME_SECONDS = 60;

export class PachctlPause implements QuiesceStrategy {
  readonly name = 'pachctl';
  readonly needsConfirmation = true;

  constructor(private readonly options: PachctlPauseOptions) {}

  async currentContext(): Promise<string | undefined> {
    return this.activeContext(this.options.context);
  }

  async describeTarget(): Promise<string> {
    return `pachctl context ${(await this.currentContext()) ?? '(none)'} (pachctl enterprise pause)`;
  }

  /** Names the context and refuses a cluster that is already (partially) paused: its unpause is not ours to do. */
  async plan(): Promise<PauseRecord> {
    await assertExpectedContext(this, this.options.expectedContext);
    const context = await this.currentContext();
    const status = await this.status(context, Date.now() + this.options.timeoutSeconds * 1000);
    if (status !== 'unpaused') {
      throw new PachctlError(
        `pachctl context ${context ?? '(active)'} is already ${status}: if pachbackup left it so, run "pachbackup resume"; otherwise unpause it first. Nothing was changed`,
      );
    }
    return {
      strategy: this.name,
      target: `pachctl context ${context ?? '(active)'}`,
      startedAt: new Date().toISOString(),
      state: context === undefined ? {} : { context },
    };
  }

  async pause(record: PauseRecord, events: QuiesceEvents, signal?: AbortSignal): Promise<PauseRecord> {
    await assertExpectedContext(this, this.options.expectedContext);
    const { context } = parseState(record);
    const deadline = Date.now() + this.options.timeoutSeconds * 1000;
    await this.run(['enterprise', 'pause'], context, deadline, 'pause the cluster');
    events.info(`pachctl enterprise pause sent to context ${context ?? '(active)'}; waiting for pause-status to report paused`);
    await this.waitForStatus('paused', context, deadline, events, signal);
    return record;
  }

  /**
   * Always sends the unpause. pause-status cannot tell "never paused" from "pause sent, pachd not yet
   * restarted" (both print `unpaused`), and pachd's unpause changes nothing when its mode is
   * already unpaused (rollPachd in src/server/enterprise/server/api_server.go), so it is free.
   */
  async resume(record: PauseRecord, events: QuiesceEvents): Promise<void> {
    const { context } = parseState(record);
    const deadline = Date.now() + this.resumeSeconds() * 1000;
    await this.run(['enterprise', 'unpause'], context, deadline, 'unpause the cluster');
    events.info(`pachctl enterprise unpause sent to context ${context ?? '(active)'}; waiting for pause-status to report unpaused`);
    await this.waitForStatus('unpaused', context, deadline, events);
  }

  private resumeSeconds(): number {
    return Math.max(this.options.timeoutSeconds, MIN_RESUME_SECONDS);
  }

  private async activeContext(context: string | undefined): Promise<string | undefined> {
    const { stdout } = await this.run(['config', 'get', 'active-enterprise-context'], context, Date.now() + 30_000, 'read the active context');
    const name = lastLine(stdout);
    return name === '' || name === 'NONE' ? undefined : name;
  }

  private async status(context: string | undefined, deadline: number): Promise<PachydermPauseStatus> {
    const { stdout } = await this.run(['enterprise', 'pause-status'], context, deadline, 'read the pause status');
    const status = lastLine(stdout);
    if (status === 'unpaused' || status === 'partially-paused' || status === 'paused') return status;
    throw new PachctlError(`pachctl enterprise pause-status printed ${JSON.stringify(stdout.trim().slice(0, 200))}, not one of unpaused, partially-paused, paused`);
  }

  private async waitForStatus(wanted: PachydermPauseStatus, context: string | undefined, deadline: number, events: QuiesceEvents, signal?: AbortSignal): Promise<void> {
    const interval = this.options.pollIntervalMs ?? 2000;
    let last: PachydermPauseStatus | undefined;
    for (;;) {
      signal?.throwIfAborted();
      const status = await this.status(context, deadline);
      if (status === wanted) return;
      if (status !== last) events.info(`pause-status: ${status}`);
      last = status;
      if (Date.now() >= deadline) {
        const next = wanted === 'paused' ? 'the backup stops and the cluster is unpaused' : 'run "pachbackup resume" again, or "pachctl enterprise unpause"';
        const seconds = wanted === 'paused' ? this.options.timeoutSeconds : this.resumeSeconds();
        throw new PachctlError(`pachctl enterprise pause-status still reports "${status}" after ${seconds}s, not "${wanted}" (pause.pachctl.timeoutSeconds); ${next}`);
      }
      await sleep(Math.min(interval, Math.max(0, deadline - Date.now())), undefined, signal ? { signal } : {});
    }
  }

  private run(args: string[], context: string | undefined, deadline: number, purpose: string): Promise<{ stdout: string; stderr: string }> {
    const env: NodeJS.ProcessEnv = { ...(this.options.env ?? process.env) };
    if (context !== undefined) {
      env.PACH_CONTEXT = context;
      env.PACH_ENTERPRISE_CONTEXT = context;
    }
    const timeoutMs = Math.max(1000, Math.min(MAX_CALL_MS, deadline - Date.now()));
    return runPachctl(this.options.path, args, env, timeoutMs, purpose);
  }
}

/** Runs pachctl, turning a failure into an error that says what it was for. */
async function runPachctl(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number, purpose: string): Promise<{ stdout: string; stderr: string }> {
  try {
    return await runProgram(file, args, { env, timeoutMs });
  } catch (err) {
    if (!(err instanceof ProgramFailure)) throw err;
    if (err.kind === 'start') {
      const hint = err.code === 'ENOENT' ? ': not found; install pachctl or set pause.pachctl.path' : `: ${err.why}`;
      throw new PachctlError(`cannot run ${file} to ${purpose}${hint}`);
    }
    throw new PachctlError(`${file} ${args.join(' ')} failed to ${purpose} (${err.why}): ${err.output || 'no output'}`);
  }
}

function lastLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  return lines[lines.length - 1] ?? '';
}

function parseState(record: PauseRecord): { context: string | undefined } {
  const result = pachctlStateSchema.safeParse(record.state);
  if (!result.success) throw new PachctlError(`the pause record is not a pachctl pause record: ${result.error.issues.map((i) => i.message).join('; ')}`);
  return { context: result.data.context };
}
