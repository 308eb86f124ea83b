import { randomBytes } from 'node:crypto';
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';
import type { EventSink } from '../engine/events.js';

/**
 * `--metrics-file`: the outcome of backup, restore, verify and drill runs in the Prometheus text
 * exposition format, for node-exporter's textfile collector. One file holds every command's
 * series: a run rewrites its own command's series and keeps the others, so one file per host is
 * enough. The file is replaced by rename, so the collector never reads half of it.
 */

export const METRICS_COMMANDS = ['backup', 'restore', 'verify', 'drill'] as const;
export type MetricsCommand = (typeof METRICS_COMMANDS)[number];

/** What one run contributes. Figures left undefined keep the value an earlier run wrote. */
export interface RunOutcome {
  ok: boolean;
  finishedAt: Date;
  durationSeconds: number;
  bytes?: number;
  objects?: number;
  /** Backup only. */
  downtimeSeconds?: number;
  /** Requests retried after transient object-store faults. */
  retries?: number;
}

interface Family {
  name: string;
  help: string;
  /** Whether the series carry a `command` label. */
  perCommand: boolean;
}

/** Every family this file holds, in the order written. All are gauges. */
export const METRIC_FAMILIES: readonly Family[] = [
  { name: 'pachbackup_last_run_timestamp_seconds', help: 'Unix time at which the last run of the command finished, successful or not.', perCommand: true },
  { name: 'pachbackup_last_success_timestamp_seconds', help: 'Unix time at which the last successful run of the command finished.', perCommand: true },
  { name: 'pachbackup_last_result', help: 'Result of the last run of the command: 1 success, 0 failure.', perCommand: true },
  { name: 'pachbackup_last_duration_seconds', help: 'Wall-clock duration of the last run of the command, successful or not.', perCommand: true },
  {
    name: 'pachbackup_last_bytes',
    help: 'Bytes handled by the last successful run: backup, dumps plus objects held; restore and drill, object bytes restored; verify, object bytes re-read.',
    perCommand: true,
  },
  { name: 'pachbackup_last_objects', help: 'Objects handled by the last successful run of the command (held, restored or re-read).', perCommand: true },
  {
    name: 'pachbackup_last_retries',
    help: 'Object-store requests the last successful run of the command retried after a transient fault (throttling, timeouts, resets); a rising value asks for a lower concurrency.',
    perCommand: true,
  },
  { name: 'pachbackup_last_downtime_seconds', help: 'Seconds the last successful backup kept the cluster paused (0 in online mode).', perCommand: false },
];

/** Series by family name, then by command ('' for families without the label). */
type Series = Map<string, Map<string, number>>;

const SAMPLE_LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{command="((?:[^"\\]|\\.)*)"\})?\s+(\S+)(?:\s+-?\d+)?\s*$/;

/** Reads the series of a file this module wrote; lines it does not know are dropped. */
export function parseMetrics(text: string): Series {
  const series: Series = new Map();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const match = SAMPLE_LINE.exec(line);
    if (!match) continue;
    const [, name, command, raw] = match;
    const family = METRIC_FAMILIES.find((f) => f.name === name);
    if (!family || family.perCommand !== (command !== undefined)) continue;
    const value = Number(raw);
    if (raw === undefined || raw.trim() === '' || Number.isNaN(value)) continue;
    setSample(series, family.name, unescapeLabel(command ?? ''), value);
  }
  return series;
}

/** The file's next content: `previous` with this run's command's series replaced. */
export function updateMetrics(previous: string, command: MetricsCommand, outcome: RunOutcome): string {
  const series = parseMetrics(previous);
  const finished = outcome.finishedAt.getTime() / 1000;
  setSample(series, 'pachbackup_last_run_timestamp_seconds', command, finished);
  setSample(series, 'pachbackup_last_result', command, outcome.ok ? 1 : 0);
  setSample(series, 'pachbackup_last_duration_seconds', command, round3(outcome.durationSeconds));
  // A failed run changes nothing below: "last success" and its figures stay those of the last success.
  if (outcome.ok) {
    setSample(series, 'pachbackup_last_success_timestamp_seconds', command, finished);
    if (outcome.bytes !== undefined) setSample(series, 'pachbackup_last_bytes', command, outcome.bytes);
    if (outcome.objects !== undefined) setSample(series, 'pachbackup_last_objects', command, outcome.objects);
    if (outcome.downtimeSeconds !== undefined) setSample(series, 'pachbackup_last_downtime_seconds', '', round3(outcome.downtimeSeconds));
    if (outcome.retries !== undefined) setSample(series, 'pachbackup_last_retries', command, outcome.retries);
  }
  return renderMetrics(series);
}

