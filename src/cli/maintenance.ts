import { InvalidArgumentError, Option, type Command } from 'commander';
import { openRepository } from '../engine/context.js';
import { parseDuration, runPrune, type Duration, type PruneReport, type RetentionPolicy } from '../engine/prune.js';
import { describeLock, listLocks, removeLocks, type LockEntry } from '../repository/lock.js';
import { formatBytes, formatMs } from './render.js';
import { EXIT_FAILED, load, positiveInt, run, type GlobalOptions } from './runner.js';

/** Repository upkeep: `prune` (retention, mark and sweep) and `unlock` (stale lease locks). */
export function registerMaintenanceCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('prune')
    .description('remove backups the retention policy does not keep, incomplete backups past the grace period, then objects no remaining backup needs')
    .option('--keep-last <n>', 'keep the n newest backups', positiveInt)
    .option('--keep-hourly <n>', 'keep the newest backup of each of the n most recent hours with backups (UTC)', positiveInt)
    .option('--keep-daily <n>', 'keep the newest backup of each of the n most recent days with backups (UTC)', positiveInt)
    .option('--keep-weekly <n>', 'keep the newest backup of each of the n most recent ISO weeks with backups (UTC)', positiveInt)
    .option('--keep-monthly <n>', 'keep the newest backup of each of the n most recent months with backups (UTC)', positiveInt)
    .option('--keep-yearly <n>', 'keep the newest backup of each of the n most recent years with backups (UTC)', positiveInt)
    .option('--keep-within <duration>', 'keep every backup started within this of the newest one, e.g. 7d, 36h, 2w', durationArg)
    .addOption(new Option('--grace <duration>', 'remove incomplete backups older than this').argParser(durationArg).default(parseDuration('24h'), '24h'))
    .option('--dry-run', 'say what would be removed and how many bytes it frees; change nothing', false)
    .action(
      async (opts: {
        keepLast?: number;
        keepHourly?: number;
        keepDaily?: number;
        keepWeekly?: number;
        keepMonthly?: number;
        keepYearly?: number;
        keepWithin?: Duration;
        grace: Duration;
        dryRun: boolean;
      }) => {
        await run(globals(), async ({ renderer, signal }) => {
          const policy: RetentionPolicy = {
            ...(opts.keepLast ? { last: opts.keepLast } : {}),
            ...(opts.keepHourly ? { hourly: opts.keepHourly } : {}),
            ...(opts.keepDaily ? { daily: opts.keepDaily } : {}),
            ...(opts.keepWeekly ? { weekly: opts.keepWeekly } : {}),
            ...(opts.keepMonthly ? { monthly: opts.keepMonthly } : {}),
            ...(opts.keepYearly ? { yearly: opts.keepYearly } : {}),
            ...(opts.keepWithin ? { within: opts.keepWithin } : {}),
          };
          if (Object.keys(policy).length === 0) {
            throw new InvalidArgumentError(
              'prune needs at least one keep option (--keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within); without one it would delete every backup',
            );
          }
          const config = load(globals(), []);
          const repo = openRepository(config);
          const report = await runPrune({ repo, policy, grace: opts.grace, dryRun: opts.dryRun, emit: renderer.sink, signal, command: commandLine() });
          renderer.result('prune', report, () => pruneReportText(report));
        });
      },
    );

  program
    .command('unlock [lock-id]')
    .description('remove stale repository locks (left by runs that died); with --force also live ones')
    .option('--all', 'every stale lock (the default without a lock id)', false)
    .option('--force', 'also remove live locks: only when you know their run is gone', false)
    .action(async (lockId: string | undefined, opts: { all: boolean; force: boolean }) => {
      await run(globals(), async ({ renderer }) => {
        if (lockId && opts.all) throw new InvalidArgumentError('give a lock id or --all, not both');
        if (opts.force && !lockId && !opts.all) throw new InvalidArgumentError('--force removes live locks: say which, with a lock id or --all');
        const repo = openRepository(load(globals(), []));
        await repo.open(false);
        const now = new Date();
        const locks = await listLocks(repo.store, now);
        const chosen = lockId ? locks.filter((l) => l.id === lockId) : locks;
        if (lockId && chosen.length === 0) {
          renderer.result('unlock', { removed: [], left: [], missing: lockId }, () => `no lock ${lockId} in ${repo.description}`);
          return EXIT_FAILED;
        }
        const removable = chosen.filter((l) => l.state !== 'live' || opts.force);
        const left = chosen.filter((l) => !removable.includes(l));
        for (const lock of removable.filter((l) => l.state === 'live')) {
          renderer.sink({
            type: 'warning',
            message: `REMOVING A LIVE LOCK: ${describeLock(lock, now)}. If that run is still going, it and the next run can now damage the repository together; it will notice and stop at its next heartbeat.`,
          });
        }
        await removeLocks(repo.store, removable.map((l) => l.id));
        const summary = (l: LockEntry) => ({ id: l.id, kind: l.kind, state: l.state, ...(l.reason ? { reason: l.reason } : {}), ...(l.info ? { holder: l.info } : {}) });
        renderer.result('unlock', { removed: removable.map(summary), left: left.map(summary) }, () => unlockText(removable, left, now));
        return lockId && left.length > 0 ? EXIT_FAILED : 0;
      }, { interrupt: 'exit' });
    });
}

function durationArg(value: string): Duration {
  try {
    return parseDuration(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** The command line as the lock records it, so a blocked run sees what holds the repository. */
function commandLine(): string {
  return ['pachbackup', ...process.argv.slice(2)].join(' ');
}

export function pruneReportText(r: PruneReport): string {
  const verb = r.dryRun ? 'would remove' : 'removed';
  const lines = [
    `${r.dryRun ? 'dry run: nothing was changed. ' : ''}${r.policy} in ${r.repository}`,
    `kept ${r.kept.length} backup(s):`,
    ...r.kept.map((k) => `  ${k.id}  ${k.startedAt}  (${k.reasons.join(', ')})`),
    `${verb} ${r.removed.length} backup(s)${r.removed.length ? ':' : ''}`,
    ...r.removed.map((b) => `  ${b.id}  ${b.startedAt}  ${b.files} files, ${formatBytes(b.bytes)}`),
  ];
  if (r.incomplete.removed.length) {
    lines.push(`${verb} ${r.incomplete.removed.length} incomplete backup(s) past the grace period:`);
    lines.push(...r.incomplete.removed.map((b) => `  ${b.id}  ${b.files} files, ${formatBytes(b.bytes)}`));
  }
  for (const b of r.incomplete.kept) lines.push(`kept incomplete ${b.id}: ${b.reason}`);
  for (const d of r.damaged) lines.push(`kept DAMAGED ${d.id}: ${d.problem}`);
  lines.push(
    `objects: ${verb} ${r.objects.removed} (${formatBytes(r.objects.removedBytes)}); ${r.objects.kept} (${formatBytes(r.objects.keptBytes)}) still needed`,
    `${r.dryRun ? 'would free' : 'freed'} ${formatBytes(r.bytesFreed)} (${r.bytesFreed} bytes) in ${formatMs(r.ms)}`,
  );
  return lines.join('\n');
}

function unlockText(removed: LockEntry[], left: LockEntry[], now: Date): string {
  if (removed.length === 0 && left.length === 0) return 'no locks to remove';
  return [
    ...removed.map((l) => `removed ${l.state} ${describeLock(l, now)}${l.reason && l.info ? `: ${l.reason}` : ''}`),
    ...left.map((l) => `left live ${describeLock(l, now)}; add --force to remove it if you are sure that run is gone`),
  ].join('\n');
}
