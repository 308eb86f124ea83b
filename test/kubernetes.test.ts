/**
 * The `kubernetes` pause strategy and the Helm release reader, driven through the official
 * @kubernetes/client-node exactly as they would drive a real cluster.
 *
 * No Kubernetes API server can run in this environment, so the cluster is a FAKE: a
 * protocol-level HTTP server (test/helpers/fakeKube.ts) that serves the REST paths the client
 * calls (deployments and their scale subresource, replication controllers, pods by label selector,
 * secrets), applies merge and JSON patches, and simulates pods starting and terminating. The
 * client reaches it through an ordinary kubeconfig file with a bearer token.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { gzipSync, constants as zlibConstants } from 'node:zlib';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';
import { parse as parseYaml, stringify as toYaml } from 'yaml';
import { validateConfig } from '../src/config/load.js';
import { pauseSchema } from '../src/config/schema.js';
import { startLocalPostgres, type LocalPostgres } from '../src/demo/localPostgres.js';
import { createPachydermFixture } from '../src/demo/pachydermFixture.js';
import { runBackup } from '../src/engine/backup.js';
import type { EngineEvent } from '../src/engine/events.js';
import { FsObjectStore } from '../src/objectstore/fs.js';
import { createStrategy } from '../src/quiesce/factory.js';
import { readHelmRelease, readHelmReleaseValues } from '../src/quiesce/helmRelease.js';
import { KubernetesPause, PAUSED_AT_ANNOTATION, PAUSED_REPLICAS_ANNOTATION, type KubernetesPauseOptions } from '../src/quiesce/kubernetes.js';
import { LEDGER_KEY } from '../src/quiesce/ledger.js';
import { assertExpectedContext, WrongContextError, type PauseRecord, type QuiesceEvents } from '../src/quiesce/strategy.js';
import { FakeKube, type WorkloadKind } from './helpers/fakeKube.js';

const NS = 'pachyderm';
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CLI = join(ROOT, 'dist/src/cli/main.js');
const PAUSE_AND_HANG = join(ROOT, 'dist/test/fixtures/pauseAndHang.js');

interface Cluster {
  fake: FakeKube;
  dir: string;
  kubeconfig: string;
  workers: string[];
  strategy(overrides?: Partial<KubernetesPauseOptions>): KubernetesPause;
  counts(): number[];
}

/** pachd (1), pachw (2) and three worker RCs (1, 2, 3), in namespace `pachyderm` of context `prod`. */
async function startCluster(options: { pachw?: boolean; pachd?: boolean; podTerminationDelayMs?: number } = {}): Promise<Cluster> {
  const fake = await FakeKube.start({ podTerminationDelayMs: options.podTerminationDelayMs ?? 150, podStartDelayMs: 30 });
  const dir = await mkdtemp(join(tmpdir(), 'pachbackup-kube-'));
  if (options.pachd !== false) fake.addDeployment(NS, 'pachd', 1);
  if (options.pachw !== false) fake.addDeployment(NS, 'pachw', 2);
  // Not part of the pause: must never be touched.
  fake.addDeployment(NS, 'pg-bouncer', 1);
  const workers = [fake.addWorkerController(NS, 'edges', 1), fake.addWorkerController(NS, 'montage', 2), fake.addWorkerController(NS, 'stats', 3)];
  const kubeconfig = join(dir, 'kubeconfig');
  // `staging` points at a port nothing listens on: a different cluster that must never be contacted.
  await fake.writeKubeconfig(kubeconfig, [{ name: 'prod', namespace: NS }, { name: 'staging', server: 'http://127.0.0.1:9' }], 'staging');
  return {
    fake,
    dir,
    kubeconfig,
    workers,
    strategy: (overrides = {}) =>
      new KubernetesPause({
        kubeconfig,
        context: 'prod',
        namespace: NS,
        deployments: ['pachd', 'pachw'],
        workerSelector: 'suite=pachyderm,component=worker',
        timeoutSeconds: 20,
        pollIntervalMs: 20,
        ...overrides,
      }),
    counts: () => [
      fake.replicas('Deployment', NS, 'pachd') ?? -1,
      fake.replicas('Deployment', NS, 'pachw') ?? -1,
      ...workers.map((w) => fake.replicas('ReplicationController', NS, w) ?? -1),
    ],
  };
}

