import { setTimeout as sleep } from 'node:timers/promises';
import { pauseSchema, type PauseConfig } from '../config/schema.js';
import { CommandPause } from './command.js';
import { ownedBy, type LedgerEntry, type PauseLedger } from './ledger.js';
import { NoPause } from './none.js';
import { PachctlPause } from './pachctl.js';
import type { PauseRecord, QuiesceEvents, QuiesceStrategy } from './strategy.js';

export { assertExpectedContext } from './strategy.js';

/** Builds the pause strategy the config names. Nothing is contacted until the strategy is used. */
export async function createStrategy(config: PauseConfig): Promise<QuiesceStrategy> {
  switch (config.strategy) {
    case 'none':
      return new NoPause();
    case 'command':
      if (!config.command) throw new Error('pause.strategy is "command" but pause.command is not set');
      return new CommandPause(config.command);
    case 'kubernetes': {
      // An absent section means the schema's defaults, taken from the schema so they cannot drift.
      const k = config.kubernetes ?? pauseSchema.shape.kubernetes.unwrap().parse({});
      // Loaded only when used: the Kubernetes client costs every other command ~1 s of CPU and ~100 MiB at start.
      const { KubernetesPause } = await import('./kubernetes.js');
      return new KubernetesPause({ ...k, expectedContext: config.expectedContext });
    }
    case 'pachctl': {
      const p = config.pachctl ?? pauseSchema.shape.pachctl.unwrap().parse({});
      return new PachctlPause({ ...p, expectedContext: config.expectedContext });
    }
  }
}

/** Waits between resume attempts after a failed one; three attempts in all. */
export const RESUME_RETRY_DELAYS_MS = [2_000, 5_000];

/**
 * Resumes, trying again after a failure: a resume is safe to repeat, and a transient failure (an
 * API server electing a leader, a dropped connection) must not leave the cluster paused until
 * someone notices. Throws the last attempt's error.
 */
export async function resumeWithRetries(strategy: QuiesceStrategy, record: PauseRecord, events: QuiesceEvents, delaysMs: readonly number[] = RESUME_RETRY_DELAYS_MS): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await strategy.resume(record, events);
      return;
    } catch (err) {
      const delay = delaysMs[attempt - 1];
      if (delay === undefined) throw err;
      events.warn(`resume attempt ${attempt} failed: ${(err as Error).message}; trying again in ${delay / 1000}s`);
      await sleep(delay);
    }
  }
}

/**
 * Undoes the pause a ledger entry records, with the strategy the entry names (its own record says
 * what to scale back or which context to unpause; the config gives the rest), then removes the
 * ledger (that entry only: another backup's, written meanwhile, stays). `pachbackup resume`, and a
 * backup that finds a ledger left by a run that died.
 */
export async function resumeLedgerEntry(pause: PauseConfig, ledger: PauseLedger, entry: LedgerEntry, events: QuiesceEvents): Promise<void> {
  const strategy = await createStrategy({ ...pause, strategy: entry.record.strategy as PauseConfig['strategy'] });
  await resumeWithRetries(strategy, entry.record, events);
  await clearOwnEntry(ledger, entry.backupId, events);
}

/** Removes `backupId`'s ledger entry; another backup's, found in its place, is left and reported. */
export async function clearOwnEntry(ledger: PauseLedger, backupId: string, events: QuiesceEvents): Promise<void> {
  const other = await ledger.clear(backupId);
  if (other) events.warn(`${ownedBy(other)}: that entry is left in place, the record of its pause`);
}
