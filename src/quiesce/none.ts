import type { PauseRecord, QuiesceEvents, QuiesceStrategy } from './strategy.js';

/** Pauses nothing. The backup is only consistent if nothing writes to the cluster meanwhile. */
export class NoPause implements QuiesceStrategy {
  readonly name = 'none';
  readonly needsConfirmation = false;
  async describeTarget(): Promise<string> {
    return 'nothing (pause strategy "none")';
  }
  async plan(): Promise<PauseRecord> {
    return { strategy: this.name, target: 'nothing', startedAt: new Date().toISOString(), state: {} };
  }
  async pause(record: PauseRecord, events: QuiesceEvents): Promise<PauseRecord> {
    events.warn(
      'pause strategy "none": the cluster keeps running, so the dump and the objects may not be consistent; set pause.strategy or use --mode online, which proves completeness',
    );
    return record;
  }
  async resume(): Promise<void> {}
}
