import type { Command } from 'commander';
import type { ConfigOverride } from '../config/load.js';
import { drillTargetsFromConfig, runDrill, type DrillReport } from '../engine/drill.js';
import { retriesText } from '../objectstore/retry.js';
import { formatBytes, formatMs, table } from './render.js';
import { LIMITS } from '../config/schema.js';
import { EXIT_FAILED, intUpTo, load, run, type GlobalOptions } from './runner.js';

interface DrillFlags {
  scratchUrl?: string;
  pgHost?: string;
  pgPort?: number;
  pgUser?: string;
  concurrency?: number;
}

/** `pachbackup drill <id|latest>`: restore into scratch targets, check, clean up, report. */
export function registerDrillCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('drill <backup>')
    .description('prove a backup (an id or "latest") restores: restore it into scratch databases and a scratch prefix, check it, then remove both')
    .option('--scratch-url <url>', 'override drill.objectStore.url (each drill uses its own drill-<id>/ prefix under it)')
    .option('--pg-host <host>', 'override the host of the scratch PostgreSQL server (drill.postgres, else restore.postgres)')
    .option('--pg-port <port>', 'override its port', intUpTo(LIMITS.port))
    .option('--pg-user <user>', 'override its user (needs CREATEDB)')
    .option('--concurrency <n>', 'objects restored at once', intUpTo(LIMITS.concurrency))
    .action(async (backup: string, opts: DrillFlags) => {
      await run(
        globals(),
        async ({ renderer, signal }) => {
          const overrides: ConfigOverride[] = [];
          if (opts.scratchUrl) overrides.push(['drill.objectStore.url', opts.scratchUrl]);
          const config = load(globals(), overrides);
          const report = await runDrill({
            config,
            backup,
            targets: drillTargetsFromConfig(config, {
              ...(opts.pgHost ? { host: opts.pgHost } : {}),
              ...(opts.pgPort ? { port: opts.pgPort } : {}),
              ...(opts.pgUser ? { user: opts.pgUser } : {}),
            }),
            noOwner: config.restore?.noOwner ?? true,
            concurrency: opts.concurrency ?? config.backup.concurrency,
            emit: renderer.sink,
            signal,
          });
          renderer.result('drill', report, () => drillReportText(report));
          return report.ok ? 0 : EXIT_FAILED;
        },
        { metrics: 'drill' },
      );
    });
}

export function drillReportText(r: DrillReport): string {
  const head = r.ok
    ? `drill ${r.drillId} PASSED: backup ${r.backup} restores (${formatMs(r.totalMs)})`
    : `drill ${r.drillId} FAILED: backup ${r.backup}: ${r.problems.length} problem(s)`;
  const lines = [head, ...r.problems.map((p) => `  ✗ ${p}`), ...r.checks.map((c) => `  ✓ ${c}`)];
  lines.push(`scratch: databases ${r.scratch.databases.join(', ')} on ${r.scratch.server}; ${formatBytes(r.objects.bytes)} of objects in ${r.scratch.objectStore}`);
  lines.push(`retried requests: ${retriesText(r.retries)}`);
  lines.push('', table(['phase', 'time', 'result'], r.phases.map((p) => [p.name, formatMs(p.ms), p.ok ? 'ok' : 'FAILED'])), '');
  lines.push(
    r.cleanup.ok
      ? `cleanup: dropped ${r.cleanup.databasesDropped.length ? r.cleanup.databasesDropped.join(', ') : 'no databases (none were created)'}; removed ${r.cleanup.objectsRemoved} scratch object(s); nothing left behind`
      : `cleanup INCOMPLETE on ${r.scratch.server} / ${r.scratch.objectStore}: remove the leftovers by hand (databases ${r.scratch.databases.join(', ')})`,
  );
  return lines.join('\n');
}
