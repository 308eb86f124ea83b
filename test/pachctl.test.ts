/**
 * The `pachctl` pause strategy against a fake `pachctl` executable (test/fixtures/fake-pachctl.mjs)
 * put first on PATH. The fake records every call with its context variables and reports pause
 * states as `pachctl enterprise pause-status` does.
 */
import assert from 'node:assert/strict';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { pauseSchema } from '../src/config/schema.js';
import { createStrategy } from '../src/quiesce/factory.js';
import { PachctlPause, type PachctlPauseOptions } from '../src/quiesce/pachctl.js';
import { assertExpectedContext, WrongContextError, type QuiesceEvents } from '../src/quiesce/strategy.js';

const FAKE_PACHCTL = fileURLToPath(new URL('../../test/fixtures/fake-pachctl.mjs', import.meta.url));

interface Call {
  args: string[];
  PACH_CONTEXT: string | null;
  PACH_ENTERPRISE_CONTEXT: string | null;
}

interface Fixture {
  dir: string;
  env: NodeJS.ProcessEnv;
  strategy(overrides?: Partial<PachctlPauseOptions>): PachctlPause;
  calls(): Promise<Call[]>;
  commands(): Promise<string[]>;
}

async function fixture(behavior: 'normal' | 'stuck' | 'no-enterprise' = 'normal'): Promise<Fixture> {
  const dir = await mkdtemp(join(tmpdir(), 'pachbackup-pachctl-'));
  const bin = join(dir, 'bin');
  await mkdir(bin);
  await copyFile(FAKE_PACHCTL, join(bin, 'pachctl'));
  await chmod(join(bin, 'pachctl'), 0o755);
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PATH: `${bin}:${process.env['PATH'] ?? ''}`,
    FAKE_PACHCTL_DIR: dir,
    FAKE_PACHCTL_BEHAVIOR: behavior,
    FAKE_PACHCTL_CONTEXTS: 'local,prod,staging',
    FAKE_PACHCTL_ACTIVE: 'local',
    // The user's config names an active enterprise context: PACH_CONTEXT alone would be ignored.
    FAKE_PACHCTL_ACTIVE_ENTERPRISE: 'staging',
  };
  delete env['PACH_CONTEXT'];
  delete env['PACH_ENTERPRISE_CONTEXT'];
  const calls = async (): Promise<Call[]> => {
    try {
      return (await readFile(join(dir, 'calls.jsonl'), 'utf8'))
        .split('\n')
        .filter((l) => l !== '')
        .map((l) => JSON.parse(l) as Call);
    } catch {
      return [];
    }
  };
  return {
    dir,
    env,
    strategy: (overrides = {}) => new PachctlPause({ path: 'pachctl', context: 'prod', timeoutSeconds: 10, pollIntervalMs: 20, env, ...overrides }),
    calls,
    commands: async () => (await calls()).map((c) => c.args.join(' ')),
  };
}

/** What pause-status prints now, asked through the fake itself. */
async function reportedStatus(f: Fixture): Promise<string> {
  const { execFile } = await import('node:child_process');
  return new Promise((resolve, reject) =>
    execFile('pachctl', ['enterprise', 'pause-status'], { env: f.env }, (err, stdout) => (err ? reject(err) : resolve(stdout.trim()))),
  );
}

function collectEvents(): QuiesceEvents & { infos: string[]; warnings: string[] } {
  const infos: string[] = [];
  const warnings: string[] = [];
  return { infos, warnings, info: (m) => infos.push(m), warn: (m) => warnings.push(m) };
}

