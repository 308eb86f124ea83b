import type { Manifest } from '../repository/manifest.js';

/** What the next backup will have to do, measured before anything is paused. */
export interface PlanInputs {
  mode: 'paused' | 'online';
  precopy: boolean;
  /** Paused mode keeps the cluster paused through pg_dump (pause.holdDuringDump). */
  holdDuringDump: boolean;
  /** pg_database_size of every database to dump. */
  databaseBytes: number;
  /** Objects in the cluster's store, and their bytes. */
  objects: number;
  bytes?: number;
  /** Objects the repository does not hold yet, and their bytes. */
  missingObjects: number;
  missingBytes: number;
}

export interface Prediction {
  downtimeMs: number;
  totalMs: number;
  /** How the figures were obtained: which history, or defaults. */
  basis: string;
  rates: { dumpBytesPerSecond: number; copyObjectsPerSecond: number; copyBytesPerSecond: number; listObjectsPerSecond: number };
}

/** Rates assumed before a repository has history: conservative figures for a LAN-attached S3 store. */
const DEFAULT_RATES = { dumpBytesPerSecond: 30e6, copyObjectsPerSecond: 200, copyBytesPerSecond: 50e6, listObjectsPerSecond: 20_000 };
const HISTORY = 5;

function phaseMs(m: Manifest, name: string): number {
  return m.phases.filter((p) => p.name === name).reduce((n, p) => n + p.ms, 0);
}

/** The dump's time: its own phase, or (manifests before the dump ran after the resume) the snapshot phase that held it. */
function dumpMs(m: Manifest): number {
  return phaseMs(m, 'dump') || phaseMs(m, 'snapshot');
}

function average(values: number[]): number {
  return values.length === 0 ? 0 : values.reduce((a, b) => a + b, 0) / values.length;
}

/**
 * Predicts a backup's downtime and total time from the repository's recent history. Each phase is
 * modelled by the rate it achieved before: dump bytes per second of database size, copies by
 * objects and bytes per second (the slower of the two governs), listings by objects per second;
 * pause and resume take what they took on average. Downtime is pause + the copy that happens
 * while paused (with pre-copy, only a listing and the objects written since) + resume, and the
 * dump too when the cluster is held paused through it (pause.holdDuringDump).
 */
export function predictBackup(history: Manifest[], inputs: PlanInputs): Prediction {
  const recent = history.slice(-HISTORY);
  const rates = { ...DEFAULT_RATES };
  const used: string[] = [];
  const dumps = recent.filter((m) => (m.sourceStats?.databaseBytes ?? 0) > 0 && dumpMs(m) > 0);
  if (dumps.length > 0) {
    rates.dumpBytesPerSecond = (dumps.reduce((n, m) => n + (m.sourceStats?.databaseBytes ?? 0), 0) / dumps.reduce((n, m) => n + dumpMs(m), 0)) * 1000;
    used.push(`dump rate from ${dumps.length} backup(s)`);
  }
  const copies = recent.filter((m) => m.objects.newCount > 0);
  if (copies.length > 0) {
    const ms = copies.reduce((n, m) => n + phaseMs(m, 'precopy') + phaseMs(m, 'copy'), 0);
    if (ms > 0) {
      rates.copyObjectsPerSecond = (copies.reduce((n, m) => n + m.objects.newCount, 0) / ms) * 1000;
      rates.copyBytesPerSecond = Math.max(1, (copies.reduce((n, m) => n + m.objects.newBytes, 0) / ms) * 1000);
      used.push(`copy rate from ${copies.length} backup(s)`);
    }
  }
  const listings = recent.filter((m) => m.objects.newCount === 0 && phaseMs(m, 'copy') > 0 && m.objects.count > 0);
  if (listings.length > 0) {
    rates.listObjectsPerSecond = (listings.reduce((n, m) => n + m.objects.count, 0) / listings.reduce((n, m) => n + phaseMs(m, 'copy'), 0)) * 1000;
    used.push(`listing rate from ${listings.length} unchanged backup(s)`);
  }
  const copyMs = (count: number, bytes: number): number => Math.max((count / rates.copyObjectsPerSecond) * 1000, (bytes / rates.copyBytesPerSecond) * 1000);
  const listMs = (inputs.objects / rates.listObjectsPerSecond) * 1000;
  const snapshotMs = (inputs.databaseBytes / rates.dumpBytesPerSecond) * 1000;
  const pauseMs = average(recent.map((m) => phaseMs(m, 'pause')));
  const resumeMs = average(recent.map((m) => phaseMs(m, 'resume')));
  const fixedMs = average(recent.map((m) => phaseMs(m, 'preflight') + phaseMs(m, 'seal')));
  const missingCopyMs = copyMs(inputs.missingObjects, inputs.missingBytes);

  let downtimeMs = 0;
  let totalMs: number;
  if (inputs.mode === 'online') {
    totalMs = fixedMs + listMs + missingCopyMs + snapshotMs + listMs;
  } else {
    const dumpPaused = inputs.holdDuringDump ? snapshotMs : 0;
    const dumpRunning = inputs.holdDuringDump ? 0 : snapshotMs;
    if (inputs.precopy) {
      // Objects written between the pre-copy and the pause are unknown now; a listing is certain.
      downtimeMs = pauseMs + dumpPaused + listMs + resumeMs;
      totalMs = fixedMs + listMs + missingCopyMs + downtimeMs + dumpRunning;
    } else {
      downtimeMs = pauseMs + dumpPaused + listMs + missingCopyMs + resumeMs;
      totalMs = fixedMs + downtimeMs + dumpRunning;
    }
  }
  return {
    downtimeMs: Math.round(downtimeMs),
    totalMs: Math.round(totalMs),
    basis: used.length > 0 ? `${used.join(', ')} (of the last ${recent.length})` : 'no history in this repository: default rates',
    rates: {
      dumpBytesPerSecond: Math.round(rates.dumpBytesPerSecond),
      copyObjectsPerSecond: Math.round(rates.copyObjectsPerSecond),
      copyBytesPerSecond: Math.round(rates.copyBytesPerSecond),
      listObjectsPerSecond: Math.round(rates.listObjectsPerSecond),
    },
  };
}