async function stopCluster(c: Cluster | undefined): Promise<void> {
  if (!c) return;
  await c.fake.close();
  await rm(c.dir, { recursive: true, force: true });
}

function collectEvents(): QuiesceEvents & { infos: string[]; warnings: string[] } {
  const infos: string[] = [];
  const warnings: string[] = [];
  return { infos, warnings, info: (m) => infos.push(m), warn: (m) => warnings.push(m) };
}

/** Pods of the paused workloads (pg-bouncer keeps running). */
function pausedWorkloadPods(c: Cluster): string[] {
  return c.fake.livePods(NS).filter((p) => !p.startsWith('pg-bouncer-'));
}

describe('kubernetes pause strategy (fake API server)', () => {
  let c: Cluster | undefined;
  afterEach(async () => {
    await stopCluster(c);
    c = undefined;
  });

  test('pause scales pachd, pachw and every worker RC to 0 and returns only once every pod is gone; resume restores 1, 2, 1, 2, 3', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    assert.equal(await strategy.describeTarget(), 'kubernetes context prod, namespace pachyderm: deployments pachd (1), pachw (2), 3 worker RCs (6 replicas)');
    const record = await strategy.plan();
    assert.equal(record.strategy, 'kubernetes');
    assert.match(record.target, /context prod, namespace pachyderm/);
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3], 'plan changes nothing');
    assert.equal(c.fake.requests.filter((r) => r.method !== 'GET').length, 0, 'plan only reads');

    const events = collectEvents();
    const started = Date.now();
    const paused = await strategy.pause(record, events);
    // Checked synchronously, before anything else can run: the fake's state when pause resolved.
    const podsWhenResolved = pausedWorkloadPods(c);
    assert.deepEqual(podsWhenResolved, [], 'no pod of the paused workloads may remain when pause resolves');
    assert.ok(Date.now() - started >= 150, 'pause waited for the terminating pods');
    assert.deepEqual(c.counts(), [0, 0, 0, 0, 0]);
    assert.equal(c.fake.replicas('Deployment', NS, 'pg-bouncer'), 1, 'other workloads are not touched');
    assert.ok(events.infos.some((m) => /waiting for \d+ pod\(s\) to stop/.test(m)), 'progress is reported');
    const state = paused.state as { workloads: Array<{ name: string; replicas?: number }> };
    assert.deepEqual(
      state.workloads.map((w) => [w.name, w.replicas]),
      [['pachd', 1], ['pachw', 2], [c.workers[0], 1], [c.workers[1], 2], [c.workers[2], 3]],
    );

    await strategy.resume(paused, events);
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3], 'exactly the original counts');
    assert.ok(c.fake.readyPods('Deployment', NS, 'pachd') >= 1, 'resume waited until pachd is available');
    const objects: Array<[WorkloadKind, string]> = [['Deployment', 'pachd'], ['Deployment', 'pachw'], ...c.workers.map((w): [WorkloadKind, string] => ['ReplicationController', w])];
    for (const [kind, name] of objects) {
      const annotations = c.fake.annotations(kind, NS, name) ?? {};
      assert.ok(!(PAUSED_REPLICAS_ANNOTATION in annotations) && !(PAUSED_AT_ANNOTATION in annotations), `annotations removed from ${name}`);
    }

    // Resume is safe to repeat.
    await strategy.resume(paused, events);
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
  });

  test('each object is annotated with its count before anything is scaled; workers are scaled only after pachd and pachw are gone', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    await strategy.pause(await strategy.plan(), collectEvents());
    const mutations = c.fake.mutations();
    const firstScale = mutations.findIndex((m) => m.op === 'scale');
    const annotations = mutations.slice(0, firstScale);
    assert.equal(annotations.length, 5, 'all five objects annotated before the first scale');
    const expected: Record<string, string> = { pachd: '1', pachw: '2', [c.workers[0]!]: '1', [c.workers[1]!]: '2', [c.workers[2]!]: '3' };
    for (const m of annotations) {
      assert.equal(m.op, 'annotate');
      const value = m.value as Record<string, string>;
      assert.equal(value[PAUSED_REPLICAS_ANNOTATION], expected[m.name], `annotation of ${m.name}`);
      assert.ok(!Number.isNaN(Date.parse(value[PAUSED_AT_ANNOTATION] ?? '')), 'paused-at is a timestamp');
    }
    assert.deepEqual(
      mutations.slice(firstScale).map((m) => [m.name, m.value]),
      [['pachd', 0], ['pachw', 0], [c.workers[0], 0], [c.workers[1], 0], [c.workers[2], 0]],
    );
    // The scale subresource was used, with a merge patch.
    const scaleRequests = c.fake.requests.filter((r) => r.method === 'PATCH' && r.path.endsWith('/scale'));
    assert.equal(scaleRequests.length, 5);
    assert.ok(scaleRequests.every((r) => r.contentType === 'application/merge-patch+json'));
    const firstWorkerScale = scaleRequests.find((r) => r.path.includes('/replicationcontrollers/'));
    assert.equal(firstWorkerScale?.livePodsBefore, 6 + 1, 'when the first worker RC is scaled, only the 6 worker pods and pg-bouncer remain');
    // The annotations stay while paused: the cluster itself remembers the counts.
    assert.equal(c.fake.annotations('ReplicationController', NS, c.workers[2]!)?.[PAUSED_REPLICAS_ANNOTATION], '3');
  });

  test('a cluster without pachw (older Pachyderm) is paused and resumed; pachw is recorded as absent', async () => {
    c = await startCluster({ pachw: false });
    const strategy = c.strategy();
    assert.match(await strategy.describeTarget(), /deployments pachd \(1\), pachw \(absent\), 3 worker RCs/);
    const record = await strategy.plan();
    const paused = await strategy.pause(record, collectEvents());
    assert.deepEqual(pausedWorkloadPods(c), []);
    assert.ok((paused.state as { workloads: Array<{ name: string; absent?: boolean }> }).workloads.some((w) => w.name === 'pachw' && w.absent === true));
    await strategy.resume(paused, collectEvents());
    assert.deepEqual(c.counts(), [1, -1, 1, 2, 3]);
  });

  test('a namespace without pachd is refused before any change', async () => {
    c = await startCluster({ pachd: false });
    await assert.rejects(c.strategy().plan(), /deployment pachd not found in kubernetes context prod, namespace pachyderm/);
    await assert.rejects(c.strategy({ namespace: 'default' }).plan(), /deployment pachd not found .*namespace default/);
    assert.equal(c.fake.mutations().length, 0);
  });

  test('resume falls back to the annotations when the record lacks a count, and restores a worker RC that appeared during the pause', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    const planned = await strategy.plan();
    // pachd creates a new pipeline between the plan and the pause.
    const late = c.fake.addWorkerController(NS, 'late', 2);
    const events = collectEvents();
    await strategy.pause(planned, events);
    assert.ok(events.warnings.some((w) => w.includes(late)), 'the new worker RC is reported');
    assert.equal(c.fake.replicas('ReplicationController', NS, late), 0);
    assert.equal(c.fake.annotations('ReplicationController', NS, late)?.[PAUSED_REPLICAS_ANNOTATION], '2');

    // A ledger from before the pause (crash before it was rewritten), with every count dropped.
    const damaged: PauseRecord = {
      ...planned,
      state: { ...planned.state, workloads: (planned.state as { workloads: Array<Record<string, unknown>> }).workloads.map(({ replicas: _drop, ...w }) => w) },
    };
    await strategy.resume(damaged, collectEvents());
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
    assert.equal(c.fake.replicas('ReplicationController', NS, late), 2);
    assert.equal(c.fake.annotations('ReplicationController', NS, late)?.[PAUSED_REPLICAS_ANNOTATION], undefined);
  });

  test('a cluster left paused by an earlier run is refused until it is resumed', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    const paused = await strategy.pause(await strategy.plan(), collectEvents());
    const before = c.fake.mutations().length;
    await assert.rejects(strategy.plan(), /still paused by an earlier pachbackup run: .*pachbackup resume/s);
    assert.equal(c.fake.mutations().length, before, 'the refused plan changed nothing');
    await strategy.resume(paused, collectEvents());
    await strategy.plan();
  });

  test('pods that do not stop within the timeout fail the pause with their names; resume then restores the counts', async () => {
    c = await startCluster({ podTerminationDelayMs: 10_000 });
    const strategy = c.strategy({ timeoutSeconds: 0.4 });
    const record = await strategy.plan();
    const started = Date.now();
    await assert.rejects(strategy.pause(record, collectEvents()), /pod\(s\) still running after 0\.4s .*pachd-.*\(terminating\)/);
    assert.ok(Date.now() - started < 5000, 'the timeout is honoured');
    // As the engine does in its finally block:
    await strategy.resume(record, collectEvents());
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
  });

  test('SIGINT during the wait aborts the pause', async () => {
    c = await startCluster({ podTerminationDelayMs: 10_000 });
    const strategy = c.strategy();
    const record = await strategy.plan();
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('interrupted by SIGINT')), 200);
    await assert.rejects(strategy.pause(record, collectEvents(), controller.signal), /interrupted by SIGINT|aborted/);
    await strategy.resume(record, collectEvents());
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
  });

  test('wrong expectedContext: refused before any change, without contacting the other cluster', async () => {
    c = await startCluster();
    const strategy = c.strategy({ expectedContext: 'staging' });
    assert.equal(await strategy.currentContext(), 'prod');
    await assert.rejects(assertExpectedContext(strategy, 'staging'), (err: unknown) => err instanceof WrongContextError && /context is "prod", but pause.expectedContext is "staging"/.test(err.message));
    await assert.rejects(strategy.plan(), WrongContextError);
    const record = await c.strategy().plan();
    await assert.rejects(strategy.pause(record, collectEvents()), WrongContextError);
    assert.equal(c.fake.requests.filter((r) => r.method !== 'GET').length, 0, 'the fake recorded no write');

    // Pointing at the unreachable "staging" cluster while production is expected: refused from the kubeconfig alone.
    const staging = c.strategy({ context: 'staging' });
    await assert.rejects(assertExpectedContext(staging, 'prod'), /context is "staging", but pause.expectedContext is "prod"/);
    await assertExpectedContext(c.strategy(), 'prod');
    await assertExpectedContext(c.strategy(), undefined);

    // Through the factory, as the CLI builds it, the guard is applied by the strategy itself too.
    const fromConfig = await createStrategy(
      pauseSchema.parse({ strategy: 'kubernetes', expectedContext: 'staging', kubernetes: { kubeconfig: c.kubeconfig, context: 'prod', namespace: NS } }),
    );
    await assert.rejects(fromConfig.plan(), WrongContextError);
    assert.equal(c.fake.mutations().length, 0);
  });

  test('the factory builds the strategy from pause.kubernetes; a missing section means the schema defaults', async () => {
    c = await startCluster();
    const strategy = await createStrategy(pauseSchema.parse({ strategy: 'kubernetes', kubernetes: { kubeconfig: c.kubeconfig, context: 'prod', namespace: NS } }));
    assert.equal(strategy.name, 'kubernetes');
    assert.match(await strategy.describeTarget(), /deployments pachd \(1\), pachw \(2\), 3 worker RCs/);
    const defaults = await createStrategy(pauseSchema.parse({ strategy: 'kubernetes' }));
    assert.equal(defaults.name, 'kubernetes');
  });

  test('kubeconfig problems are explained', async () => {
    c = await startCluster();
    await assert.rejects(c.strategy({ context: 'nope' }).describeTarget(), /has no context "nope"; it has: prod, staging/);
    await assert.rejects(c.strategy({ kubeconfig: join(c.dir, 'missing') }).describeTarget(), /cannot load .*missing/);
    await assert.rejects(c.strategy({ context: 'staging' }).describeTarget(), /cannot reach the API server http:\/\/127\.0\.0\.1:9/);
    const badToken = join(c.dir, 'bad-token');
    await writeFile(badToken, toYaml({ ...parseYaml(await readFile(c.kubeconfig, 'utf8')), users: [{ name: 'fake-user', user: { token: 'wrong' } }] }));
    await assert.rejects(c.strategy({ kubeconfig: badToken }).describeTarget(), /HTTP 401/);
  });

  test('a half-done pause (pachd and pachw at 0, the first worker RC scale keeps failing): resume restores exactly the original counts', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    const record = await strategy.plan();
    c.fake.failRequests((method, path) => method === 'PATCH' && path.includes('/replicationcontrollers/') && path.endsWith('/scale'), 500, 50);
    await assert.rejects(strategy.pause(record, collectEvents()), /scaling replication controller .* to 0 .*HTTP 500/);
    assert.deepEqual(c.counts(), [0, 0, 1, 2, 3], 'deployments paused, workers not');
    // As the engine does: resume from the record it holds (the plan's, since pause threw).
    await strategy.resume(record, collectEvents());
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
    for (const w of c.workers) assert.equal(c.fake.annotations('ReplicationController', NS, w)?.[PAUSED_REPLICAS_ANNOTATION], undefined);
  });

  test('a replica count the operator changed during the pause is kept by the resume', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    const paused = await strategy.pause(await strategy.plan(), collectEvents());
    // The operator brings pachw back by hand with more replicas, and scales one pipeline up.
    c.fake.scaleOutOfBand('Deployment', NS, 'pachw', 5);
    c.fake.scaleOutOfBand('ReplicationController', NS, c.workers[2]!, 4);
    const events = collectEvents();
    await strategy.resume(paused, events);
    assert.deepEqual(c.counts(), [1, 5, 1, 2, 4], 'the operator\'s counts are not overwritten with the recorded ones');
  });

  test('"pachbackup resume" from a ledger left after a completed resume changes nothing pachd has since scaled', async () => {
    c = await startCluster();
    const strategy = c.strategy();
    const paused = await strategy.pause(await strategy.plan(), collectEvents());
    await strategy.resume(paused, collectEvents());
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
    // The process died before the ledger was cleared (or clearing it failed: "RESUME FAILED ... run
    // pachbackup resume"). pachd runs again and puts one pipeline in standby, scales another up.
    c.fake.scaleOutOfBand('ReplicationController', NS, c.workers[0]!, 0);
    c.fake.scaleOutOfBand('ReplicationController', NS, c.workers[2]!, 5);
    // Hours later the operator runs "pachbackup resume" with the record from the ledger.
    await strategy.resume(paused, collectEvents());
    assert.deepEqual(c.counts(), [1, 2, 0, 2, 5], 'a resume of a cluster that is no longer paused must not rescale it to hours-old counts');
  });

  test('a count changed between the plan and the pause, then a failed pause: resume restores the count the pause found (as its warning promises), not the plan\'s', async () => {
    c = await startCluster({ podTerminationDelayMs: 10_000 });
    const strategy = c.strategy({ timeoutSeconds: 0.4 });
    const record = await strategy.plan();
    // While the engine writes the ledger (an S3 round trip), the operator scales pachw up.
    c.fake.scaleOutOfBand('Deployment', NS, 'pachw', 3);
    const events = collectEvents();
    await assert.rejects(strategy.pause(record, events), /still running after 0\.4s/);
    assert.ok(events.warnings.some((w) => /pachw changed from 2 to 3 replicas since the plan; 3 will be restored/.test(w)));
    // The engine resumes from the record it holds: the plan's (pause threw before returning its own).
    await strategy.resume(record, collectEvents());
    assert.equal(c.fake.replicas('Deployment', NS, 'pachw'), 3, 'the count pachw had right before it was scaled to 0');
  });

  test('a malformed kubeconfig is explained without printing its contents (the bearer token)', async () => {
    c = await startCluster();
    const lines = (await readFile(c.kubeconfig, 'utf8')).split('\n');
    const at = lines.findIndex((l) => l.includes(c!.fake.token));
    assert.ok(at >= 0, 'the kubeconfig holds the token');
    // A stray, over-indented line right after the token: a typical hand-edit mistake.
    lines.splice(at + 1, 0, `${' '.repeat(lines[at]!.search(/\S/) + 1)}client-key-data: oops`);
    const broken = join(c.dir, 'broken-kubeconfig');
    await writeFile(broken, lines.join('\n'));
    await assert.rejects(c.strategy({ kubeconfig: broken }).describeTarget(), (err: Error) => {
      assert.match(err.message, /cannot load .*broken-kubeconfig/);
      assert.ok(!err.message.includes(c!.fake.token), `the error prints the token: ${err.message}`);
      return true;
    });
  });
});