describe('pachctl pause strategy (fake pachctl on PATH)', () => {
  let f: Fixture | undefined;
  beforeEach(() => {
    f = undefined;
  });
  afterEach(async () => {
    if (f) await rm(f.dir, { recursive: true, force: true });
  });

  test('pause, then resume, in order, always against the configured context', async () => {
    f = await fixture();
    const strategy = f.strategy();
    assert.equal(await strategy.currentContext(), 'prod');
    assert.equal(await strategy.describeTarget(), 'pachctl context prod (pachctl enterprise pause)');
    const record = await strategy.plan();
    assert.deepEqual(record.state, { context: 'prod' });
    const events = collectEvents();
    await strategy.pause(record, events);
    const afterPause = await f.commands();
    assert.equal(afterPause[afterPause.length - 1], 'enterprise pause-status');
    await strategy.resume(record, events);

    for (const call of await f.calls()) {
      assert.equal(call.PACH_CONTEXT, 'prod', `${call.args.join(' ')} carries PACH_CONTEXT`);
      assert.equal(call.PACH_ENTERPRISE_CONTEXT, 'prod', `${call.args.join(' ')} carries PACH_ENTERPRISE_CONTEXT`);
    }
    const enterprise = (await f.commands()).filter((c) => c.startsWith('enterprise '));
    const pauseAt = enterprise.indexOf('enterprise pause');
    const unpauseAt = enterprise.indexOf('enterprise unpause');
    assert.ok(pauseAt >= 0 && unpauseAt > pauseAt, `pause before unpause: ${enterprise.join(' | ')}`);
    assert.ok(enterprise.slice(pauseAt + 1, unpauseAt).every((c) => c === 'enterprise pause-status'), 'only status polls between pause and unpause');
    assert.equal(enterprise.filter((c) => c === 'enterprise pause').length, 1);
    assert.equal(enterprise.filter((c) => c === 'enterprise unpause').length, 1);
    assert.equal(enterprise[enterprise.length - 1], 'enterprise pause-status', 'resume polls until unpaused');
    assert.equal(await reportedStatus(f), 'unpaused');
    assert.ok(events.infos.some((m) => m === 'pause-status: unpaused'), 'the status before pachd restarted is polled through');
    assert.ok(events.infos.some((m) => m === 'pause-status: partially-paused'), 'intermediate states are reported');
  });

  test('without a configured context the active enterprise context is used and named', async () => {
    f = await fixture();
    const strategy = f.strategy({ context: undefined });
    assert.equal(await strategy.currentContext(), 'staging');
    const record = await strategy.plan();
    // The resolved context is recorded, so resume reaches the same cluster even if the active one changes.
    assert.deepEqual(record.state, { context: 'staging' });
    assert.match(record.target, /pachctl context staging/);
  });

  test('a pause-status that never reaches paused times out cleanly, and the resume that follows unpauses', async () => {
    f = await fixture('stuck');
    const strategy = f.strategy({ timeoutSeconds: 3 });
    const record = await strategy.plan();
    const started = Date.now();
    await assert.rejects(strategy.pause(record, collectEvents()), /pause-status still reports "partially-paused" after 3s, not "paused" .*the cluster is unpaused/);
    assert.ok(Date.now() - started < 8000, 'the timeout is honoured');
    // What the engine does in its finally block:
    await strategy.resume(record, collectEvents());
    const enterprise = (await f.commands()).filter((c) => c.startsWith('enterprise '));
    assert.ok(enterprise.indexOf('enterprise unpause') > enterprise.indexOf('enterprise pause'), 'unpause was called after the timed-out pause');
    assert.equal(await reportedStatus(f), 'unpaused');
  });

  test('pachctl failures show its stderr', async () => {
    f = await fixture('no-enterprise');
    const strategy = f.strategy();
    const record = await strategy.plan();
    await assert.rejects(strategy.pause(record, collectEvents()), /pachctl enterprise pause failed to pause the cluster \(exit 1\): .*enterprise features are not enabled/s);
    await assert.rejects(f.strategy({ context: 'nope' }).currentContext(), /refers to a context \("nope"\) that does not exist/);
    await assert.rejects(f.strategy({ path: join(f.dir, 'no-such-pachctl') }).describeTarget(), /not found; install pachctl or set pause.pachctl.path/);
  });

  test('an interruption right after the pause was sent still unpauses, though pause-status said unpaused', async () => {
    f = await fixture();
    const strategy = f.strategy();
    const record = await strategy.plan();
    const controller = new AbortController();
    // Aborted before the first poll: pachd has not restarted yet, so pause-status would say unpaused.
    const events: QuiesceEvents = { info: () => controller.abort(new Error('interrupted by SIGINT')), warn: () => undefined };
    await assert.rejects(strategy.pause(record, events, controller.signal), /interrupted by SIGINT/);
    await strategy.resume(record, collectEvents());
    assert.ok((await f.commands()).includes('enterprise unpause'));
    assert.equal(JSON.parse(await readFile(join(f.dir, 'state.json'), 'utf8')).mode, 'full', 'pachd-config MODE is back to unpaused');
    assert.equal(await reportedStatus(f), 'unpaused');
  });

  test('resume of a cluster that never paused is harmless', async () => {
    f = await fixture();
    const strategy = f.strategy();
    await strategy.resume(await strategy.plan(), collectEvents());
    assert.equal(JSON.parse(await readFile(join(f.dir, 'state.json'), 'utf8')).mode, 'full');
    assert.equal(await reportedStatus(f), 'unpaused');
  });

  test('a cluster that is already paused is refused by the plan', async () => {
    f = await fixture();
    const strategy = f.strategy();
    const record = await strategy.plan();
    await strategy.pause(record, collectEvents());
    await assert.rejects(strategy.plan(), /already paused: if pachbackup left it so, run "pachbackup resume"/);
    await strategy.resume(record, collectEvents());
  });

  test('wrong expectedContext: refused before pachctl pauses anything', async () => {
    f = await fixture();
    const strategy = f.strategy({ expectedContext: 'staging' });
    await assert.rejects(assertExpectedContext(strategy, 'staging'), WrongContextError);
    await assert.rejects(strategy.plan(), WrongContextError);
    await assert.rejects(strategy.pause({ strategy: 'pachctl', target: 'x', startedAt: '', state: { context: 'prod' } }, collectEvents()), WrongContextError);
    await assertExpectedContext(f.strategy(), 'prod');
    assert.ok(!(await f.commands()).some((c) => c === 'enterprise pause' || c === 'enterprise unpause'), 'no pause or unpause was sent');

    const fromConfig = await createStrategy(pauseSchema.parse({ strategy: 'pachctl', expectedContext: 'local', pachctl: { context: 'prod' } }));
    assert.equal(fromConfig.name, 'pachctl');
  });

  test('the command strategy cannot be checked against expectedContext, so it is refused; none passes', async () => {
    const command = await createStrategy(pauseSchema.parse({ strategy: 'command', command: { pause: ['true'], resume: ['true'] } }));
    await assert.rejects(assertExpectedContext(command, 'prod'), /cannot tell which context it pauses/);
    await assertExpectedContext(command, undefined);
    await assertExpectedContext(await createStrategy(pauseSchema.parse({ strategy: 'none' })), 'prod');
  });
});
