import { createWriteStream, type Dirent } from 'node:fs';
import { mkdir, open, opendir, rename, rm, stat, unlink } from 'node:fs/promises';
import { dirname, join, sep } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { randomBytes } from 'node:crypto';
import { compareKeys, readRows, ScratchDir, sortByKey } from './sorted.js';
import { ACCESS_DENIED, NotFoundError, PreconditionFailedError, StoreError, type ObjectInfo, type ObjectStore, type PutOptions } from './store.js';

const TEMP_MARK = '.pbtmp-';
/** A directory with more names than this is sorted through scratch files, in runs of this size. */
const NAMES_IN_MEMORY = 50_000;

/**
 * An object store in a local directory. A put writes a temporary file, fsyncs it and renames it
 * into place, so a crash never leaves a partial object under its final name.
 */
export class FsObjectStore implements ObjectStore {
  readonly description: string;

  constructor(
    readonly root: string,
    private readonly options: { namesInMemory?: number } = {},
  ) {
    this.description = `file://${root}`;
  }

  async check(): Promise<void> {
    let info;
    try {
      info = await stat(this.root);
    } catch {
      throw new StoreError(`${this.description} does not exist; create the directory first`, false);
    }
    if (!info.isDirectory()) throw new StoreError(`${this.description} is not a directory`, false);
  }

  /**
   * Walks the tree in key order (S3's: UTF-8 bytes), one directory at a time: a directory sorts
   * as its name plus '/', which places its keys exactly where they fall among its siblings'. Names
   * are sorted in memory up to NAMES_IN_MEMORY per directory; a larger directory (Pachyderm puts
   * every chunk in one) is sorted through scratch files in $TMPDIR, so memory does not grow with
   * it. Each file is stat'ed as it is reached. A symbolic link counts as what it points to (a
   * directory moved to another disk and linked back), as stat, get and put see it, except a link
   * to a directory the walk is inside of, which would list its keys without end.
   */
  async *list(prefix = ''): AsyncIterable<ObjectInfo> {
    yield* this.walk('', prefix, new Set());
  }

  /** `inside`: the directories (device:inode) the walk is in, this one's parents. */
  private async *walk(relDir: string, prefix: string, inside: ReadonlySet<string>): AsyncGenerator<ObjectInfo> {
    // Only descend into directories that can hold keys with the prefix.
    if (relDir !== '' && !prefix.startsWith(relDir) && !relDir.startsWith(prefix)) return;
    let within: Set<string>;
    try {
      const here = await stat(join(this.root, relDir));
      within = new Set(inside).add(`${here.dev}:${here.ino}`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw wrapFsError(err, `listing ${this.description}`);
    }
    // opendir hands out entries in small batches: only the names are kept, not a Dirent per file.
    let entries: AsyncIterator<Dirent>;
    try {
      entries = (await opendir(join(this.root, relDir), { bufferSize: 256 }))[Symbol.asyncIterator]();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw wrapFsError(err, `listing ${this.description}`);
    }
    const nextName = async (): Promise<string | undefined> => {
      for (;;) {
        let step: IteratorResult<Dirent>;
        try {
          step = await entries.next();
        } catch (err) {
          throw wrapFsError(err, `listing ${this.description}`);
        }
        if (step.done) return undefined;
        const entry = step.value;
        let kind: { isDirectory(): boolean; isFile(): boolean } = entry;
        if (entry.isSymbolicLink()) {
          // What it points to; a dangling link is no key.
          const target = await stat(join(this.root, relDir, entry.name)).catch(() => undefined);
          if (!target || (target.isDirectory() && within.has(`${target.dev}:${target.ino}`))) continue;
          kind = target;
        }
        if (kind.isDirectory()) return `${entry.name}/`;
        if (kind.isFile() && !entry.name.includes(TEMP_MARK)) return entry.name;
      }
    };
    const limit = this.options.namesInMemory ?? NAMES_IN_MEMORY;
    const names: string[] = [];
    for (let name = await nextName(); name !== undefined; name = names.length < limit ? await nextName() : undefined) names.push(name);
    if (names.length < limit) {
      names.sort(compareKeys);
      yield* this.walkNames(relDir, prefix, names, within);
      return;
    }
    // A large directory: the names read so far and the rest of the directory go through a sort on disk.
    const scratch = await ScratchDir.create();
    try {
      const all = async function* (): AsyncGenerator<{ key: string }> {
        for (const key of names.splice(0)) yield { key };
        for (let key = await nextName(); key !== undefined; key = await nextName()) yield { key };
      };
      const { path: sorted } = await sortByKey(all(), scratch, 'directory-names', (item) => [item.key], readNames, limit);
      yield* this.walkNames(
        relDir,
        prefix,
        (async function* () {
          for await (const { key } of readNames(sorted)) yield key;
        })(),
        within,
      );
    } finally {
      await entries.return?.().catch(() => undefined);
      await scratch.remove();
    }
  }

  /** `inside`: the directories (device:inode) the walk is in, this one included. */
  private async *walkNames(relDir: string, prefix: string, names: AsyncIterable<string> | Iterable<string>, inside: ReadonlySet<string>): AsyncGenerator<ObjectInfo> {
    for await (const name of names) {
      const rel = `${relDir}${name}`;
      if (name.endsWith('/')) {
        yield* this.walk(rel, prefix, inside);
        continue;
      }
      if (!rel.startsWith(prefix)) continue;
      let info;
      try {
        info = await stat(join(this.root, rel));
      } catch (err) {
        // Removed since the directory was read: a listing taken a moment later would not have it either.
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw wrapFsError(err, `listing ${this.description}`);
      }
      yield { key: rel, size: info.size, etag: `${info.mtimeMs}-${info.size}` };
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    try {
      const info = await stat(this.pathOf(key));
      return info.isFile() ? { key, size: info.size, etag: `${info.mtimeMs}-${info.size}` } : undefined;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw wrapFsError(err, `stat ${key}`);
    }
  }

  async get(key: string): Promise<Readable> {
    const path = this.pathOf(key);
    const handle = await open(path, 'r').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') throw new NotFoundError(`${key} not found in ${this.description}`);
      throw wrapFsError(err, `reading ${key}`);
    });
    // Buffers sized to the file: a 64 KiB read buffer per small object is garbage that makes V8
    // collect far more often than the live heap needs (external memory counts toward GC pressure).
    const { size } = await handle.stat().catch(async (err: unknown) => {
      await handle.close();
      throw wrapFsError(err, `reading ${key}`);
    });
    return handle.createReadStream({ autoClose: true, highWaterMark: Math.min(64 * 1024, Math.max(1024, size)) });
  }

