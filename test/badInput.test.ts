/**
 * Bad input through the real CLI process: each case must fail with a message naming the problem,
 * a non-zero exit (2 for configuration errors, 1 for the others), no sealed backup in the
 * repository, and — since preflight checks everything first — without ever pausing the cluster.
 */
import assert from 'node:assert/strict';
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { findFreePort } from '../src/demo/localPostgres.js';
import { describeRun, TestCluster, type CliResult, type RawConfig } from './helpers/cluster.js';

const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

/** Runs `backup` with a config changed by `mutate` and checks the common promises of a refusal. */
async function refusedBackup(
  cluster: TestCluster,
  mutate: (raw: RawConfig) => void,
  expected: { exit: number; message: RegExp[] },
  env: Record<string, string> = {},
): Promise<CliResult> {
  const config = await cluster.writeConfig(mutate);
  const run = await cluster.runCli(['--config', config, '--yes', 'backup'], { env, timeoutMs: 120_000 });
  assert.equal(run.code, expected.exit, describeRun(run));
  assert.match(run.stderr, /pachbackup: error: /, describeRun(run));
  for (const pattern of expected.message) assert.match(run.stderr, pattern, describeRun(run));
  assert.deepEqual(await cluster.sealedBackups(), [], 'no sealed backup in the repository');
  assert.deepEqual(await cluster.markerLines(), [], 'the cluster was never paused');
  // Secrets are never echoed, not even in errors.
  for (const secret of Object.values(cluster.env)) assert.ok(!run.stderr.includes(secret) && !run.stdout.includes(secret), 'a secret value was printed');
  return run;
}

describe('bad input: PostgreSQL and pg_dump (fs stores)', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: 5 })) as TestCluster;
  });
  after(async () => {
    await cluster?.cleanup();
  });

  test('unreachable database (closed port): names the server and "connection refused"', { timeout: 120_000 }, async () => {
    const port = await findFreePort();
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.postgres.port = port;
      },
      { exit: EXIT_FAILED, message: [/cannot reach PostgreSQL/, /connection refused/, new RegExp(`127\\.0\\.0\\.1:${port}`), /cluster\.postgres\.host/] },
    );
  });

  test('wrong password: "password authentication failed", naming cluster.postgres.password', { timeout: 120_000 }, async () => {
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.postgres.password = { env: 'PBT_WRONG_PGPASSWORD' };
      },
      { exit: EXIT_FAILED, message: [/password authentication failed/, /cluster\.postgres\.password/] },
      { PBT_WRONG_PGPASSWORD: 'definitely-not-the-password' },
    );
  });

  test('password variable not set: names the variable', { timeout: 120_000 }, async () => {
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.postgres.password = { env: 'PBT_UNSET_PGPASSWORD' };
      },
      { exit: EXIT_FAILED, message: [/PBT_UNSET_PGPASSWORD/, /not set/] },
    );
  });

  test('missing database: names the database and says it does not exist', { timeout: 120_000 }, async () => {
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.databases.dex = 'no_such_database';
      },
      { exit: EXIT_FAILED, message: [/database "no_such_database" does not exist/] },
    );
  });

  test('pg_dump missing (binDir is an empty directory): names pg_dump, the directory and the key', { timeout: 120_000 }, async () => {
    const empty = join(cluster.work, 'empty-bin');
    await mkdir(empty, { recursive: true });
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.postgres.binDir = empty;
      },
      { exit: EXIT_FAILED, message: [/pg_dump not found/, new RegExp(empty.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')), /cluster\.postgres\.binDir/] },
    );
  });

  test('pg_dump older than the server (a pg_dump that says 12.0): names both versions', { timeout: 120_000 }, async () => {
    const old = join(cluster.work, 'old-bin');
    await mkdir(old, { recursive: true });
    const fake = join(old, 'pg_dump');
    await writeFile(fake, '#!/bin/sh\necho "pg_dump (PostgreSQL) 12.0"\n');
    await chmod(fake, 0o755);
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.postgres.binDir = old;
      },
      { exit: EXIT_FAILED, message: [/pg_dump 12\.0/, /older than the server/, /PostgreSQL 15/] },
    );
  });

  test('repository inside the cluster directory (fs): refused as overlapping, nothing written there', { timeout: 120_000 }, async () => {
    const inside = join(cluster.dirs!.cluster, 'pachbackup');
    const beforeKeys: string[] = [];
    for await (const info of cluster.clusterStore().list()) beforeKeys.push(info.key);
    await refusedBackup(
      cluster,
      (raw) => {
        raw.repository.url = pathToFileURL(inside).href;
      },
      { exit: EXIT_FAILED, message: [/overlaps/, /repository\.url/, /cluster\.objectStore\.url/] },
    );
    const afterKeys: string[] = [];
    for await (const info of cluster.clusterStore().list()) afterKeys.push(info.key);
    assert.deepEqual(afterKeys, beforeKeys, 'the cluster store is unchanged');
  });
});