describe('kill -9 during the pause, then "pachbackup resume"', () => {
  let c: Cluster | undefined;
  let child: ChildProcess | undefined;
  afterEach(async () => {
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    child = undefined;
    await stopCluster(c);
    c = undefined;
  });

  for (const when of ['while waiting for pods to stop', 'after the pause completed'] as const) {
    test(`killed ${when}: the CLI resume restores exactly the original counts`, async () => {
      assert.ok(existsSync(CLI) && existsSync(PAUSE_AND_HANG), 'build first: npx tsc -p tsconfig.json');
      c = await startCluster({ podTerminationDelayMs: when === 'after the pause completed' ? 100 : 60_000 });
      const repoDir = join(c.dir, 'repository');
      const stateDir = join(c.dir, 'state');
      await mkdir(repoDir);
      await mkdir(join(c.dir, 'bucket'));
      const configFile = join(c.dir, 'pachbackup.yaml');
      await writeFile(
        configFile,
        toYaml({
          cluster: { postgres: { user: 'pachyderm' }, objectStore: { url: pathToFileURL(join(c.dir, 'bucket')).href } },
          repository: { url: pathToFileURL(repoDir).href },
          pause: { strategy: 'kubernetes', kubernetes: { kubeconfig: c.kubeconfig, context: 'prod', namespace: NS, timeoutSeconds: 30 } },
        }),
      );
      const env = { ...process.env, PACHBACKUP_STATE_DIR: stateDir };
      const proc = spawn(process.execPath, [PAUSE_AND_HANG, configFile, repoDir], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      child = proc;
      let stdout = '';
      let stderr = '';
      proc.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
      proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
      const fake = c.fake;
      const deadline = Date.now() + 20_000;
      const ready = (): boolean =>
        when === 'after the pause completed'
          ? stdout.includes('PAUSED')
          : stdout.includes('LEDGER-WRITTEN') && fake.replicas('Deployment', NS, 'pachd') === 0 && fake.replicas('Deployment', NS, 'pachw') === 0;
      while (!ready()) {
        if (proc.exitCode !== null) assert.fail(`the pausing process exited early (${proc.exitCode}): ${stderr}`);
        if (Date.now() > deadline) assert.fail(`the pausing process did not get there in time: ${stdout} ${stderr}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      proc.kill('SIGKILL');
      await new Promise((r) => proc.once('exit', r));
      assert.equal(proc.signalCode, 'SIGKILL');
      if (when === 'after the pause completed') assert.deepEqual(c.counts(), [0, 0, 0, 0, 0]);
      else assert.deepEqual(c.counts().slice(0, 2), [0, 0], 'killed mid-pause: deployments down');
      assert.ok(existsSync(join(repoDir, LEDGER_KEY)), 'the ledger survived the kill');

      const resume = await runCli(['resume', '--config', configFile], env);
      assert.equal(resume.code, 0, `pachbackup resume failed: ${resume.stderr}${resume.stdout}`);
      assert.match(resume.stdout + resume.stderr, /resumed kubernetes context prod, namespace pachyderm/);
      assert.deepEqual(c.counts(), [1, 2, 1, 2, 3], 'exactly the original counts');
      assert.ok(c.fake.readyPods('Deployment', NS, 'pachd') >= 1, 'pachd available again');
      assert.ok(!existsSync(join(repoDir, LEDGER_KEY)), 'the ledger is cleared after the resume');

      const again = await runCli(['resume', '--config', configFile], env);
      assert.equal(again.code, 0);
      assert.match(again.stdout, /no pause ledger/);
    });
  }
});

function runCli(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    proc.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('Helm values from the live release Secret (fake API server)', () => {
  let c: Cluster | undefined;
  afterEach(async () => {
    await stopCluster(c);
    c = undefined;
  });

  /** As Helm 3 stores a release (pkg/storage/driver/util.go): JSON, gzip, base64; the API base64-encodes the Secret data once more. */
  function helmReleaseData(release: object): string {
    return gzipSync(Buffer.from(JSON.stringify(release)), { level: zlibConstants.Z_BEST_COMPRESSION }).toString('base64');
  }

  function addRelease(fake: FakeKube, name: string, version: number, status: string, config: Record<string, unknown>): void {
    const release = {
      name,
      namespace: NS,
      version,
      info: { status, first_deployed: '2024-01-01T00:00:00Z' },
      chart: { metadata: { name: 'pachyderm', version: '2.11.6', appVersion: '2.11.6' }, values: { chartDefault: true } },
      config,
      manifest: '---\n# rendered manifests\n',
    };
    fake.addSecret(NS, `sh.helm.release.v1.${name}.v${version}`, { owner: 'helm', name, status, version: String(version) }, { release: helmReleaseData(release) }, 'helm.sh/release.v1');
  }

  test('the latest revision (highest N, numerically) is read and its user-supplied values returned as YAML', async () => {
    c = await startCluster();
    const latest = {
      deployTarget: 'AMAZON',
      pachd: { storage: { storageURL: 's3://prod-bucket', amazon: { secret: 'AWS-SECRET-VALUE' } } },
      global: { postgresql: { postgresqlHost: 'db.prod', postgresqlPassword: 'PG-PASSWORD-VALUE', postgresqlPort: '5432' } },
    };
    addRelease(c.fake, 'pachyderm', 1, 'superseded', { deployTarget: 'LOCAL' });
    addRelease(c.fake, 'pachyderm', 2, 'superseded', { deployTarget: 'MINIO' });
    addRelease(c.fake, 'pachyderm', 10, 'deployed', latest);
    addRelease(c.fake, 'pachyderm-other', 11, 'deployed', { deployTarget: 'GOOGLE' });
    c.fake.addSecret(NS, 'unrelated', { app: 'x' }, { password: 'x' });

    const yaml = await readHelmReleaseValues({ kubeconfig: c.kubeconfig, context: 'prod' }, NS, 'pachyderm');
    assert.deepEqual(parseYaml(yaml), latest);
    assert.ok(!yaml.includes('chartDefault'), 'only the user-supplied values, not the chart defaults');
    const details = await readHelmRelease({ kubeconfig: c.kubeconfig, context: 'prod' }, NS, 'pachyderm');
    assert.equal(details.revision, 10);
    assert.equal(details.status, 'deployed');
    assert.equal(details.chartVersion, '2.11.6');
    const list = c.fake.requests.find((r) => r.path === `/api/v1/namespaces/${NS}/secrets`);
    assert.equal(list?.query['labelSelector'], 'owner=helm,name=pachyderm');
  });

  test('a missing release or a damaged Secret is explained without printing any value', async () => {
    c = await startCluster();
    await assert.rejects(readHelmReleaseValues({ kubeconfig: c.kubeconfig, context: 'prod' }, NS, 'pachyderm'), /no Helm release "pachyderm" in namespace pachyderm/);
    c.fake.addSecret(NS, 'sh.helm.release.v1.pachyderm.v1', { owner: 'helm', name: 'pachyderm' }, { release: Buffer.from('SECRET-PLAINTEXT-THAT-IS-NOT-A-RELEASE').toString('base64') });
    await assert.rejects(readHelmReleaseValues({ kubeconfig: c.kubeconfig, context: 'prod' }, NS, 'pachyderm'), (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.match(err.message, /sh\.helm\.release\.v1\.pachyderm\.v1 .* is not a readable Helm release/);
      assert.ok(!err.message.includes('SECRET-PLAINTEXT'), 'the content is not in the message');
      return true;
    });
  });
});

describe('backup engine with the kubernetes strategy (fake API server, local PostgreSQL)', () => {
  let pg: LocalPostgres | undefined;
  let c: Cluster | undefined;
  before(async () => {
    pg = await startLocalPostgres();
  });
  after(async () => {
    await pg?.stop();
  });
  beforeEach(async () => {
    c = await startCluster();
  });
  afterEach(async () => {
    await stopCluster(c);
    c = undefined;
  });

  test('the dumps run only after every pod is gone, and the cluster is back at 1, 2, 1, 2, 3 afterwards', async () => {
    assert.ok(pg && c);
    const bucket = join(c.dir, 'bucket');
    const repository = join(c.dir, 'repository');
    await mkdir(bucket);
    await mkdir(repository);
    await createPachydermFixture(pg, new FsObjectStore(bucket), { chunks: 5 });
    process.env['PACHBACKUP_TEST_KUBE_PGPASSWORD'] = pg.password;
    const config = validateConfig(
      {
        cluster: {
          postgres: { host: pg.host, port: pg.port, user: pg.user, password: { env: 'PACHBACKUP_TEST_KUBE_PGPASSWORD' }, sslmode: 'disable', binDir: pg.binDir },
          objectStore: { url: pathToFileURL(bucket).href },
        },
        repository: { url: pathToFileURL(repository).href },
        pause: { strategy: 'kubernetes', kubernetes: { kubeconfig: c.kubeconfig, context: 'prod', namespace: NS } },
      },
      'test config',
    );
    const cluster = c;
    const podsAtPhase = new Map<string, string[]>();
    const emit = (e: EngineEvent): void => {
      if (e.type === 'phase-start') podsAtPhase.set(e.phase, pausedWorkloadPods(cluster));
    };
    const previousStateDir = process.env['PACHBACKUP_STATE_DIR'];
    process.env['PACHBACKUP_STATE_DIR'] = join(c.dir, 'state');
    try {
      const summary = await runBackup({ config, strategy: c.strategy(), emit });
      assert.equal(summary.mode, 'paused');
      assert.ok(summary.downtimeMs !== null && summary.downtimeMs >= 150);
    } finally {
      if (previousStateDir === undefined) delete process.env['PACHBACKUP_STATE_DIR'];
      else process.env['PACHBACKUP_STATE_DIR'] = previousStateDir;
    }
    assert.ok((podsAtPhase.get('pause') ?? []).length > 0, 'pods were running when the pause began');
    assert.deepEqual(podsAtPhase.get('snapshot'), [], 'no pod left when the dumps began');
    assert.deepEqual(podsAtPhase.get('copy'), [], 'no pod left when the copy began');
    assert.deepEqual(c.counts(), [1, 2, 1, 2, 3]);
  });
});
