import { createInterface } from 'node:readline/promises';
import type { Config } from '../config/schema.js';
import type { BackupSummary, runPlan } from '../engine/backup.js';
import type { RestoreSummary } from '../engine/restore.js';
import type { VerifyReport } from '../engine/verify.js';
import { retriesText } from '../objectstore/retry.js';
import type { Manifest } from '../repository/manifest.js';
import type { BackupListing } from '../repository/repository.js';
import { formatBytes, formatMs, table } from './render.js';

export function backupSummaryText(s: BackupSummary): string {
  const lines = [
    `backup ${s.id} sealed (${s.mode} mode) in ${s.repository}`,
    '',
    table(
      ['database', 'dump', 'tables', 'rows'],
      s.databases.map((d) => [`${d.name} (${d.role})`, formatBytes(d.bytes), String(d.tables), String(d.rows)]),
    ),
    '',
    `objects: ${s.objects.count} (${formatBytes(s.objects.bytes)}); new ${s.objects.newCount} (${formatBytes(s.objects.newBytes)}); already held ${s.objects.heldCount} (${formatBytes(s.objects.heldBytes)}); copy path: ${s.copyPath}; checksums: ${s.objects.md5Count} MD5 checked by the S3 service, ${s.objects.count - s.objects.md5Count} SHA-256 computed here`,
    `referenced keys: ${s.referencedKeys}, all held`,
    `phases: ${s.phases.map((p) => `${p.name} ${formatMs(p.ms)}`).join(', ')}`,
    `downtime: ${s.downtimeMs === null ? 'none (cluster not paused)' : formatMs(s.downtimeMs)}; total ${formatMs(s.totalMs)}`,
    `retried requests: ${retriesText(s.retries)}`,
  ];
  return lines.join('\n');
}

export function restoreSummaryText(s: RestoreSummary): string {
  if (s.dryRun) return [`dry run of restoring backup ${s.id}; nothing was changed. The plan:`, ...s.plan.map((p) => `  - ${p}`)].join('\n');
  return [
    `backup ${s.id} restored in ${formatMs(s.totalMs)}`,
    ...s.databases.map((d) => `  database ${d.from} → "${d.name}": ${d.tables} tables, ${d.rows} rows`),
    `  objects: ${s.objects.count} (${formatBytes(s.objects.bytes)})`,
    `  retried requests: ${retriesText(s.retries)}`,
    ...(s.helmValuesOut ? [`  Helm values for the restored cluster: ${s.helmValuesOut}`] : []),
    'checked against the manifest:',
    ...s.checks.map((c) => `  ✓ ${c}`),
  ].join('\n');
}

export function verifyReportText(r: VerifyReport): string {
  const head = r.ok
    ? `backup ${r.id} verified: ${r.checked.dumps} dump(s) and ${r.checked.objects} objects (${formatBytes(r.checked.bytes)}) match their checksums; every referenced key is held`
    : `backup ${r.id} FAILED verification: ${r.problems.length} problem(s)`;
  return [head, ...r.problems.map((p) => `  ✗ ${p.item}: ${p.problem}`), ...(r.orphans ? [`  (info) ${r.orphans} object(s) held but not referenced by the database`] : []), `retried requests: ${retriesText(r.retries)}`, `took ${formatMs(r.ms)}`].join('\n');
}

export function listingText(listing: BackupListing): string {
  const rows = listing.sealed.map((m) => [
    m.id,
    m.finishedAt.replace('T', ' ').replace(/\.\d+Z$/, 'Z'),
    m.mode,
    m.pause ? `${formatMs(m.pause.downtimeMs)}${m.prediction ? ` (pred. ${formatMs(m.prediction.downtimeMs)})` : ''}` : '-',
    formatBytes(m.databases.reduce((n, d) => n + d.size, 0)),
    String(m.objects.count),
    formatBytes(m.objects.bytes),
    `${m.objects.newCount} new`,
  ]);
  const out = [rows.length ? table(['id', 'finished', 'mode', 'downtime', 'dumps', 'objects', 'bytes', 'copied'], rows) : 'no complete backups'];
  for (const i of listing.incomplete) out.push(`incomplete (not restorable): ${i.id}, ${i.files} files, ${formatBytes(i.bytes)}`);
  for (const d of listing.damaged) out.push(`DAMAGED: ${d.id}: ${d.problem}`);
  return out.join('\n');
}

