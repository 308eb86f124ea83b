/**
 * Issue 6: one flipped byte in a backup's metadata — the object index, the manifest, the list of
 * referenced keys — is caught by `verify` and refused by `restore`, each naming the damaged
 * file, and the refused restore changes nothing. (A flipped byte in a dump or an object is
 * covered by the verify tests of issue 2.)
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { describeRun, TestCluster } from './helpers/cluster.js';

const EXIT_FAILED = 1;

function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

/** Flips the lowest bit of the byte in the middle of a file; returns the original bytes. */
async function flipMiddleByte(path: string): Promise<Buffer> {
  const original = await readFile(path);
  const damaged = Buffer.from(original);
  const at = Math.floor(damaged.length / 2);
  damaged[at] = damaged[at]! ^ 0x01;
  await writeFile(path, damaged);
  return original;
}

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

describe('a flipped byte in a backup\'s metadata (fs)', () => {
  let cluster: TestCluster;
  let config: string;
  let id: string;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 10 })) as TestCluster;
    config = await cluster.writeConfig();
    const backup = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    id = backup.result!.id as string;
  });
  after(async () => cluster?.cleanup());

  const cases: Array<{ item: string; file: (id: string) => string; names: (id: string) => RegExp }> = [
    { item: 'the object index', file: (id) => `backups/${id}/index.jsonl.gz`, names: (id) => new RegExp(`backups/${escape(id)}/index\\.jsonl\\.gz.*(corrupt|checksum)`) },
    { item: 'the manifest', file: (id) => `backups/${id}/manifest.json`, names: (id) => new RegExp(`backup ${escape(id)} manifest (fails its checksum|is not valid JSON|does not match the manifest schema)`) },
    { item: 'the referenced-key list', file: (id) => `backups/${id}/referenced.txt.gz`, names: (id) => new RegExp(`backups/${escape(id)}/referenced\\.txt\\.gz.*(corrupt|checksum)`) },
  ];

  for (const { item, file, names } of cases) {
    test(`${item}: verify names it and fails, restore refuses naming it and changes nothing`, { timeout: 300_000 }, async (t) => {
      const path = join(cluster.dirs!.repository, file(id));
      const original = await flipMiddleByte(path);
      try {
        const verify = await cluster.runCli(['--config', config, 'verify', id]);
        assert.equal(verify.code, EXIT_FAILED, describeRun(verify));
        assert.match(verify.stdout + verify.stderr, names(id), `verify names ${file(id)}: ${describeRun(verify)}`);
        assert.doesNotMatch(verify.stdout, /verified:/, 'verify does not claim success');

        const verifyJson = await cluster.runCli(['--config', config, '--json', 'verify', id]);
        assert.equal(verifyJson.code, EXIT_FAILED, describeRun(verifyJson));
        const jsonText = JSON.stringify(verifyJson.result ?? verifyJson.events.find((e) => e.type === 'error'));
        assert.match(jsonText, names(id), `--json output names it too: ${describeRun(verifyJson)}`);

        const restore = await cluster.runCli(['--config', config, '--yes', 'restore', id]);
        assert.equal(restore.code, EXIT_FAILED, describeRun(restore));
        assert.match(restore.stderr, /pachbackup: error: /, describeRun(restore));
        assert.match(restore.stderr, names(id), `restore names ${file(id)}: ${describeRun(restore)}`);
        assert.deepEqual(await cluster.targetDatabases(), [], 'no database created on the target');
        assert.deepEqual(await cluster.restoredKeys(), [], 'no object written to the target');
        record(t, {
          category: 'corruption',
          fault: `one flipped byte in ${item} (${file('<id>')})`,
          runs: 3,
          detail: `verify (human and --json) and restore refuse, naming it: "${firstLine(restore.stderr)}"; the target is untouched`,
        });
      } finally {
        await writeFile(path, original);
      }
      const healed = await cluster.runCli(['--config', config, '--json', 'verify', id]);
      assert.equal(healed.code, 0, `with the byte put back the backup verifies again: ${describeRun(healed)}`);
    });
  }

  test('the manifest with one digit changed (still valid JSON): its checksum catches it, verify and restore refuse', { timeout: 300_000 }, async (t) => {
    const path = join(cluster.dirs!.repository, `backups/${id}/manifest.json`);
    const original = await readFile(path, 'utf8');
    // A row count: the kind of silent change a checksum exists for.
    const changed = original.replace(/("rows": )(\d)/, (_, key: string, digit: string) => `${key}${(Number(digit) + 1) % 10}`);
    assert.notEqual(changed, original);
    JSON.parse(changed);
    await writeFile(path, changed);
    try {
      const verify = await cluster.runCli(['--config', config, 'verify', id]);
      assert.equal(verify.code, EXIT_FAILED, describeRun(verify));
      assert.match(verify.stderr, new RegExp(`backup ${escape(id)} manifest fails its checksum`), describeRun(verify));
      const restore = await cluster.runCli(['--config', config, '--yes', 'restore', id]);
      assert.equal(restore.code, EXIT_FAILED, describeRun(restore));
      assert.match(restore.stderr, new RegExp(`backup ${escape(id)} manifest fails its checksum`), describeRun(restore));
      assert.deepEqual(await cluster.targetDatabases(), [], 'no database created on the target');
      record(t, { category: 'corruption', fault: 'one digit changed in the manifest (a row count; still valid JSON)', runs: 2, detail: `verify and restore refuse: "${firstLine(restore.stderr)}"` });
    } finally {
      await writeFile(path, original);
    }
  });

  test('a damaged manifest is shown as DAMAGED by list, never as a complete backup', { timeout: 300_000 }, async (t) => {
    const path = join(cluster.dirs!.repository, `backups/${id}/manifest.json`);
    const original = await flipMiddleByte(path);
    try {
      const list = await cluster.runCli(['--config', config, '--json', 'list']);
      assert.equal(list.code, 0, describeRun(list));
      assert.deepEqual(list.result?.backups, [], 'not listed as complete');
      assert.equal(list.result?.damaged?.[0]?.id, id, `listed as damaged: ${list.stdout}`);
      const human = await cluster.runCli(['--config', config, 'list']);
      assert.match(human.stdout, new RegExp(`DAMAGED: ${escape(id)}`), describeRun(human));
      record(t, { category: 'corruption', fault: 'one flipped byte in the manifest, seen by list', runs: 2, detail: 'listed as DAMAGED, not as a complete backup' });
    } finally {
      await writeFile(path, original);
    }
  });
});

