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
 *
 * An entry belongs to the backup it names. A backup that stalled until its lock went stale may find
 * that another backup took its pause over (resumed it from this ledger) and paused the cluster
 * itself: that backup's entry is then the only record of the pause in force, so `write` and
 * `clear` leave another backup's entry alone, in each place separately (the repository copy is
 * shared by every host, the local file only by runs on this one). The check is a read before the
 * write or removal, not an atomic compare (not every S3 service has conditional deletes): the
 * backup lock is what keeps two backups apart, and this guards the run that lost it.
 */
export class PauseLedger {
  readonly localFile: string;

  constructor(private readonly store: ObjectStore, repositoryId: string) {
    this.localFile = join(localStateDir(), `pause-ledger-${repositoryId}.json`);
  }

  /** Writes the entry, unless another backup's entry is there: then nothing is written and that entry is returned. */
  async write(entry: LedgerEntry): Promise<LedgerEntry | undefined> {
    const other = await this.ownedByOther(entry.backupId);
    if (other) return other;
    const data = Buffer.from(`${JSON.stringify(entry, null, 2)}\n`);
    await mkdir(localStateDir(), { recursive: true, mode: 0o700 });
    const temp = `${this.localFile}.tmp`;
    await writeFile(temp, data, { mode: 0o600 });
    await rename(temp, this.localFile);
    await this.store.put(LEDGER_KEY, data, { size: data.length, contentType: 'application/json' });
    return undefined;
  }

  /** The ledger from the repository, else from the local file; undefined when nothing is paused. */
  async read(): Promise<LedgerEntry | undefined> {
    try {
      const text = await this.repositoryText();
      if (text !== undefined) return JSON.parse(text) as LedgerEntry;
    } catch {
      // The repository is what broke: the local copy may still hold it.
    }
    try {
      return JSON.parse(await readFile(this.localFile, 'utf8')) as LedgerEntry;
    } catch {
      return undefined;
    }
  }

  /**
   * The entry in the repository (shared by every host); undefined only when there is none. A read
   * that fails, or an entry that cannot be parsed, throws.
   */
  async repositoryEntry(): Promise<LedgerEntry | undefined> {
    const text = await this.repositoryText();
    if (text === undefined) return undefined;
    const entry = parseEntry(text);
    if (!entry) throw new Error(`${LEDGER_KEY} cannot be parsed`);
    return entry;
  }

  /** Another backup's entry, in the repository or in the local file; undefined when neither names another backup. */
  async ownedByOther(backupId: string): Promise<LedgerEntry | undefined> {
    const { repository, local } = await this.entries();
    return [repository, local].find((e) => namesAnother(e, backupId));
  }

  /**
   * Removes `backupId`'s entry from the repository and the local file. Another backup's entry is
   * left where it is found, and returned.
   */
  async clear(backupId: string): Promise<LedgerEntry | undefined> {
    const { repository, local } = await this.entries();
    if (!namesAnother(repository, backupId)) await this.store.remove([LEDGER_KEY]);
    if (!namesAnother(local, backupId)) await rm(this.localFile, { force: true });
    return [repository, local].find((e) => namesAnother(e, backupId));
  }

  /** Each place's entry: undefined where there is none, or where it cannot be parsed (nobody's). A read that fails throws. */
  private async entries(): Promise<{ repository: LedgerEntry | undefined; local: LedgerEntry | undefined }> {
    const text = await this.repositoryText();
    const repository = text === undefined ? undefined : parseEntry(text);
    let local: LedgerEntry | undefined;
    try {
      local = parseEntry(await readFile(this.localFile, 'utf8'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    return { repository, local };
  }

  /** The repository copy's text; undefined when there is none. A read that fails throws. */
  private async repositoryText(): Promise<string | undefined> {
    try {
      return (await readWhole(this.store, LEDGER_KEY)).toString('utf8');
    } catch (err) {
      if (err instanceof NotFoundError) return undefined;
      throw err;
    }
  }
}

function namesAnother(entry: LedgerEntry | undefined, backupId: string): boolean {
  return entry !== undefined && entry.backupId !== backupId;
}

/** Names the backup an entry belongs to, for messages: `backup <id> (pid <pid> on <host>)`. */
export function describeOwner(entry: LedgerEntry): string {
  return `backup ${entry.backupId} (pid ${entry.pid} on ${entry.host})`;
}

/** For messages about another backup's entry: whose it is, and which pause it records. */
export function ownedBy(entry: LedgerEntry): string {
  return `the pause ledger belongs to ${describeOwner(entry)} now (its pause of ${entry.record.target}, since ${entry.record.startedAt})`;
}

function parseEntry(text: string): LedgerEntry | undefined {
  try {
    const entry = JSON.parse(text) as LedgerEntry;
    return typeof entry?.backupId === 'string' ? entry : undefined;
  } catch {
    return undefined;
  }
}
