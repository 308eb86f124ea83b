import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { NotFoundError, type ObjectStore } from '../objectstore/store.js';
import { readWhole } from '../objectstore/retry.js';
import type { PauseRecord } from './strategy.js';

export const LEDGER_KEY = 'ledger/pause.json';

export interface LedgerEntry {
  record: PauseRecord;
  backupId: string;
  host: string;
  pid: number;
  /** `pausing` is written before the cluster is touched; `paused` once it is quiet. */
  phase: 'pausing' | 'paused';
  writtenAt: string;
}

export function localStateDir(): string {
  return process.env.PACHBACKUP_STATE_DIR ?? join(homedir(), '.pachbackup');
}

/**
 * The pause ledger: what a pause changed, written durably before anything changes, in the
 * repository and in a local file, so `pachbackup resume` can undo it after a crash or kill -9.
 * It is removed only after a successful resume.
 */
export class PauseLedger {
  readonly localFile: string;

  constructor(private readonly store: ObjectStore, repositoryId: string) {
    this.localFile = join(localStateDir(), `pause-ledger-${repositoryId}.json`);
  }

  async write(entry: LedgerEntry): Promise<void> {
    const data = Buffer.from(`${JSON.stringify(entry, null, 2)}\n`);
    await mkdir(localStateDir(), { recursive: true, mode: 0o700 });
    const temp = `${this.localFile}.tmp`;
    await writeFile(temp, data, { mode: 0o600 });
    await rename(temp, this.localFile);
    await this.store.put(LEDGER_KEY, data, { size: data.length, contentType: 'application/json' });
  }

  /** The ledger from the repository, else from the local file; undefined when nothing is paused. */
  async read(): Promise<LedgerEntry | undefined> {
    try {
      return JSON.parse((await readWhole(this.store, LEDGER_KEY)).toString('utf8')) as LedgerEntry;
    } catch (err) {
      // Not in the repository (or the repository is what broke): the local copy may still hold it.
      if (!(err instanceof NotFoundError) && !(err instanceof Error)) throw err;
    }
    try {
      return JSON.parse(await readFile(this.localFile, 'utf8')) as LedgerEntry;
    } catch {
      return undefined;
    }
  }

  async clear(): Promise<void> {
    await this.store.remove([LEDGER_KEY]);
    await rm(this.localFile, { force: true });
  }
}
