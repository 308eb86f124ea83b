/**
 * Key-ordered streams, so a backup's memory does not grow with the number of objects: every
 * listing (S3 ListObjectsV2, the directory store), every index the repository writes and the
 * referenced-key list the database returns are in one order — UTF-8 byte order, which is Unicode
 * code point order — and are merged as streams instead of being held in maps. What must outlive a
 * pass goes to a scratch file on local disk, one JSON array per line.
 */
import { once } from 'node:events';
import { createReadStream, createWriteStream, type WriteStream } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

/**
 * Compares two keys in UTF-8 byte order (= code point order). JavaScript's `<` compares UTF-16
 * code units, which agrees except between a surrogate pair (U+10000 and up) and U+E000–U+FFFF.
 */
export function compareKeys(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    if (x >= 0xd800 && y >= 0xd800) {
      // Surrogates (D800–DFFF) stand for code points above FFFF: they sort after E000–FFFF.
      const rank = (c: number): number => (c >= 0xd800 && c <= 0xdfff ? c + 0x2000 : c >= 0xe000 ? c - 0x800 : c);
      return rank(x) - rank(y);
    }
    return x - y;
  }
  return a.length - b.length;
}

export class KeyOrderError extends Error {
  override name = 'KeyOrderError';
}

/** Passes items through, failing if a key is not strictly greater than the one before it. */
export async function* inKeyOrder<T extends { key: string }>(items: AsyncIterable<T> | Iterable<T>, what: string): AsyncGenerator<T> {
  let previous: string | undefined;
  for await (const item of items) {
    if (previous !== undefined && compareKeys(previous, item.key) >= 0) {
      throw new KeyOrderError(`${what} is not in key order (${JSON.stringify(item.key)} after ${JSON.stringify(previous)}); pachbackup needs listings in UTF-8 byte order, as S3 returns them`);
    }
    previous = item.key;
    yield item;
  }
}

/** A forward-only reader of a key-ordered stream: `seek` returns the item with a key, skipping smaller ones. */
export class Cursor<T extends { key: string }> {
  readonly #iterator: AsyncIterator<T>;
  #head: T | undefined;
  #started = false;
  #done = false;

  constructor(items: AsyncIterable<T>) {
    this.#iterator = items[Symbol.asyncIterator]();
  }

  /** The next item not yet passed, without consuming it; undefined at the end. */
  async peek(): Promise<T | undefined> {
    if (!this.#started) {
      this.#started = true;
      await this.#advance();
    }
    return this.#head;
  }

  /** Skips every item with a key below `key`, calling `skipped` for each; returns the item with `key`, if any. */
  async seek(key: string, skipped?: (item: T) => void): Promise<T | undefined> {
    for (let head = await this.peek(); head; head = await this.peek()) {
      const order = compareKeys(head.key, key);
      if (order > 0) return undefined;
      await this.#advance();
      if (order === 0) return head;
      skipped?.(head);
    }
    return undefined;
  }

  /** Consumes what is left, calling `skipped` for each item. */
  async drain(skipped: (item: T) => void): Promise<void> {
    for (let head = await this.peek(); head; head = await this.peek()) {
      await this.#advance();
      skipped(head);
    }
  }

  async close(): Promise<void> {
    if (!this.#done) await this.#iterator.return?.();
    this.#done = true;
  }

  async #advance(): Promise<void> {
    if (this.#done) {
      this.#head = undefined;
      return;
    }
    const next = await this.#iterator.next();
    if (next.done) {
      this.#done = true;
      this.#head = undefined;
    } else {
      this.#head = next.value;
    }
  }
}

/** Merges two key-ordered streams into one (a key in both is taken from `a`). */
export async function* mergeByKey<T extends { key: string }>(a: AsyncIterable<T>, b: AsyncIterable<T> | Iterable<T>): AsyncGenerator<T> {
  const left = new Cursor(a);
  const right = new Cursor(toAsync(b));
  try {
    for (;;) {
      const x = await left.peek();
      const y = await right.peek();
      if (!x && !y) return;
      const order = !y ? -1 : !x ? 1 : compareKeys(x.key, y.key);
      if (order <= 0) {
        await left.seek(x!.key);
        if (order === 0) await right.seek(y!.key);
        yield x!;
      } else {
        await right.seek(y!.key);
        yield y!;
      }
    }
  } finally {
    await left.close();
    await right.close();
  }
}

/**
 * Sorts items by key with memory bounded by `runSize`: runs of at most that many items are sorted
 * in memory and written to scratch files, then merged (a balanced tree of two-way merges). A key
 * that occurs more than once keeps its last occurrence. Returns the sorted file, written with
 * `toRow` and to be read back with `readBack`.
 */
