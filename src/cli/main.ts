#!/usr/bin/env node
// The SDK version is pinned by package-lock.json and supports Node 20; its notice about future
// releases needing Node 22 would only clutter every command's output.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
import { Command, Option } from 'commander';
import type { ConfigOverride } from '../config/load.js';
import { runBackup, runPlan } from '../engine/backup.js';
import { newRetryTally, openRepository } from '../engine/context.js';
import { restoreTargetsFromConfig, runRestore } from '../engine/restore.js';
import { verifyBackup } from '../engine/verify.js';
import { PauseLedger } from '../quiesce/ledger.js';
import { acquireLock, describeLock, lockExpiry, LockConflictError, type LockHandle } from '../repository/lock.js';
import { createStrategy, resumeLedgerEntry } from '../quiesce/factory.js';
import { TOOL_VERSION } from '../version.js';
import { tuneHeapForStreaming } from '../process/heapTuning.js';
import { registerMaintenanceCommands } from './maintenance.js';
import { backupSummaryText, confirmPause, planText, listingText, manifestText, restoreSummaryText, verifyReportText } from './commands.js';
import { registerDrillCommands } from './drill.js';
import { registerScheduleCommands } from './schedule.js';
import { registerKeyCommands } from './keys.js';
import { LIMITS } from '../config/schema.js';
import { EXIT_FAILED, EXIT_USAGE, intUpTo, load, parseDbMap, positiveInt, positiveNumber, run, type GlobalOptions } from './runner.js';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('pachbackup')
    .description('Back up and restore a Pachyderm cluster: its PostgreSQL databases and its object store, as one consistent point in time.')
    .version(TOOL_VERSION)
    .option('-c, --config <file>', 'configuration file', './pachbackup.yaml')
    .option('--json', 'print one JSON event per line on stdout', false)
    .option('--metrics-file <path>', 'after backup, restore, verify and drill, write Prometheus metrics here (node-exporter textfile collector)')
    .option('-y, --yes', 'confirm pausing the cluster without asking (for automation)', false)
    .showHelpAfterError()
    // Usage errors exit 2, like configuration errors; help and version exit 0. Help shown because
    // a command is missing (`pachbackup`, `pachbackup key`) is a usage error too: commander gives
    // it exit code 1 and the code 'commander.help' that `pachbackup help` also has.
    .exitOverride((err) => {
      if (err.exitCode === 0) process.exit(0);
      // With --json a refused command line is an error event too, as a refused config is: a
      // wrapper that reads stdout sees why, not nothing (commander wrote the text to stderr).
      if (program.opts<GlobalOptions>().json) {
        const message = err.code === 'commander.help' ? 'a command is missing; pachbackup --help lists them' : err.message.replace(/^error: /, '');
        process.stdout.write(`${JSON.stringify({ time: new Date().toISOString(), type: 'error', message })}\n`);
      }
      process.exit(EXIT_USAGE);
    });

  const globals = (): GlobalOptions => program.opts<GlobalOptions>();

  program
    .command('backup')
    .description('back up the cluster: preflight, pre-copy, pause, dump, copy, resume, seal')
    .option('--concurrency <n>', 'objects copied at once', intUpTo(LIMITS.concurrency))
    .addOption(new Option('--mode <mode>', 'paused: pause the cluster; online: no pause, completeness proven').choices(['paused', 'online']))
    .option('--no-precopy', 'do not copy objects before pausing')
    .addOption(new Option('--pause-strategy <name>', 'override pause.strategy').choices(['none', 'command', 'kubernetes', 'pachctl']))
    .option('--max-downtime <seconds>', 'abort and resume if the pause would last longer', positiveNumber)
    .action(async (opts: { concurrency?: number; mode?: string; precopy: boolean; pauseStrategy?: string; maxDowntime?: number }) => {
      await run(globals(), async ({ renderer, signal }) => {
        const overrides: ConfigOverride[] = [];
        if (opts.concurrency) overrides.push(['backup.concurrency', opts.concurrency]);
        if (opts.mode) overrides.push(['backup.mode', opts.mode]);
        if (!opts.precopy) overrides.push(['backup.precopy', false]);
        if (opts.pauseStrategy) overrides.push(['pause.strategy', opts.pauseStrategy]);
        if (opts.maxDowntime) overrides.push(['pause.maxDowntimeSeconds', opts.maxDowntime]);
        const config = load(globals(), overrides);
        const strategy = await createStrategy(config.pause);
        const summary = await runBackup({
          config,
          strategy,
          emit: renderer.sink,
          signal,
          confirm: (target) => confirmPause(target, globals().yes, config),
        });
        renderer.result('backup', summary, () => backupSummaryText(summary));
      }, { metrics: 'backup' });
    });

  program
    .command('plan')
    .description('predict the next backup\'s downtime and total time, from the repository\'s history, without pausing')
    .addOption(new Option('--mode <mode>', 'predict for this mode').choices(['paused', 'online']))
    .option('--no-precopy', 'predict without pre-copy')
    .action(async (opts: { mode?: string; precopy: boolean }) => {
      await run(globals(), async ({ renderer }) => {
        const overrides: ConfigOverride[] = [];
        if (opts.mode) overrides.push(['backup.mode', opts.mode]);
        if (!opts.precopy) overrides.push(['backup.precopy', false]);
        const plan = await runPlan(load(globals(), overrides));
        renderer.result('plan', plan, () => planText(plan));
      }, { interrupt: 'exit' });
    });

  program
    .command('restore <backup>')
    .description('restore a backup (an id or "latest") into new databases and a new bucket')
    .option('--db-map <map>', 'target database names, e.g. pachyderm=pach2,dex=dex2', parseDbMap)
    .option('--target-url <url>', 'override restore.objectStore.url')
    .option('--helm-values-out <file>', 'write the kept Helm values, rewritten for the targets, here')
    .option('--force', 'restore into non-empty targets (non-empty databases are dropped and recreated)', false)
    .option('--dry-run', 'print the plan and change nothing', false)
    .option('--concurrency <n>', 'objects copied at once', intUpTo(LIMITS.concurrency))
    .option('--jobs <n>', 'override restore.jobs: pg_restore --jobs (the dump is downloaded to $TMPDIR first when above 1)', intUpTo(LIMITS.jobs))
    .action(async (backup: string, opts: { dbMap?: Record<string, string>; targetUrl?: string; helmValuesOut?: string; force: boolean; dryRun: boolean; concurrency?: number; jobs?: number }) => {
      await run(globals(), async ({ renderer, signal }) => {
        const overrides: ConfigOverride[] = [];
        if (opts.jobs) overrides.push(['restore.jobs', opts.jobs]);
        if (opts.targetUrl) overrides.push(['restore.objectStore.url', opts.targetUrl]);
        if (opts.helmValuesOut) overrides.push(['restore.helmValuesOut', opts.helmValuesOut]);
        for (const [role, name] of Object.entries(opts.dbMap ?? {})) overrides.push([`restore.databases.${role}`, name]);
        const config = load(globals(), overrides);
        const summary = await runRestore({
          config,
          backup,
          targets: restoreTargetsFromConfig(config),
          force: opts.force,
          dryRun: opts.dryRun,
          noOwner: config.restore?.noOwner ?? true,
          concurrency: opts.concurrency ?? config.backup.concurrency,
          emit: renderer.sink,
          signal,
        });
        renderer.result('restore', summary, () => restoreSummaryText(summary));
      }, { metrics: 'restore' });
    });

  program
    .command('verify <backup>')
    .description('re-read every file of a backup and check sizes and checksums')
    .option('--concurrency <n>', 'objects read at once', intUpTo(LIMITS.concurrency))
    .action(async (backup: string, opts: { concurrency?: number }) => {
      await run(globals(), async ({ renderer, signal }) => {
        const config = load(globals(), []);
        const retries = newRetryTally((message) => renderer.sink({ type: 'warning', message }));
        const repo = openRepository(config, { retry: retries.policy() });
        await repo.open(false);
        // A read lock, so a prune cannot delete what is being verified.
        const lock = await acquireLock(repo.store, 'read', { command: `pachbackup verify ${backup}` }, { onEvent: renderer.sink });
        try {
          const manifest = await repo.resolve(backup);
          const report = await verifyBackup({ repo, manifest, emit: renderer.sink, concurrency: opts.concurrency ?? config.backup.concurrency, signal, retries });
          renderer.result('verify', report, () => verifyReportText(report));
          return report.ok ? 0 : EXIT_FAILED;
        } finally {
          await lock.release();
        }
      }, { metrics: 'verify' });
    });

  program
    .command('list')
    .description('list the backups in the repository')
    .action(async () => {
      await run(globals(), async ({ renderer }) => {
        const repo = openRepository(load(globals(), []));
        await repo.open(false);
        const listing = await repo.listBackups();
        renderer.result('list', { backups: listing.sealed, incomplete: listing.incomplete, damaged: listing.damaged }, () => listingText(listing));
      }, { interrupt: 'exit' });
    });

  program
    .command('show <backup>')
    .description('show one backup (an id or "latest")')
    .action(async (backup: string) => {
      await run(globals(), async ({ renderer }) => {
        const repo = openRepository(load(globals(), []));
        await repo.open(false);
        const manifest = await repo.resolve(backup);
        renderer.result('show', { manifest }, () => manifestText(manifest));
      }, { interrupt: 'exit' });
    });

  program
    .command('resume')
    .description('resume a cluster left paused by an interrupted backup, from the pause ledger')
    .option('--force', 'resume even while a live backup lock is held (only when that run is known to be gone)')
    .action(async (opts: { force?: boolean }) => {
      await run(globals(), async ({ renderer }) => {
        const config = load(globals(), []);
        const repo = openRepository(config);
        await repo.open(false);
        const ledger = new PauseLedger(repo.store, repo.id);
        const nothingPaused = (): void => renderer.result('resume', { resumed: false }, () => 'no pause ledger: pachbackup has not left the cluster paused');
        const seen = await ledger.read();
        if (!seen) return nothingPaused();
        // The backup lock, held while resuming: a backup starting meanwhile would write a ledger
        // of its own that this resume must not clear, and pause a cluster this resume scales back.
        let lock: LockHandle | undefined;
        try {
          lock = await acquireLock(repo.store, 'backup', { command: `pachbackup resume${opts.force ? ' --force' : ''}` }, { onEvent: renderer.sink });
        } catch (err) {
          if (!(err instanceof LockConflictError)) throw err;
          const holder = err.holder;
          if (holder.info?.kind === 'backup' && !opts.force) {
            // The ledger of a backup that is still running: it resumes the cluster itself, and a
            // resume now would end its pause in the middle of the copy.
            throw new LockConflictError(
              `a backup may still be running: ${describeLock(holder)}. It resumes the cluster itself when it ends; resuming now would end its pause in the middle of the backup. If that run is gone (killed on another machine), its lock goes stale ${lockExpiry(holder)}, or run "pachbackup resume --force"`,
              holder,
            );
          }
          // A prune (which never pauses), or --force: a paused cluster does not wait for either.
          renderer.line(`! warning: resuming without the backup lock: ${describeLock(holder)}`);
        }
        let entry;
        try {
          // Read again under the lock: the backup that wrote it may have ended meanwhile.
          entry = lock ? await ledger.read() : seen;
          if (entry) await resumeLedgerEntry(config.pause, ledger, entry, { info: (m) => renderer.line(`  ${m}`), warn: (m) => renderer.line(`! warning: ${m}`) });
        } finally {
          // A lock that cannot be removed must not hide how the resume went: it goes stale by itself.
          await lock?.release().catch((err: unknown) => renderer.line(`! warning: the backup lock ${lock!.id} could not be removed (${(err as Error).message}); it goes stale after its lease`));
        }
        if (!entry) return nothingPaused();
        renderer.result('resume', { resumed: true, record: entry.record, backupId: entry.backupId }, () => `resumed ${entry.record.target}, paused since ${entry.record.startedAt} by backup ${entry.backupId} (pid ${entry.pid} on ${entry.host})`);
      });
    });

  program
    .command('status')
    .description('say whether pachbackup has the cluster paused, and since when')
    .action(async () => {
      await run(globals(), async ({ renderer }) => {
        const config = load(globals(), []);
        const repo = openRepository(config);
        await repo.open(false);
        const entry = await new PauseLedger(repo.store, repo.id).read();
        renderer.result('status', { paused: Boolean(entry), ledger: entry ?? null }, () =>
          entry ? `PAUSED by pachbackup (${entry.phase}): ${entry.record.target} since ${entry.record.startedAt}, backup ${entry.backupId}, pid ${entry.pid} on ${entry.host}` : 'not paused by pachbackup',
        );
      }, { interrupt: 'exit' });
    });

  program
    .command('demo')
    .description('run the whole cycle on a local demo cluster: back up, wipe, restore, prove equal')
    .option('--chunks <n>', 'chunk objects in the demo bucket', positiveInt, 200)
    .action(async (opts: { chunks: number }) => {
      await run(globals(), async ({ renderer, signal }) => {
        const { runDemo } = await import('../demo/demo.js');
        const ok = await runDemo({ chunks: opts.chunks, renderer, signal });
        return ok ? 0 : EXIT_FAILED;
      });
    });

  registerDrillCommands(program, globals);
  registerScheduleCommands(program, globals);
  registerMaintenanceCommands(program, globals);
  registerKeyCommands(program, globals);
  return program;
}

try {
  tuneHeapForStreaming();
} catch (err) {
  process.stderr.write(`pachbackup: ${(err as Error).message}\n`);
  process.exit(EXIT_USAGE);
}
await buildProgram().parseAsync(process.argv);
