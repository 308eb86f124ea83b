/**
 * Damage in a filesystem repository, made by editing its files directly: `verify` must name each
 * corrupt or missing item and exit non-zero, and `restore` must refuse such a backup (or, for a
 * corruption only a full read can see, fail and take back what it wrote) without leaving
 * databases on the target server or objects in the target store.
 */
import assert from 'node:assert/strict';
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { compareFingerprints, describeRun, TestCluster, type Fingerprints } from './helpers/cluster.js';

const EXIT_FAILED = 1;

function escape(text: string): RegExp {
  return new RegExp(text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
}

describe('verify and restore on a damaged filesystem repository', () => {
  let cluster: TestCluster;
  let config: string;
  let id: string;
  let before_: Fingerprints;
  let dumpFile: string;
  let dumpPath: string;

  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 20 })) as TestCluster;
    before_ = await cluster.sourceFingerprints();
    id = (await cluster.backup()).id;
    config = await cluster.writeConfig();
    dumpPath = `backups/${id}/db/pachyderm.dump`;
    dumpFile = join(cluster.repositoryDir!, dumpPath);
  });
  after(async () => {
    await cluster?.cleanup();
  });

  /** Flips one byte in the middle of a file (same size), returning a function that flips it back. */
  async function flipByte(file: string): Promise<() => Promise<void>> {
    const original = await readFile(file);
    const damaged = Buffer.from(original);
    const at = Math.floor(damaged.length / 2);
    damaged[at] = damaged[at]! ^ 0xff;
    await writeFile(file, damaged);
    return () => writeFile(file, original);
  }

  /** Moves an object out of the repository, returning a function that puts it back. */
  async function removeObject(key: string): Promise<() => Promise<void>> {
    const file = join(cluster.repositoryDir!, 'objects', key);
    const aside = join(cluster.work, 'object-aside');
    await rename(file, aside);
    return () => rename(aside, file);
  }

  async function verify(json = false) {
    return cluster.runCli(['--config', config, ...(json ? ['--json'] : []), 'verify', id]);
  }

  /** A restore that must fail, leaving the target server and store as they were (empty). */
  async function refusedRestore(names: RegExp[]): Promise<void> {
    const run = await cluster.runCli(['--config', config, '--yes', 'restore', id], { timeoutMs: 120_000 });
    assert.equal(run.code, EXIT_FAILED, describeRun(run));
    for (const pattern of names) assert.match(run.stderr, pattern, describeRun(run));
    assert.deepEqual(await cluster.targetDatabases(), [], 'no target database created (or left)');
    assert.deepEqual(await cluster.restoredKeys(), [], 'the target store is empty');
  }

  test('an intact backup verifies (exit 0)', { timeout: 120_000 }, async () => {
    const run = await verify();
    assert.equal(run.code, 0, describeRun(run));
    assert.match(run.stdout, /verified/);
    const json = await verify(true);
    assert.equal(json.code, 0, describeRun(json));
    assert.equal(json.result?.ok, true);
    assert.equal(json.result?.checked.objects, 20);
    assert.equal(json.result?.checked.dumps, 2);
  });

  test('one flipped byte in a dump: verify names the dump, restore refuses', { timeout: 300_000 }, async () => {
    const repair = await flipByte(dumpFile);
    try {
      const run = await verify();
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stdout, /FAILED verification: 1 problem/, describeRun(run));
      assert.match(run.stdout, /dump of database pachyderm/, describeRun(run));
      assert.match(run.stdout, escape(dumpPath), describeRun(run));
      assert.match(run.stdout, /checksum mismatch/, describeRun(run));
      const json = await verify(true);
      assert.equal(json.code, EXIT_FAILED, describeRun(json));
      assert.equal(json.result?.ok, false);
      assert.equal(json.result?.problems.length, 1);
      assert.match(json.result?.problems[0].item, escape(dumpPath));

      await refusedRestore([escape(dumpPath), /pachyderm/, /refused/]);
    } finally {
      await repair();
    }
  });

  test('one missing object: verify names the object, restore refuses', { timeout: 300_000 }, async () => {
    const key = cluster.fixture.keys[3]!;
    const repair = await removeObject(key);
    try {
      const run = await verify();
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stdout, /FAILED verification: 1 problem/, describeRun(run));
      assert.match(run.stdout, escape(`object ${key}: missing`), describeRun(run));
      await refusedRestore([escape(key), /missing/, /refused/]);
    } finally {
      await repair();
    }
  });

  test('a flipped byte in a dump and a missing object together: verify names both', { timeout: 300_000 }, async () => {
    const key = cluster.fixture.keys[7]!;
    const repairDump = await flipByte(dumpFile);
    const repairObject = await removeObject(key);
    try {
      const run = await verify(true);
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      const items = (run.result?.problems as Array<{ item: string; problem: string }>).map((p) => p.item).sort();
      assert.equal(items.length, 2, JSON.stringify(run.result?.problems));
      assert.match(items.join('\n'), escape(dumpPath));
      assert.match(items.join('\n'), escape(`object ${key}`));
      await refusedRestore([/refused/]);
    } finally {
      await repairObject();
      await repairDump();
    }
  });

  test('one flipped byte in an object (same size): verify names it; restore fails and leaves nothing behind', { timeout: 300_000 }, async () => {
    const key = cluster.fixture.keys[11]!;
    const repair = await flipByte(join(cluster.repositoryDir!, 'objects', key));
    try {
      const run = await verify();
      assert.equal(run.code, EXIT_FAILED, describeRun(run));
      assert.match(run.stdout, escape(`object ${key}: checksum mismatch`), describeRun(run));
      await refusedRestore([escape(key)]);
    } finally {
      await repair();
    }
  });

  test('once repaired, the backup verifies again and restores equal to the source', { timeout: 300_000 }, async () => {
    const run = await verify();
    assert.equal(run.code, 0, describeRun(run));
    const restore = await cluster.runCli(['--config', config, '--yes', 'restore', id], { timeoutMs: 120_000 });
    assert.equal(restore.code, 0, describeRun(restore));
    assert.deepEqual(compareFingerprints(before_, await cluster.restoredFingerprints()), []);
  });
});