describe('bad input: buckets (s3rver)', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 's3rver', target: false, chunks: 5 })) as TestCluster;
  });
  after(async () => {
    await cluster?.cleanup();
  });

  test('missing cluster bucket: names the bucket and says it does not exist', { timeout: 120_000 }, async () => {
    await refusedBackup(
      cluster,
      (raw) => {
        raw.cluster.objectStore.url = 's3://no-such-cluster-bucket';
      },
      { exit: EXIT_FAILED, message: [/no-such-cluster-bucket/, /does not exist/] },
    );
  });

  test('missing repository bucket: names the bucket and says it does not exist', { timeout: 120_000 }, async () => {
    await refusedBackup(
      cluster,
      (raw) => {
        raw.repository.url = 's3://no-such-repository-bucket';
      },
      { exit: EXIT_FAILED, message: [/no-such-repository-bucket/, /does not exist/] },
    );
  });

  for (const { label, url, endpoint } of [
    { label: 'the same bucket', url: 's3://pachyderm-cluster', endpoint: undefined },
    { label: 'the same bucket under a prefix', url: 's3://pachyderm-cluster/pachbackup', endpoint: undefined },
    { label: 'the same bucket, endpoint written with a trailing slash', url: 's3://pachyderm-cluster/backups', endpoint: '/' },
  ]) {
    test(`repository equal to the cluster bucket (${label}): refused as overlapping, nothing written to the bucket`, { timeout: 120_000 }, async () => {
      const beforeKeys: string[] = [];
      for await (const info of cluster.clusterStore().list()) beforeKeys.push(info.key);
      await refusedBackup(
        cluster,
        (raw) => {
          raw.repository = { ...raw.cluster.objectStore, url };
          if (endpoint) raw.repository.endpoint = `${raw.cluster.objectStore.endpoint}${endpoint}`;
        },
        { exit: EXIT_FAILED, message: [/overlaps/, /repository\.url/, /cluster\.objectStore\.url/] },
      );
      const afterKeys: string[] = [];
      for await (const info of cluster.clusterStore().list()) afterKeys.push(info.key);
      assert.deepEqual(afterKeys, beforeKeys, 'the cluster bucket is unchanged');
    });
  }
});

describe('bad input: malformed config (exit 2)', () => {
  let cluster: TestCluster;
  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, fixture: false })) as TestCluster;
  });
  after(async () => {
    await cluster?.cleanup();
  });

  test('not YAML: says so with the line', { timeout: 120_000 }, async () => {
    const file = join(cluster.work, 'broken.yaml');
    await writeFile(file, 'cluster:\n  postgres: [unclosed\n    host: x\nrepository: {url: "file:///tmp"\n');
    for (const json of [false, true]) {
      const run = await cluster.runCli(['--config', file, ...(json ? ['--json'] : []), '--yes', 'backup']);
      assert.equal(run.code, EXIT_USAGE, describeRun(run));
      assert.match(run.stderr, /broken\.yaml is not valid YAML/, describeRun(run));
      assert.match(run.stderr, /line \d+/, describeRun(run));
      if (json) assert.equal(run.events.find((e) => e.type === 'error')?.message?.includes('not valid YAML'), true, describeRun(run));
    }
    assert.deepEqual(await cluster.sealedBackups(), []);
    assert.deepEqual(await cluster.markerLines(), []);
  });

  test('config file missing: names the file', { timeout: 120_000 }, async () => {
    const run = await cluster.runCli(['--config', join(cluster.work, 'nope.yaml'), '--yes', 'backup']);
    assert.equal(run.code, EXIT_USAGE, describeRun(run));
    assert.match(run.stderr, /nope\.yaml does not exist/);
  });

  const cases: Array<{ label: string; mutate: (raw: RawConfig) => void; message: RegExp[] }> = [
    {
      label: 'unknown key: names the key and where it is',
      mutate: (raw) => {
        raw.cluster.postgres.hostname = 'db.example.com';
      },
      message: [/cluster\.postgres/, /unknown key "hostname"/],
    },
    {
      label: 'unknown top-level key',
      mutate: (raw) => {
        raw.repositry = { url: 'file:///tmp/x' };
      },
      message: [/unknown key "repositry"/],
    },
    {
      label: 'wrong type: port as a string names the key, the expected type and what it got',
      mutate: (raw) => {
        raw.cluster.postgres.port = 'five-four-three-two';
      },
      message: [/cluster\.postgres\.port: expected number/, /five-four-three-two/],
    },
    {
      label: 'wrong type: concurrency as a list',
      mutate: (raw) => {
        raw.backup.concurrency = [1, 2];
      },
      message: [/backup\.concurrency: expected number, got a list/],
    },
    {
      label: 'a literal password instead of a reference',
      mutate: (raw) => {
        raw.cluster.postgres.password = 'hunter2-literal';
      },
      message: [/cluster\.postgres\.password/, /reference/],
    },
    {
      label: 'a required section missing',
      mutate: (raw) => {
        delete raw.repository;
      },
      message: [/repository: is required/],
    },
    {
      label: 'pause strategy command without commands',
      mutate: (raw) => {
        delete raw.pause.command;
      },
      message: [/pause\.command/],
    },
  ];
  for (const { label, mutate, message } of cases) {
    test(`malformed config, ${label}`, { timeout: 120_000 }, async () => {
      await refusedBackup(cluster, mutate, { exit: EXIT_USAGE, message: [/is not a valid pachbackup config/, ...message] });
    });
  }
});