export function renderMetrics(series: Series): string {
  const out: string[] = [];
  for (const family of METRIC_FAMILIES) {
    const samples = series.get(family.name);
    if (!samples || samples.size === 0) continue;
    out.push(`# HELP ${family.name} ${family.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`, `# TYPE ${family.name} gauge`);
    for (const [command, value] of [...samples].sort(([a], [b]) => a.localeCompare(b))) {
      out.push(`${family.name}${family.perCommand ? `{command="${escapeLabel(command)}"}` : ''} ${formatValue(value)}`);
    }
  }
  return out.length ? `${out.join('\n')}\n` : '';
}

/** Replaces the file atomically: a temporary file in the same directory, then a rename over it. */
export async function writeMetrics(path: string, command: MetricsCommand, outcome: RunOutcome): Promise<void> {
  let previous = '';
  try {
    previous = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  // The collector reads only *.prom files, so the temporary name must not end in .prom.
  const temp = join(dirname(path), `.${basename(path)}.${process.pid}-${randomBytes(3).toString('hex')}.tmp`);
  try {
    await writeFile(temp, updateMetrics(previous, command, outcome), { mode: 0o644 });
    await rename(temp, path);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
}

// The parts of each command's reported result the metrics use.
const figures = z.object({ count: z.number(), bytes: z.number() });
const resultShapes = {
  backup: z.object({ objects: figures, databases: z.array(z.object({ bytes: z.number() })), downtimeMs: z.number().nullable() }),
  restore: z.object({ dryRun: z.boolean(), objects: figures }),
  verify: z.object({ checked: z.object({ objects: z.number(), bytes: z.number() }) }),
  drill: z.object({ objects: figures }),
};
/** Every command's result may report its retries the same way. */
const retriesShape = z.object({ retries: z.object({ count: z.number() }) });

/** This run's outcome from its exit code and the result it reported; undefined for a restore dry run. */
export function runOutcome(command: MetricsCommand, run: { exitCode: number; startedAt: Date; finishedAt: Date; result: unknown }): RunOutcome | undefined {
  const outcome: RunOutcome = { ok: run.exitCode === 0, finishedAt: run.finishedAt, durationSeconds: (run.finishedAt.getTime() - run.startedAt.getTime()) / 1000 };
  switch (command) {
    case 'backup': {
      const r = resultShapes.backup.safeParse(run.result);
      if (r.success) {
        outcome.bytes = r.data.objects.bytes + r.data.databases.reduce((n, d) => n + d.bytes, 0);
        outcome.objects = r.data.objects.count;
        outcome.downtimeSeconds = (r.data.downtimeMs ?? 0) / 1000;
      }
      break;
    }
    case 'restore': {
      const r = resultShapes.restore.safeParse(run.result);
      // A dry run restores nothing: it is neither a restore's success nor its failure.
      if (r.success && r.data.dryRun) return undefined;
      if (r.success) Object.assign(outcome, { bytes: r.data.objects.bytes, objects: r.data.objects.count });
      break;
    }
    case 'verify': {
      const r = resultShapes.verify.safeParse(run.result);
      if (r.success) Object.assign(outcome, { bytes: r.data.checked.bytes, objects: r.data.checked.objects });
      break;
    }
    case 'drill': {
      const r = resultShapes.drill.safeParse(run.result);
      if (r.success) Object.assign(outcome, { bytes: r.data.objects.bytes, objects: r.data.objects.count });
      break;
    }
  }
  const retried = retriesShape.safeParse(run.result);
  if (retried.success) outcome.retries = retried.data.retries.count;
  return outcome;
}

/**
 * Writes the run's metrics. A metrics file that cannot be written is reported as a warning and
 * does not change the command's exit code: the alert on a stale last-run time catches it.
 */
export async function recordRunMetrics(
  path: string,
  command: MetricsCommand,
  run: { exitCode: number; startedAt: Date; finishedAt: Date; result: unknown },
  emit: EventSink,
): Promise<void> {
  const outcome = runOutcome(command, run);
  if (!outcome) return;
  try {
    await writeMetrics(path, command, outcome);
  } catch (err) {
    emit({ type: 'warning', message: `cannot write the metrics file ${path}: ${(err as Error).message}` });
  }
}

function setSample(series: Series, family: string, command: string, value: number): void {
  let samples = series.get(family);
  if (!samples) series.set(family, (samples = new Map()));
  samples.set(command, value);
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function unescapeLabel(value: string): string {
  return value.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
}

function formatValue(value: number): string {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return '+Inf';
  if (value === -Infinity) return '-Inf';
  return String(value);
}

function round3(n: number): number {
  return Math.round(n * 1000) / 1000;
}
