/**
 * A cluster object replaced by one of another size after the listing, before its copy: the
 * backup fails at once with one clear error naming the key ("changed during the backup"), instead
 * of retrying an upload whose body no longer has its declared length eight times and reporting
 * the transport's complaint. Real CLI process, real PostgreSQL and real stores (a directory, and
 * s3rver with the copy streamed through pachbackup into an S3 repository); the copy engine alone
 * for what a real store cannot stage (an object deleted while its read is under way).
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test, type TestContext } from 'node:test';
import { addChunks } from '../src/demo/pachydermFixture.js';
import { copyMissingObjects, CopyJournal, ServerSideCopier } from '../src/engine/objects.js';
import { startFaultProxy, type FaultProxy } from '../src/objectstore/faultProxy.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import type { RetryPolicy } from '../src/objectstore/retry.js';
import { NotFoundError, SOURCE_CHANGED, StoreError, type ObjectInfo, type ObjectStore } from '../src/objectstore/store.js';
import { Repository } from '../src/repository/repository.js';
import { describeRun, TestCluster, type StoreKind } from './helpers/cluster.js';

const EXIT_FAILED = 1;
const CHUNK_SIZE = 4096;
/** Long enough for the test to replace the object while its read waits, short next to a test's timeout. */
const READ_DELAY_MS = 3000;

/** One line of docs/reliability.md; the report adds the test's outcome. */
function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

/** Resolves at the first JSON event on the child's stdout that `match` accepts. */
function whenEvent(child: ChildProcess, match: (event: Record<string, any>) => boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    let pending = '';
    const onData = (data: Buffer): void => {
      pending += data.toString();
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const line of lines) {
        if (!line.startsWith('{')) continue;
        if (match(JSON.parse(line) as Record<string, any>)) {
          child.stdout!.off('data', onData);
          resolve();
          return;
        }
      }
    };
    child.stdout!.on('data', onData);
    child.once('close', () => reject(new Error('the backup ended before the awaited event')));
  });
}

