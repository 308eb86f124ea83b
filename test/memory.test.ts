/**
 * Issue 4, "memory bounded by concurrency, not by object count": a backup, an unchanged second
 * backup, a verify and a prune of many small objects each complete inside a V8 heap far too small to hold
 * per-object state for all of them (before the key-ordered streaming merge, a backup needed about
 * 2.5 KB of live heap per object: 40,000 objects would need ~100 MiB on top of the baseline).
 * Real PostgreSQL 15, real directory stores, the CLI as a child process with --max-old-space-size.
 * This checks a bound on memory, not a time.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { describeRun, TestCluster } from './helpers/cluster.js';

const OBJECTS = 40_000;
/** MiB of V8 old space: the live heap measured ~20 MiB (baseline included) and V8 needs room above it; 40,000 objects at 2.5 KB would not fit. */
const HEAP_MIB = 64;

describe(`memory: ${OBJECTS} objects within a ${HEAP_MIB} MiB heap`, () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: 10 })) as TestCluster;
    // Unreferenced objects written straight into the cluster bucket: the bookkeeping, not the bytes, is under test.
    for (let dir = 0; dir < 4; dir++) {
      const path = join(cluster.dirs!.cluster, `bulk-${dir}`);
      await mkdir(path, { recursive: true });
      const names = Array.from({ length: OBJECTS / 4 }, () => randomBytes(16).toString('hex'));
      for (let i = 0; i < names.length; i += 500) {
        await Promise.all(names.slice(i, i + 500).map((name) => writeFile(join(path, name), randomBytes(64))));
      }
    }
  });
  after(async () => cluster?.cleanup());

  test('first backup, unchanged second backup and verify all complete; the second holds every object without copying', { timeout: 900_000 }, async () => {
    const config = await cluster.writeConfig((raw) => {
      raw.pause.quiescence = { settleSeconds: 0 };
    });
    const env = { NODE_OPTIONS: `--max-old-space-size=${HEAP_MIB}` };
    const total = OBJECTS + 10;

    const first = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], { env, timeoutMs: 800_000 });
    assert.equal(first.code, 0, describeRun(first));
    assert.equal(first.result?.objects.count, total);
    assert.equal(first.result?.objects.newCount, total);

    const second = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], { env, timeoutMs: 800_000 });
    assert.equal(second.code, 0, describeRun(second));
    assert.equal(second.result?.objects.count, total);
    assert.equal(second.result?.objects.newCount, 0, 'nothing copied again');
    assert.equal(second.result?.objects.heldCount, total);

    const verify = await cluster.runCli(['--config', config, '--json', 'verify', String(second.result?.id)], { env, timeoutMs: 800_000 });
    assert.equal(verify.code, 0, describeRun(verify));
    assert.equal(verify.result?.checked.objects, total);

    // A quarter of the objects leave the cluster; a third backup no longer holds them, and a prune
    // keeping only it sweeps exactly those (the mark streams the kept index against the listing).
    await rm(join(cluster.dirs!.cluster, 'bulk-0'), { recursive: true });
    const third = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], { env, timeoutMs: 800_000 });
    assert.equal(third.code, 0, describeRun(third));
    assert.equal(third.result?.objects.count, total - OBJECTS / 4);
    const prune = await cluster.runCli(['--config', config, '--json', 'prune', '--keep-last', '1'], { env, timeoutMs: 800_000 });
    assert.equal(prune.code, 0, describeRun(prune));
    assert.equal(prune.result?.removed.length, 2);
    assert.deepEqual(prune.result?.objects && { removed: prune.result.objects.removed, kept: prune.result.objects.kept }, { removed: OBJECTS / 4, kept: total - OBJECTS / 4 });
  });
});