describe('restore latest when the newest backup is damaged (fs)', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 5 })) as TestCluster;
  });
  after(async () => cluster?.cleanup());

  test('"latest" never silently means an older backup: restore and verify latest name the damaged newest one', { timeout: 300_000 }, async (t) => {
    const config = await cluster.writeConfig();
    const older = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(older.code, 0, describeRun(older));
    const newest = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(newest.code, 0, describeRun(newest));
    const newestId = newest.result!.id as string;
    await flipMiddleByte(join(cluster.dirs!.repository, `backups/${newestId}/manifest.json`));
    const verify = await cluster.runCli(['--config', config, 'verify', 'latest']);
    const restore = await cluster.runCli(['--config', config, '--yes', 'restore', 'latest']);
    const named = (r: { stdout: string; stderr: string }) => r.stdout.includes(newestId) || r.stderr.includes(newestId);
    record(t, {
      category: 'corruption',
      fault: 'the newest backup\'s manifest damaged, then verify latest and restore latest',
      runs: 2,
      detail: `verify latest: exit ${verify.code}${named(verify) ? ', names the damaged backup' : ', does not mention the damaged backup'}; restore latest: exit ${restore.code}${named(restore) ? ', names the damaged backup' : ` and restored the older backup ${older.result!.id} without mentioning the damaged newest one`}`,
    });
    assert.ok(named(verify), `verify latest must say the newest backup ${newestId} is damaged: ${describeRun(verify)}`);
    assert.ok(named(restore), `restore latest must refuse, or at least say it skips the damaged newest backup ${newestId}: ${describeRun(restore)}`);
  });
});

function firstLine(stderr: string): string {
  return (stderr.split('\n').find((l) => l.startsWith('pachbackup: error: ')) ?? '').replace('pachbackup: error: ', '').slice(0, 200);
}