// With s3rver, the cluster bucket is read through a pass-through TCP proxy: another endpoint than
// the repository's, so objects are not copied server-side but streamed into the S3 repository
// with single PUTs of the listed length (the path whose upload fails when the body differs).
for (const kind of ['fs', 's3rver'] as StoreKind[]) {
  describe(`a cluster object replaced by one of another size after the listing (${kind})`, () => {
    let cluster: TestCluster;
    let proxy: FaultProxy | undefined;
    before(async () => {
      cluster = (await TestCluster.create({ kind, target: false, chunks: 8, chunkSize: CHUNK_SIZE })) as TestCluster;
      if (kind === 's3rver') {
        const endpoint = new URL(cluster.s3!.endpoint);
        proxy = await startFaultProxy({ target: { host: endpoint.hostname, port: Number(endpoint.port) } });
      }
    });
    after(async () => {
      await proxy?.close();
      await cluster?.cleanup();
    });

    const cases = [
      { what: 'shorter', size: 1000, phase: 'precopy', args: [] as string[], seed: 41, marker: [] as string[] },
      { what: 'longer', size: 6000, phase: 'copy', args: ['--no-precopy'], seed: 42, marker: ['paused', 'resumed'] },
    ];
    for (const c of cases) {
      test(`replaced by a ${c.what} one during the ${c.phase === 'precopy' ? 'pre-copy' : 'paused copy'}: one error naming the key, not retried, nothing sealed, not left paused`, { timeout: 300_000 }, async (t) => {
        await cluster.resetMarker();
        // A new chunk, so that this run has it to copy whatever the earlier runs copied.
        const [victim] = (await addChunks(cluster.source, cluster.clusterStore(), 1, { seed: c.seed, chunkSize: CHUNK_SIZE })).keys;
        const sealedBefore = await cluster.sealedBackups();
        const config = await cluster.writeConfig((raw) => {
          if (proxy) raw.cluster.objectStore.endpoint = `http://${proxy.address}`;
        });
        const { child, done } = cluster.spawnCli(['--config', config, '--json', '--yes', 'backup', ...c.args], {
          // The victim's read waits before it opens the object: the test replaces it meanwhile.
          env: { PACHBACKUP_FAULTS: JSON.stringify([{ store: 'cluster.objectStore', op: 'get', keyContains: victim, kind: 'delay', ms: READ_DELAY_MS }]) },
        });
        let replaced = false;
        // The phase's first progress event comes once its listing is complete, before any copy starts.
        const replacing = whenEvent(child, (e) => e.type === 'progress' && e.phase === c.phase).then(async () => {
          await cluster.clusterStore().put(victim!, Buffer.alloc(c.size, 0x5a), { size: c.size });
          replaced = true;
        });
        replacing.catch(() => undefined);
        const run = await done;
        await replacing.catch((err: unknown) => assert.fail(`${(err as Error).message}: ${describeRun(run)}`));
        assert.ok(replaced, 'the object was replaced while the backup ran');

        assert.equal(run.code, EXIT_FAILED, describeRun(run));
        const errors = run.events.filter((e) => e.type === 'error');
        assert.equal(errors.length, 1, `exactly one error: ${describeRun(run)}`);
        const expected = `object ${victim} was ${CHUNK_SIZE} bytes when listed but is ${c.size} bytes now; it changed during the backup`;
        assert.ok(String(errors[0]!.message).includes(expected), `the error names the key and the change (${expected}): ${describeRun(run)}`);
        assert.equal(run.stderr.match(/pachbackup: error: /g)?.length, 1, describeRun(run));
        assert.doesNotMatch(run.stderr, /declared|ran past|ended after/, `not the upload's complaint: ${describeRun(run)}`);
        // Every first retry of a cause is reported as a warning as it happens: none means no retry.
        const retried = run.events.filter((e) => e.type === 'warning' && /retrying/.test(String(e.message)));
        assert.deepEqual(retried, [], `the copy was not retried: ${describeRun(run)}`);

        assert.deepEqual(await cluster.sealedBackups(), sealedBefore, 'nothing sealed');
        assert.deepEqual(await cluster.markerLines(), c.marker, c.marker.length === 0 ? 'never paused' : 'paused once, then resumed');
        const status = await cluster.runCli(['--config', config, '--json', 'status']);
        assert.equal(status.code, 0, describeRun(status));
        assert.equal(status.result?.paused, false, 'status: not paused');
        record(t, {
          category: 'object store',
          fault: `a cluster object replaced by a ${c.what} one (${CHUNK_SIZE} -> ${c.size} bytes) after the listing, before its ${c.phase === 'precopy' ? 'pre-copy' : 'copy while paused'} (${kind === 'fs' ? 'directory stores' : 's3rver, streamed into an S3 repository'})`,
          runs: 1,
          detail: `refused at once, not retried: "${errors[0]!.message.replace(victim!, 'chunk/<key>')}"; nothing sealed, ${c.marker.length === 0 ? 'never paused' : 'resumed'}`,
        });
      });
    }

    test('run again, the backup copies the objects as they are now and verifies', { timeout: 300_000 }, async () => {
      const config = await cluster.writeConfig((raw) => {
        if (proxy) raw.cluster.objectStore.endpoint = `http://${proxy.address}`;
      });
      const run = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
      assert.equal(run.code, 0, describeRun(run));
      const verify = await cluster.runCli(['--config', config, '--json', 'verify', run.result!.id]);
      assert.equal(verify.code, 0, describeRun(verify));
    });
  });
}

/**
 * A cluster store whose reads and stats follow a script: the n-th get returns `bodies[n]` (the
 * last one again after that), and stat answers what `stat` says now. Counts both calls.
 */
class ScriptedSource implements ObjectStore {
  readonly description = 'scripted://cluster-bucket';
  gets = 0;
  stats = 0;
  constructor(
    private readonly bodies: Buffer[],
    private readonly now: () => ObjectInfo | undefined,
  ) {}
  async *list(): AsyncIterable<ObjectInfo> {}
  async stat(): Promise<ObjectInfo | undefined> {
    this.stats++;
    return this.now();
  }
  async get(): Promise<Readable> {
    const body = this.bodies[Math.min(this.gets, this.bodies.length - 1)]!;
    this.gets++;
    return Readable.from([body]);
  }
  async put(): Promise<void> {
    throw new Error('not a target');
  }
  async remove(): Promise<void> {
    throw new Error('not a target');
  }
  async check(): Promise<void> {}
}

