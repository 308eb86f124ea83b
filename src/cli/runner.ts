import { setMaxListeners } from 'node:events';
import { InvalidArgumentError } from 'commander';
import { ConfigError, loadConfig, type ConfigOverride } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { recordRunMetrics, type MetricsCommand } from './metrics.js';
import { outputMode, Renderer } from './render.js';

/** Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration, 130 interrupted. */
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_INTERRUPTED = 130;

export interface GlobalOptions {
  config: string;
  json: boolean;
  yes: boolean;
  /** Prometheus text file written after backup, restore, verify and drill (--metrics-file). */
  metricsFile?: string;
}

export function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('must be a positive integer');
  return n;
}

/** A flag's parser for an integer from 1 to `max`: the bound of the config key the flag stands for (LIMITS). */
export function intUpTo(max: number): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 1 || n > max) throw new InvalidArgumentError(`must be an integer from 1 to ${max}`);
    return n;
  };
}

export function positiveNumber(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('must be a positive number of seconds');
  return n;
}

export function parseDbMap(value: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const pair of value.split(',')) {
    const [role, name] = pair.split('=');
    if ((role !== 'pachyderm' && role !== 'dex') || !name) throw new InvalidArgumentError('expected pachyderm=NAME[,dex=NAME]');
    out[role] = name;
  }
  return out;
}

export interface RunOptions {
  metrics?: MetricsCommand;
  /**
   * `exit`: the command pauses nothing, holds no lock and leaves nothing half done (it only reads,
   * or makes one atomic write), so the first SIGINT/SIGTERM/SIGHUP ends it at once with exit 130. Without
   * it, the signal aborts the work, which stops and cleans up (resumes the cluster, rolls back,
   * releases its lock) before the process exits; a command that does not watch the signal would
   * then run on to its end, a listing of a large bucket or a timing-out store for minutes.
   */
  interrupt?: 'exit';
}

/**
 * Stop signals: Ctrl-C, `kill` (and Kubernetes), and SIGHUP, which a backup started in an ssh
 * session gets when the connection drops; Node's default for each is to die at once, which would
 * leave a paused cluster paused.
 */
const STOP_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

/**
 * Runs one command with a renderer and an abort signal wired to the stop signals. The first signal
 * stops the work (the engine then resumes the cluster), or with `interrupt: 'exit'` the process;
 * later ones are refused with a reason.
 */
export async function run(
  globals: GlobalOptions,
  work: (ctx: { renderer: Renderer; signal: AbortSignal }) => Promise<number | void>,
  options: RunOptions = {},
): Promise<void> {
  const startedAt = new Date();
  const renderer = new ResultKeepingRenderer(outputMode(globals.json));
  const controller = new AbortController();
  // Every concurrent copy listens on this signal; the default limit of 10 would warn spuriously.
  setMaxListeners(0, controller.signal);
  const onSignal = (sig: NodeJS.Signals): void => {
    // After a hangup the terminal is gone: a write to it fails (EIO), and an unhandled stream
    // error would end the process in the middle of resuming the cluster.
    if (sig === 'SIGHUP') for (const stream of [process.stdout, process.stderr]) stream.on('error', () => undefined);
    if (options.interrupt === 'exit') {
      renderer.error(`interrupted by ${sig}`);
      process.exit(EXIT_INTERRUPTED);
    }
    if (!controller.signal.aborted) {
      renderer.line(`! ${sig} received: stopping; the cluster is resumed before exiting`);
      controller.abort(new Error(`interrupted by ${sig}`));
    } else {
      renderer.line(`! ${sig} again: still cleaning up (resuming the cluster); kill -9 would leave it paused until "pachbackup resume"`);
    }
  };
  for (const sig of STOP_SIGNALS) process.on(sig, onSignal);
  try {
    const code = await work({ renderer, signal: controller.signal });
    process.exitCode = code ?? 0;
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    if (controller.signal.aborted) {
      renderer.error(`interrupted: ${message}`);
      process.exitCode = EXIT_INTERRUPTED;
    } else {
      renderer.error(message);
      process.exitCode = err instanceof ConfigError || (err as Error).name === 'InvalidArgumentError' ? EXIT_USAGE : EXIT_FAILED;
    }
    if (process.env.PACHBACKUP_DEBUG && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
  } finally {
    for (const sig of STOP_SIGNALS) process.off(sig, onSignal);
    if (options.metrics && globals.metricsFile) {
      const run = { exitCode: Number(process.exitCode ?? 0), startedAt, finishedAt: new Date(), result: renderer.reported };
      await recordRunMetrics(globals.metricsFile, options.metrics, run, renderer.sink);
    }
  }
}

/** Keeps the result the command reported, for the metrics written after it. */
class ResultKeepingRenderer extends Renderer {
  reported: unknown;

  override result(kind: string, data: unknown, human: () => string): void {
    this.reported = data;
    super.result(kind, data, human);
  }
}

export function load(globals: GlobalOptions, overrides: ConfigOverride[]): Config {
  return loadConfig(globals.config, overrides);
}