  async put(key: string, body: Readable | Buffer, options: PutOptions = {}, signal?: AbortSignal): Promise<void> {
    const path = this.pathOf(key);
    await mkdir(dirname(path), { recursive: true }).catch((err: unknown) => {
      throw wrapFsError(err, `creating the directory for ${key}`);
    });
    const temp = `${path}${TEMP_MARK}${randomBytes(6).toString('hex')}`;
    try {
      // flush: fsync before close, so the rename below never exposes unwritten data after a crash.
      const out = createWriteStream(temp, { flags: 'wx', flush: true });
      await pipeline(Buffer.isBuffer(body) ? Readable.from([body]) : body, out, signal ? { signal } : {});
      if (options.ifNoneMatch) {
        // link() fails if the target exists: an atomic create-if-absent on POSIX filesystems.
        const { link } = await import('node:fs/promises');
        try {
          await link(temp, path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new PreconditionFailedError(`${key} already exists in ${this.description}`);
          throw err;
        }
        await unlink(temp);
      } else {
        await rename(temp, path);
      }
    } catch (err) {
      await rm(temp, { force: true });
      if (err instanceof StoreError) throw err;
      throw wrapFsError(err, `writing ${key}`);
    }
  }

  async remove(keys: string[]): Promise<void> {
    for (const key of keys) await rm(this.pathOf(key), { force: true });
  }

  private pathOf(key: string): string {
    if (key === '' || key.startsWith('/') || key.split('/').some((part) => part === '..' || part === '.' || part === '')) {
      throw new StoreError(`refusing key "${key}": empty, absolute or with "." / ".." segments`, false);
    }
    return join(this.root, key.split('/').join(sep));
  }
}

function wrapFsError(err: unknown, doing: string): StoreError {
  const e = err as NodeJS.ErrnoException;
  const hint =
    e.code === 'ENOSPC' ? ': no space left on the device'
    : e.code === 'EACCES' || e.code === 'EPERM' ? ': permission denied'
    : e.code === 'EROFS' ? ': read-only filesystem'
    : `: ${e.code ?? e.message}`;
  const denied = e.code === 'EACCES' || e.code === 'EPERM' || e.code === 'EROFS';
  return new StoreError(`${doing}${hint}`, false, { cause: err, ...(denied ? { code: ACCESS_DENIED } : {}) });
}

async function* readNames(path: string): AsyncGenerator<{ key: string }> {
  for await (const [key] of readRows(path)) yield { key: key as string };
}
