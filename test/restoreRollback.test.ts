/**
 * Restore against its promises (from a review of session 7): a failed restore takes back only what it created and
 * deletes nothing that existed before; nothing existing is overwritten unless told to (--force);
 * bad input is refused before anything is written.
 */
import assert from 'node:assert/strict';
import { chmod, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import net from 'node:net';
import pg from 'pg';
import { after, before, beforeEach, describe, test } from 'node:test';
import type { EngineEvent } from '../src/engine/events.js';
import { restoreTargetsFromConfig, runRestore, type RestoreSummary } from '../src/engine/restore.js';
import { compareFingerprints, describeRun, TestCluster, withFaults, type CliResult, type RawConfig } from './helpers/cluster.js';

/** The second read of the dex dump (the first is the preflight's checksum check) fails: database 2 fails. */
const DEX_DUMP_FAILS = [{ store: 'repository', op: 'get', keyContains: 'db/dex.dump', after: 1, kind: 'permanent' }];

describe('restore: rollback and refusals (fs)', () => {
  let cluster: TestCluster;
  const valuesIn = (): string => join(cluster.work, 'values.yaml');
  const valuesOut = (): string => join(cluster.work, 'restored-values.yaml');
  // The chart's LOCAL backend mounts <hostPath>pachd as the bucket root: the target must end in /pachd.
  const helmTarget = (): string => join(cluster.work, 'restored-helm', 'pachd');
  const withHelm = (raw: RawConfig): void => {
    raw.cluster.helmValues = valuesIn();
    raw.restore.helmValuesOut = valuesOut();
    raw.restore.objectStore.url = pathToFileURL(helmTarget()).href;
  };
  const helmTargetKeys = async (): Promise<string[]> => (await readdir(helmTarget(), { recursive: true, withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name);

  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', chunks: 12 })) as TestCluster;
    await writeFile(
      valuesIn(),
      ['global:', '  postgresql:', `    postgresqlHost: ${cluster.source.host}`, `    postgresqlPort: "${cluster.source.port}"`, 'pachd:', '  storage:', '    backend: LOCAL', ''].join('\n'),
    );
    await cluster.backup(withHelm);
  });
  after(async () => {
    await cluster?.cleanup();
  });

  /** Every test starts from an empty target server, an empty target directory and no values file. */
  beforeEach(async () => {
    for (const name of await cluster.targetDatabases()) await cluster.target!.query('postgres', `DROP DATABASE "${name}" WITH (FORCE)`);
    for (const key of await cluster.restoredKeys()) await cluster.restoredStore().remove([key]);
    await rm(valuesOut(), { force: true });
    await rm(helmTarget(), { recursive: true, force: true });
    await mkdir(helmTarget(), { recursive: true });
  });

  async function restore(options: { force?: boolean; mutate?: (raw: RawConfig) => void; events?: EngineEvent[] } = {}): Promise<RestoreSummary> {
    const config = cluster.config(options.mutate);
    const events = options.events ?? [];
    return runRestore({ config, backup: 'latest', targets: restoreTargetsFromConfig(config), force: options.force ?? false, dryRun: false, noOwner: true, concurrency: 4, emit: (e) => events.push(e) });
  }

  test('a pre-existing empty target database survives a restore that fails (no --force)', { timeout: 300_000 }, async () => {
    // The operator created the (empty) target database beforehand, as a DBA often does.
    await cluster.target!.createDatabase('pachyderm');
    await cluster.target!.query('postgres', `COMMENT ON DATABASE pachyderm IS 'created by the DBA'`);
    await assert.rejects(withFaults(DEX_DUMP_FAILS, () => restore()), /dex/);
    assert.deepEqual(await cluster.targetDatabases(), ['pachyderm'], 'the database that existed before the restore still exists after its rollback');
  });

  test('a target database that holds data outside tables (a large object) is refused without --force', { timeout: 300_000 }, async () => {
    await cluster.target!.createDatabase('pachyderm');
    const { rows } = await cluster.target!.query<{ oid: number }>('pachyderm', `SELECT lo_from_bytea(0, 'precious bytes'::bytea) AS oid`);
    const oid = rows[0]!.oid;
    let outcome = 'restore succeeded';
    try {
      await restore();
    } catch (err) {
      outcome = (err as Error).message;
    }
    const left = await cluster.target!.query<{ n: string }>('pachyderm', 'SELECT count(*) AS n FROM pg_largeobject_metadata WHERE oid = $1', [oid]);
    assert.equal(Number(left.rows[0]!.n), 1, `the large object is still there (${outcome})`);
    assert.match(outcome, /not empty/);
  });

  test('--force: a failed restore does not destroy the database it was meant to replace', { timeout: 300_000 }, async () => {
    await cluster.target!.createDatabase('pachyderm');
    await cluster.target!.query('pachyderm', 'CREATE TABLE precious (v text)');
    await cluster.target!.query('pachyderm', `INSERT INTO precious VALUES ('the only copy')`);
    await assert.rejects(withFaults(DEX_DUMP_FAILS, () => restore({ force: true })), /dex/);
    assert.deepEqual(await cluster.targetDatabases(), ['pachyderm'], 'the database that existed before is still there');
    const { rows } = await cluster.target!.query<{ v: string }>('pachyderm', 'SELECT v FROM precious');
    assert.deepEqual(rows, [{ v: 'the only copy' }], 'its data is unchanged');
  });

  test('--force into a non-empty store: a failed restore does not delete objects that were there before', { timeout: 300_000 }, async () => {
    // The target already holds objects of the same keys (an earlier restore, or the cluster's own bucket).
    const source = cluster.clusterStore();
    const target = cluster.restoredStore();
    const before: string[] = [];
    for await (const info of source.list()) {
      if (before.length >= 3) break;
      before.push(info.key);
    }
    for (const key of before) await target.put(key, await source.get(key));
    await target.put('someone-elses-object', Buffer.from('keep me'));
    // What was there is learnt from the target's listing, not by a HEAD per object: every stat of the target fails.
    const noStat = { store: 'restore.objectStore', op: 'stat', kind: 'permanent' };
    await assert.rejects(withFaults([...DEX_DUMP_FAILS, noStat], () => restore({ force: true })), /dex/);
    assert.deepEqual(await cluster.restoredKeys(), [...before, 'someone-elses-object'].sort(), 'every object that was there before the restore is still there');
  });

  test('--helm-values-out naming an existing file: not overwritten without --force', { timeout: 300_000 }, async () => {
    await writeFile(valuesOut(), 'the operator values for the running cluster\n');
    let outcome = 'restore succeeded';
    try {
      await restore({ mutate: withHelm });
      assert.ok(await stat(join(helmTarget(), 'chunk')), 'the restore did write its objects');
    } catch (err) {
      outcome = (err as Error).message;
    }
    assert.equal(await readFile(valuesOut(), 'utf8'), 'the operator values for the running cluster\n', `the existing file is unchanged (${outcome})`);
  });

  test('--force over an existing --helm-values-out file: written with mode 0600, like a new one', { timeout: 300_000 }, async () => {
    await writeFile(valuesOut(), 'old\n');
    await chmod(valuesOut(), 0o644);
    await restore({ force: true, mutate: withHelm });
    assert.notEqual(await readFile(valuesOut(), 'utf8'), 'old\n', 'rewritten');
    assert.equal((await stat(valuesOut())).mode & 0o777, 0o600, 'the Helm values (which may hold secrets) are readable by the owner only');
  });

  test('--force: when the Helm values cannot be moved into place after the databases were replaced, the restore keeps them and says where the values are', { timeout: 300_000 }, async () => {
    await cluster.target!.createDatabase('pachyderm');
    await cluster.target!.query('pachyderm', 'CREATE TABLE precious (v text)');
    // A directory that is not empty where the file should go: the final rename fails.
    await mkdir(join(valuesOut(), 'in-the-way'), { recursive: true });
    const events: EngineEvent[] = [];
    try {
      const summary = await restore({ force: true, mutate: withHelm, events });
      assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm'], 'both databases restored, nothing rolled back');
      const source = await cluster.sourceFingerprints();
      assert.equal((await helmTargetKeys()).length, source.objects.size, 'every object restored, none rolled back');
      const { rows } = await cluster.target!.query<{ n: string }>('pachyderm', `SELECT count(*) AS n FROM pg_class WHERE relname = 'precious'`);
      assert.equal(Number(rows[0]!.n), 0, 'pachyderm is the restored database, not the one it replaced');
      const staged = summary.helmValuesOut!;
      assert.notEqual(staged, valuesOut());
      assert.match(await readFile(staged, 'utf8'), /postgresql/, 'the rewritten values are in the file the summary names');
      assert.ok(events.some((e) => e.type === 'warning' && e.message.includes(staged) && /could not be moved/.test(e.message)), JSON.stringify(events.filter((e) => e.type === 'warning')));
      await rm(staged, { force: true });
    } finally {
      await rm(valuesOut(), { recursive: true, force: true });
    }
  });

  test('a restore that fails after writing the Helm values takes the file back', { timeout: 300_000 }, async () => {
    // The first listing of the target is the preflight's emptiness check; the second is the final check.
    const faults = [{ store: 'restore.objectStore', op: 'list', after: 1, kind: 'permanent' }];
    await assert.rejects(withFaults(faults, () => restore({ mutate: withHelm })));
    assert.deepEqual(await cluster.targetDatabases(), [], 'databases taken back');
    assert.deepEqual(await helmTargetKeys(), [], 'objects taken back');
    await assert.rejects(stat(valuesOut()), { code: 'ENOENT' }, 'no Helm values for a restore that did not happen');
  });

  test('--helm-values-out in a directory that does not exist is refused before anything is written', { timeout: 300_000 }, async () => {
    const events: EngineEvent[] = [];
    const missing = join(cluster.work, 'no-such-dir', 'values.yaml');
    await assert.rejects(
      restore({
        events,
        mutate: (raw) => {
          withHelm(raw);
          raw.restore.helmValuesOut = missing;
        },
      }),
      /cannot write the Helm values to .*no-such-dir.* is not a writable directory; create it/,
    );
    const phases = events.filter((e) => e.type === 'phase-start').map((e) => (e as { phase: string }).phase);
    assert.deepEqual(phases, ['preflight'], 'refused in preflight: no object copied, no database restored');
  });

  test('the same target name for both databases is refused before anything is written', { timeout: 300_000 }, async () => {
    const events: EngineEvent[] = [];
    await assert.rejects(
      restore({ events, mutate: (raw) => (raw.restore.databases = { pachyderm: 'pach', dex: 'pach' }) }),
      /pachyderm.*dex|dex.*pachyderm/,
    );
    const phases = events.filter((e) => e.type === 'phase-start').map((e) => (e as { phase: string }).phase);
    assert.deepEqual(phases, ['preflight'], 'refused in preflight: no object copied, no database restored');
  });

  /** Starts a restore, sends SIGINT once `ready` holds, and checks the targets are left empty (exit 130). */
  async function interruptedRestore(args: string[], faults: unknown[], ready: () => Promise<boolean>, what: string): Promise<void> {
    const config = await cluster.writeConfig();
    const { child, done } = cluster.spawnCli(['--config', config, '--yes', 'restore', 'latest', ...args], { timeoutMs: 90_000, env: { PACHBACKUP_FAULTS: JSON.stringify(faults) } });
    let finished: CliResult | undefined;
    void done.then((r) => (finished = r), () => undefined);
    const deadline = Date.now() + 60_000;
    while (!(await ready())) {
      if (finished) assert.fail(`the restore ended early: ${describeRun(finished)}`);
      if (Date.now() > deadline) assert.fail(`${what} within 60 s`);
      await sleep(50);
    }
    child.kill('SIGINT');
    const run = await done;
    assert.equal(run.code, 130, describeRun(run));
    assert.deepEqual(await cluster.targetDatabases(), [], 'no database left');
    assert.deepEqual(await cluster.restoredKeys(), [], 'no object left');
  }

  test('SIGINT while objects are restored: exit 130, nothing left on the targets', { timeout: 300_000 }, async () => {
    await interruptedRestore(['--concurrency', '1'], [{ store: 'restore.objectStore', op: 'put', kind: 'delay', ms: 500 }], async () => (await cluster.restoredKeys()).length >= 2, 'no object restored');
  });

  test('SIGINT while the second database is restored: exit 130, nothing left on the targets', { timeout: 300_000 }, async () => {
    // pg_restore's read of the dex dump (the second read; the first is the preflight check) waits 5 s,
    // so the SIGINT lands while that GET is in flight: the body then arrives with the signal aborted.
    const dexDumpSlow = [{ store: 'repository', op: 'get', keyContains: 'db/dex.dump', after: 1, kind: 'delay', ms: 5000 }];
    await interruptedRestore([], dexDumpSlow, async () => (await cluster.targetDatabases()).includes('dex'), 'database dex not created');
  });

  test('--force over existing databases (one with tables, one empty): replaced by the backup, nothing else left', { timeout: 300_000 }, async () => {
    await cluster.target!.createDatabase('pachyderm');
    await cluster.target!.query('pachyderm', 'CREATE TABLE precious (v text)');
    await cluster.target!.createDatabase('dex');
    const summary = await restore({ force: true });
    assert.deepEqual(summary.databases.map((d) => d.name), ['pachyderm', 'dex']);
    // The checks name the databases the operator asked for, not the copies they were restored into.
    const dbChecks = summary.checks.filter((c) => c.startsWith('database '));
    assert.deepEqual(dbChecks.map((c) => /^database "([^"]+)"/.exec(c)?.[1]), ['pachyderm', 'dex'], dbChecks.join('; '));
    assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm'], 'the two databases, no work database left');
    assert.deepEqual(compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints()), [], 'the restored cluster equals the source');
  });

  /** Runs `restore` while a session is held on the first database whose name matches `pattern` once it appears. */
  async function withSessionOn<T>(pattern: string, restore: () => Promise<T>): Promise<{ outcome: T | Error; held: boolean }> {
    const t = cluster.target!;
    let holder: pg.Client | undefined;
    let stop = false;
    const watcher = (async () => {
      while (!stop && !holder) {
        const { rows } = await t.query<{ datname: string }>('postgres', `SELECT datname FROM pg_database WHERE datname LIKE '${pattern}'`);
        if (rows[0]) {
          const c = new pg.Client({ host: t.host, port: t.port, user: t.user, password: t.password, database: rows[0].datname });
          c.on('error', () => undefined);
          await c.connect().then(() => (holder = c), () => undefined);
        }
        await sleep(20);
      }
    })();
    let outcome: T | Error;
    try {
      outcome = await restore();
    } catch (err) {
      outcome = err as Error;
    } finally {
      stop = true;
      await watcher;
      await holder?.end().catch(() => undefined);
    }
    return { outcome, held: holder !== undefined };
  }

  test('--force: when one restored copy cannot be put in place (a session on it), neither existing database is replaced and nothing else is left', { timeout: 300_000 }, async () => {
    await cluster.target!.createDatabase('pachyderm');
    await cluster.target!.query('pachyderm', 'CREATE TABLE precious (v text)');
    await cluster.target!.createDatabase('dex');
    await cluster.target!.query('dex', 'CREATE TABLE kept (v text)');
    // A session on the restored dex copy (a monitoring agent, a DBA's psql) makes its rename fail,
    // after pachyderm's rename in the same transaction.
    const { outcome, held } = await withSessionOn('pachbackup_restore_%_dex', () => restore({ force: true }));
    assert.ok(held, 'the test held a session on the restored copy');
    assert.ok(outcome instanceof Error, 'the restore failed');
    assert.match(outcome.message, /putting the restored databases in place of "pachyderm" and "dex" .* failed .*nothing was replaced: they are as before/);
    assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm'], 'the two old databases, no copy left');
    const tables = async (db: string): Promise<string[]> => (await cluster.target!.query<{ relname: string }>(db, `SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY 1`)).rows.map((r) => r.relname);
    assert.deepEqual(await tables('pachyderm'), ['precious'], 'pachyderm is the old one (its swap was rolled back with dex\'s)');
    assert.deepEqual(await tables('dex'), ['kept'], 'dex is the old one');
    assert.deepEqual(await cluster.restoredKeys(), [], 'the restored objects were removed');
  });

  test('--force: a session on an existing database (pachd left running) is ended and the database replaced', { timeout: 300_000 }, async () => {
    await cluster.target!.createDatabase('pachyderm');
    await cluster.target!.query('pachyderm', 'CREATE TABLE precious (v text)');
    const { outcome, held } = await withSessionOn('pachyderm', () => restore({ force: true }));
    assert.ok(held, 'the test held a session on the existing database');
    assert.ok(!(outcome instanceof Error), `the restore succeeded: ${String(outcome)}`);
    assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm'], 'no copy or replaced database left');
    assert.deepEqual(compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints()), [], 'the restored cluster equals the source');
  });
  /**
   * A TCP proxy to the target server that, on the connection that renames databases, cuts the
   * connection at COMMIT (a network fault, a proxy or pooler restarting, at the worst moment):
   * `answer` lets COMMIT through to the server and drops its answer (the transaction committed, the
   * client only sees the connection end); `request` drops COMMIT itself (nothing is committed).
   */
  async function commitCut(lost: 'answer' | 'request'): Promise<{ port: number; cut: () => boolean; close: () => Promise<void> }> {
    const t = cluster.target!;
    let cut = false;
    const sockets = new Set<net.Socket>();
    const server = net.createServer((client) => {
      const upstream = net.connect(t.port, t.host);
      sockets.add(client).add(upstream);
      let renaming = false;
      let committing = false;
      client.on('data', (chunk) => {
        const text = chunk.toString('latin1');
        if (text.includes('ALTER DATABASE')) renaming = true;
        if (renaming && !cut && text.includes('COMMIT')) {
          committing = true;
          if (lost === 'request') {
            cut = true;
            client.destroy();
            upstream.destroy();
            return;
          }
        }
        upstream.write(chunk);
      });
      upstream.on('data', (chunk) => {
        if (committing && !cut) {
          cut = true;
          client.destroy();
          upstream.destroy();
          return;
        }
        client.write(chunk);
      });
      for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
        a.on('error', () => b.destroy());
        a.on('close', () => b.destroy());
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return {
      port: (server.address() as net.AddressInfo).port,
      cut: () => cut,
      close: async () => {
        for (const s of sockets) s.destroy();
        await new Promise((resolve) => server.close(resolve));
      },
    };
  }

  const viaProxy = (port: number) => (raw: RawConfig): void => {
    raw.restore.postgres.host = '127.0.0.1';
    raw.restore.postgres.port = port;
  };
  const publicTables = async (db: string): Promise<string[]> => (await cluster.target!.query<{ relname: string }>(db, `SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY 1`)).rows.map((r) => r.relname);

  for (const lost of ['answer', 'request'] as const) {
    const what = lost === 'answer' ? 'the answer to the swap\'s COMMIT is lost (the connection ends after the server committed)' : 'the connection ends as the swap\'s COMMIT is sent (the server never gets it)';
    test(`--force: when ${what}, the restore reports what happened and keeps what the databases in place refer to`, { timeout: 300_000 }, async () => {
      await cluster.target!.createDatabase('pachyderm');
      await cluster.target!.query('pachyderm', 'CREATE TABLE precious (v text)');
      await cluster.target!.createDatabase('dex');
      await cluster.target!.query('dex', 'CREATE TABLE kept (v text)');
      const proxy = await commitCut(lost);
      let outcome: RestoreSummary | Error;
      try {
        outcome = await restore({ force: true, mutate: viaProxy(proxy.port) }).catch((err: Error) => err);
      } finally {
        await proxy.close();
      }
      assert.ok(proxy.cut(), 'the proxy cut the connection at COMMIT');
      const message = outcome instanceof Error ? outcome.message : 'the restore succeeded';
      if (lost === 'answer') {
        assert.doesNotMatch(message, /nothing was replaced/, 'the swap did commit: saying nothing was replaced is false');
        assert.ok(!(await publicTables('pachyderm')).includes('precious'), `the restored pachyderm database is in place (${message})`);
        assert.deepEqual(compareFingerprints(await cluster.sourceFingerprints(), await cluster.restoredFingerprints()), [], `the databases in place find every object they refer to (${message})`);
        assert.ok(!(outcome instanceof Error), `the swap committed: the restore succeeded (${message})`);
        assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm'], 'the replaced databases were dropped');
      } else {
        assert.match(message, /nothing was replaced: they are as before/);
        assert.deepEqual(await publicTables('pachyderm'), ['precious'], 'pachyderm is the old one');
        assert.deepEqual(await publicTables('dex'), ['kept'], 'dex is the old one');
        assert.deepEqual(await cluster.targetDatabases(), ['dex', 'pachyderm'], 'no copy left');
        assert.deepEqual(await cluster.restoredKeys(), [], 'the restored objects were removed');
      }
    });
  }

});
