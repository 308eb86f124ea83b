import cliProgress from 'cli-progress';
import { scrubSecrets } from '../config/secret.js';
import type { EngineEvent, EventSink, PhaseName } from '../engine/events.js';

export type OutputMode = 'json' | 'tty' | 'plain';

export function outputMode(json: boolean): OutputMode {
  if (json) return 'json';
  return process.stderr.isTTY && process.env.CI !== 'true' ? 'tty' : 'plain';
}

const PHASE_LABEL: Record<PhaseName, string> = {
  preflight: 'preflight',
  precopy: 'pre-copy (cluster running)',
  pause: 'pause',
  snapshot: 'database snapshot',
  copy: 'copy objects',
  dump: 'dump databases',
  resume: 'resume',
  seal: 'seal',
  verify: 'verify',
  'restore-objects': 'restore objects',
  'restore-databases': 'restore databases',
  'helm-values': 'Helm values',
  check: 'check',
  prune: 'prune',
};

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

/**
 * Renders engine events: one JSON object per line on stdout (--json), a live progress bar on a
 * terminal, or plain lines on stderr otherwise. Everything passes through the secret scrubber.
 */
export class Renderer {
  #bar: cliProgress.SingleBar | undefined;
  #barPhase: PhaseName | undefined;
  #lastPlain = 0;
  #lastPlainDone = -1;

  constructor(readonly mode: OutputMode) {}

  readonly sink: EventSink = (event) => this.render(event);

  private render(event: EngineEvent): void {
    if (this.mode === 'json') {
      process.stdout.write(`${scrubSecrets(JSON.stringify({ time: new Date().toISOString(), ...event }))}\n`);
      return;
    }
    switch (event.type) {
      case 'phase-start':
        this.#lastPlainDone = -1;
        this.line(`▸ ${PHASE_LABEL[event.phase]}`);
        break;
      case 'phase-end':
        this.stopBar();
        this.line(`${event.ok ? '✓' : '✗'} ${PHASE_LABEL[event.phase]} ${formatMs(event.ms)}`);
        break;
      case 'progress':
        this.progress(event);
        break;
      case 'info':
        this.line(`  ${event.message}`);
        break;
      case 'warning':
        this.line(`! warning: ${event.message}`);
        break;
    }
  }

  private progress(event: Extract<EngineEvent, { type: 'progress' }>): void {
    if (event.total === 0) return;
    if (this.mode === 'tty') {
      if (this.#barPhase !== event.phase) {
        this.stopBar();
        this.#bar = new cliProgress.SingleBar(
          { format: '  {bar} {value}/{total} objects | {bytes} | {rate}/s | ETA {eta_formatted}', hideCursor: true, stream: process.stderr, etaBuffer: 50 },
          cliProgress.Presets.shades_classic,
        );
        this.#bar.start(event.total, 0, { bytes: '0 B', rate: '0 B' });
        this.#barPhase = event.phase;
        this.#started = performance.now();
      }
      const seconds = Math.max(0.001, (performance.now() - this.#started) / 1000);
      this.#bar?.update(event.done, { bytes: `${formatBytes(event.bytes)}/${formatBytes(event.totalBytes)}`, rate: formatBytes(event.bytes / seconds) });
      return;
    }
    const now = performance.now();
    const finished = event.done === event.total;
    if (finished && this.#lastPlainDone === event.done) return;
    if (now - this.#lastPlain >= 5000 || finished) {
      this.#lastPlain = now;
      this.#lastPlainDone = event.done;
      this.line(`  ${event.done}/${event.total} objects, ${formatBytes(event.bytes)}/${formatBytes(event.totalBytes)}`);
    }
  }

  #started = 0;

  private stopBar(): void {
    this.#bar?.stop();
    this.#bar = undefined;
    this.#barPhase = undefined;
  }

  /** A line for people, on stderr so stdout stays for results. */
  line(text: string): void {
    if (this.mode === 'json') return;
    this.stopBar();
    process.stderr.write(`${scrubSecrets(text)}\n`);
  }

  /** The command's result: a JSON line with --json, else the human text on stdout. */
  result(kind: string, data: unknown, human: () => string): void {
    this.stopBar();
    if (this.mode === 'json') process.stdout.write(`${scrubSecrets(JSON.stringify({ time: new Date().toISOString(), type: 'result', command: kind, ...(data as object) }))}\n`);
    else process.stdout.write(`${scrubSecrets(human())}\n`);
  }

  error(message: string): void {
    this.stopBar();
    if (this.mode === 'json') process.stdout.write(`${scrubSecrets(JSON.stringify({ time: new Date().toISOString(), type: 'error', message }))}\n`);
    process.stderr.write(`pachbackup: error: ${scrubSecrets(message)}\n`);
  }
}

/** A table with aligned columns, for list/show. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const fmt = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [fmt(headers), fmt(widths.map((w) => '-'.repeat(w))), ...rows.map(fmt)].join('\n');
}
