/**
 * End to end: back up a Pachyderm-shaped cluster (a real PostgreSQL 15 server with pg_dump, and a
 * bucket) and restore it into a second PostgreSQL server and another bucket, for each kind of
 * store; then prove every table's rows and every object's bytes equal. A second backup of the
 * unchanged cluster must copy nothing.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { compareFingerprints, describeRun, TestCluster, withFaults, type StoreKind } from './helpers/cluster.js';
import { cephRgwSkipReason } from './helpers/servers.js';
import type { EngineEvent } from '../src/engine/events.js';
import { listLocks } from '../src/repository/lock.js';

const CHUNKS = 60;
const CHUNK_SIZE = 16 * 1024;

const kinds: Array<{ kind: StoreKind; label: string; skip: string | false }> = [
  { kind: 's3rver', label: 's3rver bucket and repository', skip: false },
  { kind: 'ceph', label: 'Ceph RGW bucket and repository', skip: cephRgwSkipReason() ?? false },
  { kind: 'fs', label: 'filesystem store and filesystem repository', skip: false },
];

for (const { kind, label, skip } of kinds) {
  test(`${label}: restore into a second server and another bucket gives equal rows and bytes; a second backup copies nothing`, { skip, timeout: 600_000 }, async (t) => {
    const cluster = await TestCluster.createOrSkip(t, { kind, chunks: CHUNKS, chunkSize: CHUNK_SIZE });
    if (!cluster) return;
    try {
      const before = await cluster.sourceFingerprints();
      assert.equal(before.objects.size, CHUNKS);
      assert.ok(before.pachyderm.size >= 10 && before.dex.size >= 8, 'the fixture holds Pachyderm and Dex tables');

      const first = await cluster.backup();
      assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed'], 'the pause and resume commands ran once, in order');
      assert.equal(first.objects.count, CHUNKS);
      assert.equal(first.objects.bytes, CHUNKS * CHUNK_SIZE);
      assert.equal(first.referencedKeys, CHUNKS);
      // On S3 every chunk is listed with its MD5 as ETag and written with Content-MD5: the service checks it, nothing is hashed here.
      assert.equal(first.objects.md5Count, kind === 'fs' ? 0 : CHUNKS, 'objects whose checksum the S3 service checked');
      assert.deepEqual(first.databases.map((d) => d.role).sort(), ['dex', 'pachyderm']);
      assert.ok(first.downtimeMs !== null && first.downtimeMs >= 0, 'the summary gives the downtime as a number');
      assert.deepEqual(await cluster.sealedBackups(), [first.id]);
      const heldAfterFirst = await cluster.repositoryObjectCount();
      assert.equal(heldAfterFirst, CHUNKS);

      const restored = await cluster.restore(first.id);
      assert.equal(restored.objects.count, CHUNKS);
      assert.ok(restored.checks.length >= 3, `the restore checks the result against the manifest: ${restored.checks.join('; ')}`);
      const after = await cluster.restoredFingerprints();
      assert.deepEqual(compareFingerprints(before, after), []);
      assert.equal(after.objects.size, CHUNKS);

      // Second backup of the unchanged cluster: every read of a cluster object, every object write
      // into the repository and every read-back of one would fail, so it succeeds only by copying nothing.
      const second = await withFaults(
        [
          { store: 'cluster.objectStore', op: 'get', kind: 'permanent' },
          { store: 'repository', op: 'put', keyContains: 'objects/', kind: 'permanent' },
          { store: 'repository', op: 'get', keyContains: 'objects/', kind: 'permanent' },
        ],
        () => cluster.backup(),
      );
      assert.equal(second.objects.newBytes, 0);
      assert.equal(second.objects.newCount, 0);
      assert.equal(second.objects.count, CHUNKS);
      assert.equal(second.objects.heldCount, CHUNKS);
      assert.equal(await cluster.repositoryObjectCount(), heldAfterFirst, 'the repository objects/ area did not grow');
      assert.deepEqual((await cluster.sealedBackups()).sort(), [first.id, second.id].sort());

      // One object of the repository replaced by other bytes of the same size: verify recomputes the
      // recorded checksum (MD5 on S3, SHA-256 on the filesystem) and names it; a restore refuses it.
      const damagedKey = (await cluster.sourceFingerprints()).objects.keys().next().value as string;
      await cluster.repositoryStore().put(`objects/${damagedKey}`, Buffer.alloc(CHUNK_SIZE, 0x5a));
      const config = await cluster.writeConfig();
      const verify = await cluster.runCli(['--config', config, 'verify', first.id]);
      assert.equal(verify.code, 1, describeRun(verify));
      assert.match(`${verify.stdout}${verify.stderr}`, new RegExp(`${damagedKey.replace(/[.]/g, '\\.')}[\\s\\S]*checksum mismatch \\(${kind === 'fs' ? 'SHA-256' : 'MD5'} `), describeRun(verify));
      const restore = await cluster.runCli(['--config', config, '--yes', 'restore', '--force', first.id]);
      assert.equal(restore.code, 1, describeRun(restore));
      assert.match(restore.stderr, new RegExp(`${damagedKey.replace(/[.]/g, '\\.')} in the repository does not match its recorded checksum`), describeRun(restore));
    } finally {
      await cluster.cleanup();
    }
  });
}

test('Ceph RGW, read-only repository credentials (a subuser with read access): verify and restore go ahead without a read lock, with a warning; a backup is refused before pausing; a running prune still stops them', { skip: cephRgwSkipReason() ?? false, timeout: 600_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 'ceph', chunks: 20, chunkSize: CHUNK_SIZE });
  if (!cluster) return;
  try {
    const before = await cluster.sourceFingerprints();
    const first = await cluster.backup();
    const key = await cluster.s3!.readOnlyKey!();
    const env = { PBT_RO_KEY: key.accessKeyId, PBT_RO_SECRET: key.secretAccessKey };
    Object.assign(process.env, env);
    const readOnly = (raw: Record<string, any>): void => {
      raw.repository.accessKeyId = { env: 'PBT_RO_KEY' };
      raw.repository.secretAccessKey = { env: 'PBT_RO_SECRET' };
    };
    // The key really cannot write: the service refuses it.
    await assert.rejects(cluster.repositoryStore(readOnly).put('probe', Buffer.from('x')), /access denied/);
    const config = await cluster.writeConfig(readOnly);

    const verify = await cluster.runCli(['--config', config, 'verify', first.id], { env });
    assert.equal(verify.code, 0, describeRun(verify));
    assert.match(verify.stderr, /no read lock taken: the credentials cannot write to .*do not prune meanwhile/s, describeRun(verify));

    const events: EngineEvent[] = [];
    const restored = await cluster.restore(first.id, readOnly, events);
    assert.equal(restored.objects.count, 20);
    assert.deepEqual(compareFingerprints(before, await cluster.restoredFingerprints()), [], 'restored from the read-only repository: rows and bytes equal');
    assert.ok(events.some((e) => e.type === 'warning' && e.message.includes('no read lock taken')), 'the restore warned that it holds no lock');
    assert.deepEqual(await listLocks(cluster.repositoryStore()), [], 'no lock left behind');
    for (const secret of Object.values(env)) assert.ok(!verify.stdout.includes(secret) && !verify.stderr.includes(secret), 'a secret value was printed');

    // A backup must write: refused at once, the cluster never paused.
    const markers = await cluster.markerLines();
    await assert.rejects(cluster.backup(readOnly), /access denied/);
    assert.deepEqual(await cluster.markerLines(), markers, 'the failed backup did not pause the cluster');

    // A prune that is running (a live exclusive lock) still stops the read-only verify.
    const now = new Date().toISOString();
    await cluster.repositoryStore().put('locks/exclusive-0123456789abcdef.json', Buffer.from(JSON.stringify({ kind: 'exclusive', host: 'other-host', pid: 4242, command: 'pachbackup prune --keep-last 3', createdAt: now, heartbeatAt: now, leaseSeconds: 300 })));
    const blocked = await cluster.runCli(['--config', config, 'verify', first.id], { env });
    assert.notEqual(blocked.code, 0, describeRun(blocked));
    assert.match(blocked.stderr, /is locked: cannot take a read lock while the exclusive lock exclusive-0123456789abcdef held by "pachbackup prune/, describeRun(blocked));

    // A prune that died (its lock stale: killed, or the primary site lost and the bucket replicated
    // here) does not stop them: a run with write access would remove that lock and go ahead.
    const anHourAgo = new Date(Date.now() - 3600_000).toISOString();
    await cluster.repositoryStore().put('locks/exclusive-0123456789abcdef.json', Buffer.from(JSON.stringify({ kind: 'exclusive', host: 'other-host', pid: 4242, command: 'pachbackup prune --keep-last 3', createdAt: anHourAgo, heartbeatAt: anHourAgo, leaseSeconds: 300 })));
    const afterStale = await cluster.runCli(['--config', config, 'verify', first.id], { env });
    assert.equal(afterStale.code, 0, describeRun(afterStale));
    assert.match(afterStale.stderr, /stale exclusive lock exclusive-0123456789abcdef .*left in place/s, describeRun(afterStale));
  } finally {
    delete process.env['PBT_RO_KEY'];
    delete process.env['PBT_RO_SECRET'];
    await cluster.cleanup();
  }
});

test('the first backup into an empty repository reports every object as new (summary.objects.newCount/newBytes)', { timeout: 300_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 'fs', chunks: 12, chunkSize: 1000, target: false });
  if (!cluster) return;
  try {
    // With pre-copy (the default) the objects are copied before the pause; they are still new to this backup.
    const summary = await cluster.backup();
    assert.equal(summary.objects.count, 12);
    assert.equal(summary.objects.newCount, 12, `newCount ${summary.objects.newCount}, heldCount ${summary.objects.heldCount}`);
    assert.equal(summary.objects.newBytes, 12_000);
    assert.equal(summary.objects.heldCount, 0);
  } finally {
    await cluster.cleanup();
  }
});

test('CLI end to end (s3rver): backup --json --yes, list --json, show, verify, restore', { timeout: 600_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 's3rver', chunks: 25 });
  if (!cluster) return;
  try {
    const before = await cluster.sourceFingerprints();
    const config = await cluster.writeConfig();

    const backup = await cluster.runCli(['--config', config, '--json', '--yes', 'backup']);
    assert.equal(backup.code, 0, describeRun(backup));
    assert.ok(backup.events.length > 2, 'one JSON event per line');
    for (const line of backup.stdout.trim().split('\n')) assert.doesNotThrow(() => JSON.parse(line), `not a JSON line: ${line}`);
    const phases = backup.events.filter((e) => e.type === 'phase-start').map((e) => e.phase);
    for (const phase of ['preflight', 'pause', 'snapshot', 'copy', 'resume', 'dump', 'seal']) assert.ok(phases.includes(phase), `phase ${phase} in ${phases.join(',')}`);
    const result = backup.result;
    assert.ok(result, describeRun(backup));
    assert.equal(result.command, 'backup');
    assert.match(String(result.id), /\S/);
    assert.equal(result.objects.count, 25);
    assert.equal(typeof result.downtimeMs, 'number');
    assert.deepEqual(await cluster.markerLines(), ['paused', 'resumed']);
    // Secrets are given by reference and never printed.
    for (const secret of Object.values(cluster.env)) assert.ok(!backup.stdout.includes(secret) && !backup.stderr.includes(secret), 'a secret value was printed');

    const list = await cluster.runCli(['--config', config, '--json', 'list']);
    assert.equal(list.code, 0, describeRun(list));
    assert.deepEqual(
      list.result?.backups.map((b: { id: string }) => b.id),
      [result.id],
    );
    assert.deepEqual(list.result?.incomplete, []);

    const show = await cluster.runCli(['--config', config, 'show', result.id]);
    assert.equal(show.code, 0, describeRun(show));
    assert.match(show.stdout, new RegExp(`backup ${result.id}`));
    assert.match(show.stdout, /pachyderm/);
    assert.match(show.stdout, /dex/);
    const showJson = await cluster.runCli(['--config', config, '--json', 'show', 'latest']);
    assert.equal(showJson.result?.manifest.id, result.id, describeRun(showJson));

    const verify = await cluster.runCli(['--config', config, '--json', 'verify', result.id]);
    assert.equal(verify.code, 0, describeRun(verify));
    assert.equal(verify.result?.ok, true);

    const restore = await cluster.runCli(['--config', config, '--json', '--yes', 'restore', result.id]);
    assert.equal(restore.code, 0, describeRun(restore));
    assert.equal(restore.result?.command, 'restore');
    assert.deepEqual(compareFingerprints(before, await cluster.restoredFingerprints()), []);
  } finally {
    await cluster.cleanup();
  }
});

/**
 * An HTTP reverse proxy in front of the S3 server that answers every PUT with an ETag that is not
 * the body's MD5, as AWS does for SSE-KMS buckets (a protocol-level stand-in: neither s3rver nor
 * Ceph here encrypts with KMS). Counts the ETags it replaced.
 */
