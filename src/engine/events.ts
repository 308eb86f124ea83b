/** Everything the engine reports. The engine never prints; the CLI renders these (human or --json). */
export type PhaseName =
  | 'preflight'
  | 'precopy'
  | 'pause'
  | 'snapshot'
  | 'copy'
  | 'dump'
  | 'resume'
  | 'seal'
  | 'verify'
  | 'restore-objects'
  | 'restore-databases'
  | 'helm-values'
  | 'check'
  | 'prune';

export type EngineEvent =
  | { type: 'phase-start'; phase: PhaseName }
  | { type: 'phase-end'; phase: PhaseName; ms: number; ok: boolean }
  | { type: 'progress'; phase: PhaseName; done: number; total: number; bytes: number; totalBytes: number }
  | { type: 'info'; message: string }
  | { type: 'warning'; message: string };

export type EventSink = (event: EngineEvent) => void;

/** Runs named phases, timing each and reporting its start and end. */
export class PhaseRunner {
  readonly timings: Array<{ name: PhaseName; ms: number }> = [];

  constructor(private readonly emit: EventSink) {}

  async run<T>(phase: PhaseName, work: () => Promise<T>): Promise<T> {
    this.emit({ type: 'phase-start', phase });
    const started = performance.now();
    let ok = false;
    try {
      const result = await work();
      ok = true;
      return result;
    } finally {
      const ms = Math.round(performance.now() - started);
      this.timings.push({ name: phase, ms });
      this.emit({ type: 'phase-end', phase, ms, ok });
    }
  }
}

/** Emits progress at most every `intervalMs`, and always the final state. */
export class ProgressReporter {
  done = 0;
  bytes = 0;
  #last = 0;

  constructor(
    private readonly emit: EventSink,
    private readonly phase: PhaseName,
    readonly total: number,
    readonly totalBytes: number,
    private readonly intervalMs = 250,
  ) {
    this.flush();
  }

  add(count: number, bytes: number): void {
    this.done += count;
    this.bytes += bytes;
    const now = performance.now();
    if (now - this.#last >= this.intervalMs || this.done === this.total) this.flush();
  }

  flush(): void {
    this.#last = performance.now();
    this.emit({ type: 'progress', phase: this.phase, done: this.done, total: this.total, bytes: this.bytes, totalBytes: this.totalBytes });
  }
}
