/**
 * A pause strategy stops every writer of the cluster's state (pachd, pachw, workers) and later
 * restores exactly what it changed. `pause` returns a record of what it changed; that record is
 * written to the pause ledger before and after, so `resume` can run in another process after a crash.
 */
export interface PauseRecord {
  strategy: string;
  /** What was paused, for people: e.g. `kubernetes context prod, namespace pachyderm`. */
  target: string;
  startedAt: string;
  /** Strategy-specific state needed to resume (e.g. original replica counts). JSON-serialisable. */
  state: Record<string, unknown>;
}

export interface QuiesceEvents {
  info(message: string): void;
  warn(message: string): void;
}

export interface QuiesceStrategy {
  readonly name: string;
  /** What this strategy will pause, shown before asking for confirmation. */
  describeTarget(): Promise<string>;
  /** Whether pausing needs the operator's confirmation (false for `none`). */
  readonly needsConfirmation: boolean;
  /**
   * Captures what is about to change, without changing anything. The engine writes this
   * to the pause ledger before `pause` runs.
   */
  plan(): Promise<PauseRecord>;
  /** Pauses the cluster and waits until it is quiet. Throws if it cannot within its timeout. */
  pause(record: PauseRecord, events: QuiesceEvents, signal?: AbortSignal): Promise<PauseRecord>;
  /** Restores what `pause` changed, from the record. Safe to call more than once. */
  resume(record: PauseRecord, events: QuiesceEvents): Promise<void>;
  /**
   * The Kubernetes or pachctl context this strategy would pause, for the `expectedContext` guard.
   * Absent when the strategy cannot tell (`none`, `command`).
   */
  currentContext?(): Promise<string | undefined>;
}

export class WrongContextError extends Error {
  override name = 'WrongContextError';
}

/**
 * The wrong-cluster guard: when `expected` is set, the strategy's current context must be exactly
 * it, or this throws before anything is changed. `none` passes, since it touches no cluster; a
 * strategy that cannot name its context (`command`) is refused rather than trusted.
 */
export async function assertExpectedContext(strategy: QuiesceStrategy, expected: string | undefined): Promise<void> {
  if (expected === undefined) return;
  if (strategy.name === 'none') return;
  if (!strategy.currentContext) {
    throw new WrongContextError(
      `pause.expectedContext is "${expected}", but the "${strategy.name}" pause strategy cannot tell which context it pauses; use the kubernetes or pachctl strategy, or remove pause.expectedContext`,
    );
  }
  const actual = await strategy.currentContext();
  if (actual !== expected) {
    throw new WrongContextError(
      `refusing to pause: the ${strategy.name} context is ${actual === undefined ? 'not set' : `"${actual}"`}, but pause.expectedContext is "${expected}"; nothing was changed. Point the config at the right cluster (pause.${strategy.name}.context) or fix pause.expectedContext`,
    );
  }
}
