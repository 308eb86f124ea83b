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
}