async function startEtagRewriter(target: string): Promise<{ endpoint: string; rewritten: number; close(): Promise<void> }> {
  const upstream = new URL(target);
  const state = { endpoint: '', rewritten: 0, close: (): Promise<void> => Promise.resolve() };
  const server: Server = createServer((req, res) => {
    const forward = request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
      const headers = { ...answer.headers };
      if (req.method === 'PUT' && !req.headers['x-amz-copy-source'] && headers.etag) {
        headers.etag = `"${randomBytes(16).toString('hex')}"`;
        state.rewritten++;
      }
      res.writeHead(answer.statusCode ?? 502, headers);
      answer.pipe(res);
    });
    forward.on('error', () => res.destroy());
    req.pipe(forward);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  state.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  state.close = () => new Promise((resolve) => server.close(() => resolve()));
  return state;
}

test('restore into a target whose ETags are not MD5s (as SSE-KMS on AWS): the MD5s are computed here instead and the restore equals the source', { timeout: 600_000 }, async (t) => {
  const cluster = await TestCluster.createOrSkip(t, { kind: 's3rver', chunks: 20, chunkSize: 4096 });
  if (!cluster) return;
  const proxy = await startEtagRewriter(cluster.s3!.endpoint);
  try {
    const before = await cluster.sourceFingerprints();
    const backup = await cluster.backup();
    assert.equal(backup.objects.md5Count, 20, 'the index holds MD5 checksums the restore must check');
    const restored = await cluster.restore(backup.id, (raw) => {
      raw.restore.objectStore.endpoint = proxy.endpoint;
    });
    assert.equal(restored.objects.count, 20);
    assert.ok(proxy.rewritten >= 1, 'the target answered with ETags that are not the MD5');
    assert.deepEqual(compareFingerprints(before, await cluster.restoredFingerprints()), []);
  } finally {
    await proxy.close();
    await cluster.cleanup();
  }
});