describe('a streamed copy whose bytes differ from the listed size (the copy engine, directory repository)', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pb-changed-'));
  });
  after(async () => rm(dir, { recursive: true, force: true }));

  const info: ObjectInfo = { key: 'chunk/0a1b2c', size: 100 };
  const whole = Buffer.alloc(100, 1);

  async function copy(source: ScriptedSource): Promise<{ retries: number; error?: unknown }> {
    let retries = 0;
    const retry: RetryPolicy = { attempts: 8, baseDelayMs: 1, maxDelayMs: 2, onRetry: () => retries++ };
    const repo = new Repository(new FsObjectStore(await mkdtemp(join(dir, 'repo-'))));
    try {
      await copyMissingObjects({ source, repo, retry, concurrency: 1, journal: new CopyJournal(repo, 'test'), emit: () => undefined, phase: 'copy', objects: [info], held: new Map() });
      return { retries };
    } catch (error) {
      return { retries, error };
    }
  }

  test('the object now has another size: a permanent error naming the key, read once, asked once', async () => {
    const source = new ScriptedSource([Buffer.alloc(40, 2)], () => ({ key: info.key, size: 40 }));
    const { retries, error } = await copy(source);
    assert.ok(error instanceof StoreError && !error.retryable, `a permanent StoreError: ${String(error)}`);
    assert.match(error.message, /^object chunk\/0a1b2c was 100 bytes when listed but is 40 bytes now; it changed during the backup/);
    assert.deepEqual({ retries, gets: source.gets, stats: source.stats }, { retries: 0, gets: 1, stats: 1 });
  });

  test('the object is gone: the NotFoundError a read of a vanished object meets, not retried', async () => {
    const source = new ScriptedSource([Buffer.alloc(40, 2)], () => undefined);
    const { retries, error } = await copy(source);
    assert.ok(error instanceof NotFoundError, `a NotFoundError: ${String(error)}`);
    assert.equal(error.message, `${info.key} not found in ${source.description}`);
    assert.deepEqual({ retries, gets: source.gets, stats: source.stats }, { retries: 0, gets: 1, stats: 1 });
  });

  test('the object is as listed (the read ended early): retried, and the copy succeeds', async () => {
    const source = new ScriptedSource([Buffer.alloc(40, 1), whole], () => ({ key: info.key, size: 100 }));
    const { retries, error } = await copy(source);
    assert.equal(error, undefined);
    assert.deepEqual({ retries, gets: source.gets, stats: source.stats }, { retries: 1, gets: 2, stats: 1 });
  });

  test('a copy that reads the listed size never asks the store again', async () => {
    const source = new ScriptedSource([whole], () => assert.fail('no stat on success'));
    const { retries, error } = await copy(source);
    assert.equal(error, undefined);
    assert.deepEqual({ retries, gets: source.gets, stats: source.stats }, { retries: 0, gets: 1, stats: 0 });
  });

  test("a stat that fails (after its own retries) leaves the copy's own failure to decide: retried as that failure, which is the one reported", async () => {
    const source = new ScriptedSource([Buffer.alloc(40, 1)], () => {
      throw new StoreError('stat chunk/0a1b2c: SlowDown (HTTP 503)', true, { code: 'SlowDown' });
    });
    const { retries, error } = await copy(source);
    assert.ok(error instanceof StoreError && !/SlowDown/.test(error.message) && /read 40 of its 100 bytes/.test(error.message), String(error));
    assert.deepEqual({ retries, gets: source.gets, stats: source.stats }, { retries: 7, gets: 8, stats: 8 });
  });
});

describe('server-side copies: an object that changed or vanished is that object\'s failure, not the service refusing copies', () => {
  const info: ObjectInfo = { key: 'chunk/0a1b2c', size: 100 };
  const repo = new Repository(new FsObjectStore(tmpdir()));

  test('changed (another size, or replaced between parts): thrown, and server-side copying stays on for the other objects', async () => {
    const error = new StoreError('object chunk/0a1b2c changed while it was copied in parts; it changed during the backup', false, { code: SOURCE_CHANGED });
    const copier = new ServerSideCopier(async () => {
      throw error;
    });
    await assert.rejects(copier.copy(repo, info), (err: unknown) => err === error);
    assert.equal(copier.disabled, false);
  });

  test('not found (gone, or a copy source the service misreads): this object is left to streaming, server-side copying stays on', async () => {
    const copier = new ServerSideCopier(async () => {
      throw new StoreError('server-side copy of chunk/0a1b2c: not found (NoSuchKey)', false, { code: 'NotFound' });
    });
    assert.equal(await copier.copy(repo, info), undefined);
    assert.equal(copier.disabled, false);
  });

  test('a refusal of the operation (403): server-side copying switches off with the reason, the object is left to streaming', async () => {
    const copier = new ServerSideCopier(async () => {
      throw new StoreError('server-side copy of chunk/0a1b2c: access denied (AccessDenied); check the credentials and the bucket policy', false);
    });
    assert.equal(await copier.copy(repo, info), undefined);
    assert.equal(copier.disabled, true);
    assert.match(copier.reason ?? '', /AccessDenied/);
  });
});
