/**
 * Issue 6: `kill -9` of the backup process at 20 points — at named moments of every phase
 * (seen in its --json events), then at random times — against one real cluster (PostgreSQL 15,
 * filesystem stores, the command pause strategy writing a marker file). After every kill:
 *
 * - no backup the repository lists as complete fails `verify`, and none is listed as damaged;
 * - if the kill left the cluster paused, the pause ledger says so (`pachbackup status`);
 * - `pachbackup resume` returns the cluster to running (the marker's last word is "resumed"),
 *   and `status` then says not paused;
 * - the next backup succeeds and verifies.
 *
 * The kill points are chosen from outside, so the engine needs no crash hooks.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { addChunks } from '../src/demo/pachydermFixture.js';
import { openRepository } from '../src/engine/context.js';
import { verifyBackup } from '../src/engine/verify.js';
import { PauseLedger } from '../src/quiesce/ledger.js';
import { describeRun, TestCluster, type CliResult } from './helpers/cluster.js';

function record(t: TestContext, row: { category: string; fault: string; runs: number; detail: string }): void {
  t.diagnostic(`reliability ${JSON.stringify(row)}`);
}

/** A kill point: after an event of the --json stream, or after a time. */
type KillPoint =
  | { label: string; event: { type: 'phase-start' | 'phase-end'; phase: string } | { type: 'progress'; phase: string } | { type: 'result' }; args: string[]; paused: boolean | undefined }
  | { label: string; afterMs: number; args: string[]; paused: undefined };

// `paused`: whether the cluster must be paused (and the ledger present) right after this kill;
// undefined where the kill may land on either side of a pause or resume.
const PHASE_POINTS: KillPoint[] = [
  { label: 'preflight starts', event: { type: 'phase-start', phase: 'preflight' }, args: [], paused: false },
  { label: 'pre-copy starts', event: { type: 'phase-start', phase: 'precopy' }, args: [], paused: false },
  { label: 'pre-copy has copied objects', event: { type: 'progress', phase: 'precopy' }, args: [], paused: false },
  { label: 'pause starts (ledger written, pause command next)', event: { type: 'phase-start', phase: 'pause' }, args: [], paused: undefined },
  { label: 'pause done (ledger says paused)', event: { type: 'phase-end', phase: 'pause' }, args: [], paused: true },
  { label: 'snapshot starts (snapshots exported next)', event: { type: 'phase-start', phase: 'snapshot' }, args: [], paused: true },
  { label: 'copy starts (snapshot exported)', event: { type: 'phase-start', phase: 'copy' }, args: ['--no-precopy'], paused: true },
  { label: 'copy has copied objects', event: { type: 'progress', phase: 'copy' }, args: ['--no-precopy'], paused: true },
  { label: 'resume starts', event: { type: 'phase-start', phase: 'resume' }, args: [], paused: undefined },
  { label: 'dump starts (cluster resumed, pg_dump next)', event: { type: 'phase-start', phase: 'dump' }, args: [], paused: false },
  { label: 'seal starts', event: { type: 'phase-start', phase: 'seal' }, args: [], paused: false },
  { label: 'sealed (result printed)', event: { type: 'result' }, args: [], paused: false },
];
const RANDOM_POINTS = 20 - PHASE_POINTS.length;