export async function sortByKey<T extends { key: string }>(
  items: AsyncIterable<T>,
  scratch: ScratchDir,
  name: string,
  toRow: (item: T) => unknown[],
  readBack: (path: string) => AsyncIterable<T>,
  runSize = 50_000,
): Promise<{ path: string; count: number }> {
  const runs: Array<{ path: string; count: number }> = [];
  let buffer: T[] = [];
  const writeRun = async (sorted: AsyncIterable<T> | T[], file: string): Promise<{ path: string; count: number }> => {
    const out = new RowWriter(file);
    try {
      for await (const item of sorted) await out.write(toRow(item));
    } finally {
      await out.close();
    }
    return { path: out.path, count: out.rows };
  };
  const flush = async (): Promise<void> => {
    // Array.prototype.sort is stable: among equal keys the last pushed stays last, and is kept.
    buffer.sort((a, b) => compareKeys(a.key, b.key));
    const unique = buffer.filter((item, i) => i === buffer.length - 1 || buffer[i + 1]!.key !== item.key);
    buffer = [];
    runs.push(await writeRun(unique, scratch.file(`${name}-run${runs.length}`)));
  };
  for await (const item of items) {
    buffer.push(item);
    if (buffer.length >= runSize) await flush();
  }
  if (buffer.length > 0 || runs.length === 0) await flush();
  if (runs.length === 1) return runs[0]!;
  // Later runs hold later items: mergeByKey takes a key found in both from its first argument.
  const merge = (lo: number, hi: number): AsyncIterable<T> => {
    if (hi - lo === 1) return readBack(runs[lo]!.path);
    const mid = (lo + hi) >> 1;
    return mergeByKey(merge(mid, hi), merge(lo, mid));
  };
  return writeRun(merge(0, runs.length), scratch.file(name));
}

async function* toAsync<T>(items: AsyncIterable<T> | Iterable<T>): AsyncGenerator<T> {
  yield* items;
}

const SCRATCH_PREFIX = 'pachbackup-scratch-';

async function removeAbandoned(base: string): Promise<void> {
  let names: string[];
  try {
    names = await readdir(base);
  } catch {
    return;
  }
  for (const name of names) {
    const pid = Number(/^pachbackup-scratch-(\d+)-/.exec(name)?.[1]);
    if (!pid || pid === process.pid || isRunning(pid)) continue;
    await rm(join(base, name), { recursive: true, force: true }).catch(() => undefined);
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it runs, as another user.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A directory of scratch files for one run, removed with everything in it by `remove()`. */
export class ScratchDir {
  #seq = 0;
  private constructor(readonly path: string) {}

  /**
   * Creates `pachbackup-scratch-<pid>-<random>` under `base`, first removing directories that
   * processes no longer running left behind (a backup killed with -9 cannot clean up after itself).
   */
  static async create(base = tmpdir()): Promise<ScratchDir> {
    await removeAbandoned(base);
    return new ScratchDir(await mkdtemp(join(base, `${SCRATCH_PREFIX}${process.pid}-`)));
  }

  /** A new file name in the directory (the file is created by its writer). */
  file(name: string): string {
    return join(this.path, `${String(++this.#seq).padStart(3, '0')}-${name}.jsonl`);
  }

  async remove(): Promise<void> {
    await rm(this.path, { recursive: true, force: true });
  }
}

/** Writes rows (JSON arrays) to a scratch file, one per line, waiting whenever the disk is behind. */
export class RowWriter {
  readonly #out: WriteStream;
  #failed: Error | undefined;
  rows = 0;

  constructor(readonly path: string) {
    this.#out = createWriteStream(path);
    this.#out.on('error', (err) => {
      this.#failed = err;
    });
  }

  async write(row: unknown[]): Promise<void> {
    if (this.#failed) throw this.#failed;
    this.rows++;
    if (!this.#out.write(`${JSON.stringify(row)}\n`)) await once(this.#out, 'drain');
  }

  /** Flushes and closes the file; safe to call again. */
  async close(): Promise<void> {
    if (!this.#out.writableEnded) this.#out.end();
    if (!this.#out.closed) await once(this.#out, 'close');
    if (this.#failed) throw this.#failed;
  }
}

/** Reads back the rows a RowWriter wrote. */
export async function* readRows(path: string): AsyncGenerator<unknown[]> {
  const lines = createInterface({ input: createReadStream(path), crlfDelay: Infinity });
  try {
    for await (const line of lines) if (line !== '') yield JSON.parse(line) as unknown[];
  } finally {
    lines.close();
  }
}