export function manifestText(m: Manifest): string {
  return [
    `backup ${m.id} (${m.mode} mode, format ${m.formatVersion}, pachbackup ${m.toolVersion})`,
    `started ${m.startedAt}, finished ${m.finishedAt}`,
    `source: PostgreSQL ${m.source.postgres.user}@${m.source.postgres.host}:${m.source.postgres.port}, objects ${m.source.objectStore}`,
    m.pause ? `paused by ${m.pause.strategy} (${m.pause.target}) from ${m.pause.pausedAt} to ${m.pause.resumedAt}: downtime ${formatMs(m.pause.downtimeMs)}` : 'not paused',
    '',
    table(
      ['database', 'role', 'dump', 'sha256', 'tables', 'rows'],
      m.databases.map((d) => [d.name, d.role, `${formatBytes(d.size)}${d.format === 'directory' ? ` (directory, ${d.files?.length ?? 0} files)` : ''}`, `${d.sha256.slice(0, 16)}…`, String(d.tables.length), String(d.tables.reduce((n, t) => n + t.rows, 0))]),
    ),
    '',
    `objects: ${m.objects.count} (${formatBytes(m.objects.bytes)}), ${m.objects.newCount} copied by this backup (${formatBytes(m.objects.newBytes)}); referenced keys ${m.referenced.count}`,
    `checksums: ${m.objects.count - (m.objects.md5Count ?? 0)} SHA-256 computed by pachbackup, ${m.objects.md5Count ?? 0} MD5 checked by the S3 service`,
    `Helm values: ${m.helmValues ? `${m.helmValues.file}${m.helmValues.redacted ? ' (secrets redacted)' : ''}` : 'none kept'}`,
    `phases: ${m.phases.map((p) => `${p.name} ${formatMs(p.ms)}`).join(', ')}`,
  ].join('\n');
}

/**
 * Asks the operator to confirm the pause target on a terminal. Without a terminal it refuses,
 * unless --yes was given: automation must say so explicitly.
 */
export async function confirmPause(target: string, yes: boolean, config: Config): Promise<boolean> {
  if (yes) return true;
  if (!process.stdin.isTTY) {
    throw new Error(`refusing to pause ${target} without confirmation: there is no terminal to ask on; pass --yes to confirm in automation`);
  }
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = await rl.question(`About to pause ${target}${config.pause.expectedContext ? ` (expected context ${config.pause.expectedContext})` : ''}.\nType "yes" to continue: `);
    return answer.trim().toLowerCase() === 'yes';
  } finally {
    rl.close();
  }
}

export function planText(plan: Awaited<ReturnType<typeof runPlan>>): string {
  const { prediction: p, inputs: i } = plan;
  const lines = [
    `next backup (${i.mode} mode${i.mode === 'paused' ? (i.precopy ? ', with pre-copy' : ', without pre-copy') : ''}):`,
    `  databases ${formatBytes(i.databaseBytes)}; ${i.objects} objects, ${i.missingObjects} not yet held (${formatBytes(i.missingBytes)})`,
    `  predicted downtime ${formatMs(p.downtimeMs)}, total ${formatMs(p.totalMs)}`,
    `  basis: ${p.basis}`,
    `  rates: dump ${formatBytes(p.rates.dumpBytesPerSecond)}/s, copy ${p.rates.copyObjectsPerSecond} objects/s and ${formatBytes(p.rates.copyBytesPerSecond)}/s, listing ${p.rates.listObjectsPerSecond} objects/s`,
    ...plan.warnings.map((w) => `! warning: ${w}`),
  ];
  const judged = plan.history.filter((h) => h.predictedTotalMs !== null);
  if (judged.length > 0) {
    lines.push('', 'earlier predictions against what happened:');
    lines.push(
      table(
        ['backup', 'downtime predicted', 'actual', 'total predicted', 'actual'],
        judged.slice(-10).map((h) => [h.id, h.predictedDowntimeMs === null ? '-' : formatMs(h.predictedDowntimeMs), h.downtimeMs === null ? '-' : formatMs(h.downtimeMs), formatMs(h.predictedTotalMs ?? 0), formatMs(h.totalMs)]),
      ),
    );
  }
  return lines.join('\n');
}