/** A small seeded generator, so a failing run can be repeated with PACHBACKUP_CRASH_SEED. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('kill -9 of a backup at 20 points (fs)', () => {
  let cluster: TestCluster;
  let config: string;
  const stateDir = { previous: process.env.PACHBACKUP_STATE_DIR };
  // Every object read waits a little, so pre-copy and copy last long enough to be hit.
  const slowReads = { PACHBACKUP_FAULTS: JSON.stringify([{ store: 'cluster.objectStore', op: 'get', kind: 'delay', ms: 40 }]) };

  /** Two objects at a time; a short quiescence check, so 20 rounds stay quick. */
  const settings = (raw: Record<string, any>): void => {
    raw.backup.concurrency = 2;
    raw.pause.quiescence = { settleSeconds: 0.5 };
  };

  before(async () => {
    cluster = (await TestCluster.create({ kind: 'fs', target: false, chunks: 30, chunkSize: 8192 })) as TestCluster;
    // The local copy of the pause ledger goes to this cluster's directory, for the CLI and in-process runs alike.
    process.env.PACHBACKUP_STATE_DIR = join(cluster.work, 'state');
    config = await cluster.writeConfig(settings);
  });
  after(async () => {
    if (stateDir.previous === undefined) delete process.env.PACHBACKUP_STATE_DIR;
    else process.env.PACHBACKUP_STATE_DIR = stateDir.previous;
    await cluster?.cleanup();
  });

  /** Starts a backup and SIGKILLs it at `point`; resolves with its output and whether the kill happened first. */
  async function killedBackup(point: KillPoint): Promise<{ run: CliResult; killed: boolean; elapsedMs: number }> {
    const started = Date.now();
    const { child, done } = cluster.spawnCli(['--config', config, '--json', '--yes', 'backup', ...point.args], { env: slowReads, timeoutMs: 120_000 });
    let killed = false;
    const kill = (): void => {
      if (!killed && child.exitCode === null && child.signalCode === null) {
        killed = true;
        child.kill('SIGKILL');
      }
    };
    let timer: NodeJS.Timeout | undefined;
    if ('afterMs' in point) {
      timer = setTimeout(kill, point.afterMs);
    } else {
      let buffered = '';
      child.stdout!.on('data', (chunk: Buffer) => {
        buffered += chunk.toString();
        const lines = buffered.split('\n');
        buffered = lines.pop() ?? '';
        for (const line of lines) {
          let event: Record<string, any>;
          try {
            event = JSON.parse(line) as Record<string, any>;
          } catch {
            continue;
          }
          const want = point.event;
          if (event.type !== want.type) continue;
          if ('phase' in want && event.phase !== want.phase) continue;
          if (want.type === 'progress' && !(event.done > 0)) continue;
          kill();
        }
      });
    }
    const run = await done;
    clearTimeout(timer);
    return { run, killed: killed && run.signal === 'SIGKILL', elapsedMs: Date.now() - started };
  }

  const verified = new Set<string>();

  /** Every backup listed as complete verifies; nothing is listed as damaged. Returns how many were checked now. */
  async function assertListedBackupsVerify(label: string): Promise<number> {
    const repo = openRepository(cluster.config());
    await repo.open(false);
    const listing = await repo.listBackups();
    assert.deepEqual(listing.damaged, [], `${label}: no backup is listed as damaged`);
    let checked = 0;
    for (const manifest of listing.sealed) {
      if (verified.has(manifest.id)) continue;
      const report = await verifyBackup({ repo, manifest, emit: () => undefined, concurrency: 4 });
      assert.equal(report.ok, true, `${label}: listed backup ${manifest.id} fails verify: ${JSON.stringify(report.problems)}`);
      verified.add(manifest.id);
      checked++;
    }
    return checked;
  }

  async function repositoryId(): Promise<string> {
    const repo = openRepository(cluster.config());
    await repo.open(false);
    return repo.id;
  }
  const repoStore = () => cluster.repositoryStore();

  async function status(): Promise<boolean> {
    const run = await cluster.runCli(['--config', config, '--json', 'status']);
    assert.equal(run.code, 0, describeRun(run));
    return run.result!.paused as boolean;
  }

  test('after every kill: listed backups verify, resume restores the cluster, the next backup succeeds', { timeout: 900_000 }, async (t) => {
    const seed = Number(process.env.PACHBACKUP_CRASH_SEED ?? Date.now() % 1_000_000);
    const random = mulberry32(seed);
    t.diagnostic(`seed ${seed} (repeat with PACHBACKUP_CRASH_SEED=${seed})`);

    // A reference run without a kill gives the time scale of the random points.
    await addChunks(cluster.source, cluster.clusterStore(), 10, { chunkSize: 8192 });
    const referenceStarted = Date.now();
    const reference = await cluster.runCli(['--config', config, '--json', '--yes', 'backup'], { env: slowReads });
    assert.equal(reference.code, 0, describeRun(reference));
    const scaleMs = Date.now() - referenceStarted;
    await cluster.resetMarker();

    const points: KillPoint[] = [
      ...PHASE_POINTS,
      ...Array.from({ length: RANDOM_POINTS }, (_, i): KillPoint => {
        const afterMs = Math.round((0.1 + 0.8 * random()) * scaleMs);
        return { label: `at random, ${afterMs} ms after start`, afterMs, args: i % 2 === 0 ? [] : ['--no-precopy'], paused: undefined };
      }),
    ];
    const outcomes: string[] = [];
    let kills = 0;
    let attempts = 0;
    let leftPaused = 0;
    let extraResumes = 0;
    const spent = { killedRuns: 0, checks: 0, nextBackups: 0 };
    for (const [i, planned] of points.entries()) {
      const roundStarted = Date.now();
      // New objects for the killed run to copy.
      await addChunks(cluster.source, cluster.clusterStore(), 8, { chunkSize: 8192 });
      let point = planned;
      let result = await killedBackup(point);
      attempts++;
      // A random point later than the run: try again earlier, so every point is a kill.
      while (!result.killed && 'afterMs' in point && attempts < 60) {
        assert.equal(result.run.code, 0, describeRun(result.run));
        point = { ...point, label: `at random, ${Math.round(point.afterMs / 2)} ms after start`, afterMs: Math.round(point.afterMs / 2) };
        result = await killedBackup(point);
        attempts++;
      }
      const label = `point ${i + 1} (${point.label})`;
      assert.ok(result.killed, `${label}: the process was killed before it finished: ${describeRun(result.run)}`);
      kills++;
      const checksStarted = Date.now();
      spent.killedRuns += checksStarted - roundStarted;

      const markerAfterKill = await cluster.markerLines();
      const pausedAfterKill = markerAfterKill[markerAfterKill.length - 1] === 'paused';

      await assertListedBackupsVerify(label);

      // resume reports whether it found a pause ledger: that is what `status` would have said.
      const resume = await cluster.runCli(['--config', config, '--json', 'resume']);
      assert.equal(resume.code, 0, `${label}: ${describeRun(resume)}`);
      const ledgerSaysPaused = resume.result?.resumed === true;
      if (pausedAfterKill) {
        leftPaused++;
        assert.equal(ledgerSaysPaused, true, `${label}: the cluster was left paused, so a pause ledger must remain`);
      }
      if (point.paused !== undefined) assert.equal(ledgerSaysPaused, point.paused, `${label}: a pause ledger was ${ledgerSaysPaused ? '' : 'not '}found`);
      if (ledgerSaysPaused && !pausedAfterKill) extraResumes++;
      const marker = await cluster.markerLines();
      if (marker.length > 0) assert.equal(marker[marker.length - 1], 'resumed', `${label}: the cluster runs again (marker: ${marker.join(',')})`);
      assert.ok(marker.filter((l) => l === 'resumed').length >= marker.filter((l) => l === 'paused').length, `${label}: every pause was resumed`);
      // `pachbackup status` where resume had something to do; elsewhere the same ledger, read in-process (quicker).
      const stillPaused = ledgerSaysPaused ? await status() : Boolean(await new PauseLedger(repoStore(), await repositoryId()).read());
      assert.equal(stillPaused, false, `${label}: status says not paused after resume`);

      // The next backup succeeds (in-process, quicker than another CLI start) and verifies.
      const nextStarted = Date.now();
      spent.checks += nextStarted - checksStarted;
      const next = await cluster.backup(settings);
      assert.equal(next.objects.count, await sourceObjectCount(cluster));
      await assertListedBackupsVerify(`${label}, next backup ${next.id}`);
      spent.nextBackups += Date.now() - nextStarted;
      outcomes.push(`${point.label}: ${pausedAfterKill ? 'left paused, resumed' : ledgerSaysPaused ? 'ledger present, resumed' : 'not paused'}`);
      await cluster.resetMarker();
    }
    t.diagnostic(outcomes.join('\n'));
    t.diagnostic(`time: killed runs ${(spent.killedRuns / 1000).toFixed(1)} s, checks and resume ${(spent.checks / 1000).toFixed(1)} s, next backups ${(spent.nextBackups / 1000).toFixed(1)} s`);
    const phaseKills = PHASE_POINTS.length;
    record(t, {
      category: 'process',
      fault: 'kill -9 of the backup at a named point of each phase (preflight, pre-copy, pause, snapshot, copy, resume, seal, after the seal)',
      runs: phaseKills,
      detail: `${phaseKills} kills; listed backups always verify; resume always returned the cluster to running; the next backup always succeeded`,
    });
    record(t, {
      category: 'process',
      fault: 'kill -9 of the backup at a random time',
      runs: kills - phaseKills,
      detail: `${kills - phaseKills} kills (${attempts - kills} runs finished before their kill time and were repeated earlier), seed ${seed}; ${leftPaused} of all ${kills} kills left the cluster paused and ${extraResumes} more left a ledger from just before a pause or after a resume: all resumed by "pachbackup resume"`,
    });
    assert.equal(kills, 20);
  });
});

async function sourceObjectCount(cluster: TestCluster): Promise<number> {
  let n = 0;
  for await (const _ of cluster.clusterStore().list()) n++;
  return n;
}
