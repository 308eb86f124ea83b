/**
 * The --metrics-file output: valid Prometheus text exposition format (checked by a parser written
 * here from the format's specification, not by the code under test), the right series after a
 * success and after a failure, other commands' series kept, and the file replaced atomically.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runOutcome, updateMetrics, writeMetrics } from '../src/cli/metrics.js';
import { run } from '../src/cli/runner.js';

interface Sample {
  labels: Record<string, string>;
  value: number;
  timestamp?: number;
}
interface Family {
  help?: string;
  type?: string;
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/**
 * A strict reader of the text exposition format (version 0.0.4): HELP and TYPE at most once per
 * family and TYPE before its samples, a family's lines contiguous, valid metric and label names,
 * label values with only the \\ \" \n escapes, Go float values, no duplicate series, and a final
 * line feed. Throws naming the line on any violation.
 */
function parseExposition(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  const series = new Set<string>();
  let current: string | undefined;
  const finished = new Set<string>();
  assert.ok(text === '' || text.endsWith('\n'), 'the last line must end with a line feed');
  const lines = text.split('\n').slice(0, -1);
  const family = (name: string, n: number): Family => {
    if (current !== name) {
      if (finished.has(name)) throw new Error(`line ${n}: lines of family ${name} are not contiguous`);
      if (current !== undefined) finished.add(current);
      current = name;
    }
    let f = families.get(name);
    if (!f) families.set(name, (f = { samples: [] }));
    return f;
  };
  lines.forEach((line, i) => {
    const n = i + 1;
    if (line.trim() === '') return;
    if (line.startsWith('#')) {
      const m = /^#\s+(HELP|TYPE)\s+(\S+)(?:\s(.*))?$/.exec(line);
      if (!m) return; // an ordinary comment
      const [, kind, name, rest = ''] = m;
      if (!METRIC_NAME.test(name!)) throw new Error(`line ${n}: bad metric name ${name}`);
      const f = family(name!, n);
      if (kind === 'HELP') {
        if (f.help !== undefined) throw new Error(`line ${n}: second HELP for ${name}`);
        if (/\\[^\\n]/.test(rest.replace(/\\\\/g, ''))) throw new Error(`line ${n}: HELP may only escape \\\\ and \\n`);
        f.help = rest;
      } else {
        if (f.type !== undefined) throw new Error(`line ${n}: second TYPE for ${name}`);
        if (f.samples.length > 0) throw new Error(`line ${n}: TYPE after samples of ${name}`);
        if (!TYPES.has(rest.trim())) throw new Error(`line ${n}: unknown type "${rest}"`);
        f.type = rest.trim();
      }
      return;
    }
    const nameMatch = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (!nameMatch) throw new Error(`line ${n}: no metric name: ${line}`);
    const name = nameMatch[0];
    let pos = name.length;
    const labels: Record<string, string> = {};
    if (line[pos] === '{') {
      pos++;
      for (;;) {
        while (line[pos] === ' ') pos++;
        if (line[pos] === '}') {
          pos++;
          break;
        }
        const ln = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(line.slice(pos));
        if (!ln || !LABEL_NAME.test(ln[0])) throw new Error(`line ${n}: bad label name at column ${pos + 1}`);
        if (ln[0].startsWith('__')) throw new Error(`line ${n}: label names starting with __ are reserved`);
        if (ln[0] in labels) throw new Error(`line ${n}: label ${ln[0]} twice`);
        pos += ln[0].length;
        while (line[pos] === ' ') pos++;
        if (line[pos] !== '=' ) throw new Error(`line ${n}: expected = after label ${ln[0]}`);
        pos++;
        while (line[pos] === ' ') pos++;
        if (line[pos] !== '"') throw new Error(`line ${n}: label value must be quoted`);
        pos++;
        let value = '';
        for (;;) {
          const c = line[pos];
          if (c === undefined) throw new Error(`line ${n}: unterminated label value`);
          pos++;
          if (c === '"') break;
          if (c === '\\') {
            const e = line[pos++];
            if (e === '\\' || e === '"') value += e;
            else if (e === 'n') value += '\n';
            else throw new Error(`line ${n}: bad escape \\${e} in label value`);
          } else value += c;
        }
        labels[ln[0]] = value;
        while (line[pos] === ' ') pos++;
        if (line[pos] === ',') pos++;
        else if (line[pos] !== '}') throw new Error(`line ${n}: expected , or } after a label`);
      }
    }
    const rest = line.slice(pos);
    const vm = /^[ \t]+(\S+)(?:[ \t]+(-?\d+))?[ \t]*$/.exec(rest);
    if (!vm) throw new Error(`line ${n}: expected a value after the labels: "${rest}"`);
    const raw = vm[1]!;
    const value = raw === 'NaN' ? NaN : raw === '+Inf' || raw === 'Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw);
    if (Number.isNaN(value) && raw !== 'NaN') throw new Error(`line ${n}: "${raw}" is not a float`);
    const f = family(name, n);
    const key = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    if (series.has(key)) throw new Error(`line ${n}: duplicate series ${key}`);
    series.add(key);
    f.samples.push({ labels, value, ...(vm[2] ? { timestamp: Number(vm[2]) } : {}) });
  });
  return families;
}

function valueOf(families: Map<string, Family>, name: string, command?: string): number | undefined {
  return families.get(name)?.samples.find((s) => (command === undefined ? Object.keys(s.labels).length === 0 : s.labels.command === command))?.value;
}

const EXPECTED_FAMILIES = [
  'pachbackup_last_run_timestamp_seconds',
  'pachbackup_last_success_timestamp_seconds',
  'pachbackup_last_result',
  'pachbackup_last_duration_seconds',
  'pachbackup_last_bytes',
  'pachbackup_last_objects',
  'pachbackup_last_retries',
  'pachbackup_last_downtime_seconds',
];

const backupResult = {
  id: '20260101T020000Z-abcdef',
  databases: [
    { name: 'pachyderm', role: 'pachyderm', bytes: 1000, tables: 3, rows: 10 },
    { name: 'dex', role: 'dex', bytes: 200, tables: 1, rows: 1 },
  ],
  objects: { count: 42, bytes: 5000, newCount: 2, newBytes: 100, heldCount: 40, heldBytes: 4900 },
  downtimeMs: 1500,
  retries: { count: 7, causes: { SlowDown: 6, ECONNRESET: 1 } },
};

describe('metrics file', () => {
  test('the exposition parser itself rejects what the format forbids', () => {
    assert.throws(() => parseExposition('a{b="c} 1\n'), /unterminated/);
    assert.throws(() => parseExposition('1a 1\n'), /no metric name/);
    assert.throws(() => parseExposition('a{b="\\x"} 1\n'), /bad escape/);
    assert.throws(() => parseExposition('a 1\n# TYPE a gauge\n'), /TYPE after samples/);
    assert.throws(() => parseExposition('a 1\nb 1\na 2\n'), /not contiguous/);
    assert.throws(() => parseExposition('a{x="1"} 1\na{x="1"} 2\n'), /duplicate series/);
    assert.throws(() => parseExposition('a one\n'), /not a float/);
    assert.throws(() => parseExposition('a 1'), /line feed/);
    assert.equal(parseExposition('# HELP a x\n# TYPE a gauge\na{x="q\\"\\n"} +Inf 123\n').get('a')?.samples[0]?.labels.x, 'q"\n');
  });

  test('after a successful backup: every series, HELP and TYPE, valid format', () => {
    const finishedAt = new Date('2026-01-01T02:10:00.250Z');
    const outcome = runOutcome('backup', { exitCode: 0, startedAt: new Date(finishedAt.getTime() - 12_500), finishedAt, result: backupResult });
    assert.ok(outcome);
    const text = updateMetrics('', 'backup', outcome);
    const families = parseExposition(text);
    assert.deepEqual([...families.keys()], EXPECTED_FAMILIES);
    for (const [name, f] of families) {
      assert.equal(f.type, 'gauge', name);
      assert.ok(f.help && f.help.length > 10, `${name} has a HELP text`);
    }
    assert.equal(valueOf(families, 'pachbackup_last_run_timestamp_seconds', 'backup'), finishedAt.getTime() / 1000);
    assert.equal(valueOf(families, 'pachbackup_last_success_timestamp_seconds', 'backup'), finishedAt.getTime() / 1000);
    assert.equal(valueOf(families, 'pachbackup_last_result', 'backup'), 1);
    assert.equal(valueOf(families, 'pachbackup_last_duration_seconds', 'backup'), 12.5);
    assert.equal(valueOf(families, 'pachbackup_last_bytes', 'backup'), 6200);
    assert.equal(valueOf(families, 'pachbackup_last_objects', 'backup'), 42);
    assert.equal(valueOf(families, 'pachbackup_last_retries', 'backup'), 7);
    assert.equal(valueOf(families, 'pachbackup_last_downtime_seconds'), 1.5);
    assert.deepEqual(families.get('pachbackup_last_downtime_seconds')?.samples[0]?.labels, {});
  });

  test('after a failure: result 0, run time and duration updated, last success and its figures kept', () => {
    const ok = new Date('2026-01-01T02:10:00Z');
    const first = updateMetrics('', 'backup', runOutcome('backup', { exitCode: 0, startedAt: new Date(ok.getTime() - 10_000), finishedAt: ok, result: backupResult })!);
    const failed = new Date('2026-01-02T02:00:03Z');
    const second = updateMetrics(first, 'backup', runOutcome('backup', { exitCode: 1, startedAt: new Date(failed.getTime() - 3000), finishedAt: failed, result: undefined })!);
    const families = parseExposition(second);
    assert.equal(valueOf(families, 'pachbackup_last_result', 'backup'), 0);
    assert.equal(valueOf(families, 'pachbackup_last_run_timestamp_seconds', 'backup'), failed.getTime() / 1000);
    assert.equal(valueOf(families, 'pachbackup_last_duration_seconds', 'backup'), 3);
    assert.equal(valueOf(families, 'pachbackup_last_success_timestamp_seconds', 'backup'), ok.getTime() / 1000);
    assert.equal(valueOf(families, 'pachbackup_last_bytes', 'backup'), 6200);
    assert.equal(valueOf(families, 'pachbackup_last_objects', 'backup'), 42);
    assert.equal(valueOf(families, 'pachbackup_last_downtime_seconds'), 1.5);
  });

  test('a failure with no earlier success writes no success time', () => {
    const families = parseExposition(updateMetrics('', 'drill', runOutcome('drill', { exitCode: 1, startedAt: new Date(0), finishedAt: new Date(2000), result: undefined })!));
    assert.equal(valueOf(families, 'pachbackup_last_result', 'drill'), 0);
    assert.equal(families.has('pachbackup_last_success_timestamp_seconds'), false);
  });

  test('each command keeps the others\' series; verify and drill figures come from their reports', () => {
    let text = updateMetrics('', 'backup', runOutcome('backup', { exitCode: 0, startedAt: new Date(0), finishedAt: new Date(1000), result: backupResult })!);
    text = updateMetrics(text, 'verify', runOutcome('verify', { exitCode: 0, startedAt: new Date(0), finishedAt: new Date(2000), result: { checked: { dumps: 2, objects: 42, bytes: 5000 }, retries: { count: 3, causes: { ECONNRESET: 3 } } } })!);
    text = updateMetrics(text, 'drill', runOutcome('drill', { exitCode: 0, startedAt: new Date(0), finishedAt: new Date(3000), result: { ok: true, objects: { count: 41, bytes: 4999 } } })!);
    const families = parseExposition(text);
    assert.deepEqual(families.get('pachbackup_last_result')?.samples.map((s) => s.labels.command), ['backup', 'drill', 'verify']);
    assert.equal(valueOf(families, 'pachbackup_last_bytes', 'backup'), 6200);
    assert.equal(valueOf(families, 'pachbackup_last_bytes', 'verify'), 5000);
    assert.equal(valueOf(families, 'pachbackup_last_objects', 'drill'), 41);
    assert.equal(valueOf(families, 'pachbackup_last_run_timestamp_seconds', 'verify'), 2);
    assert.equal(valueOf(families, 'pachbackup_last_retries', 'verify'), 3);
    assert.equal(valueOf(families, 'pachbackup_last_retries', 'drill'), undefined, 'a report without retries writes none');
  });

  test('a restore dry run records nothing; a real restore does', () => {
    const dry = runOutcome('restore', { exitCode: 0, startedAt: new Date(0), finishedAt: new Date(1), result: { dryRun: true, objects: { count: 1, bytes: 1 } } });
    assert.equal(dry, undefined);
    const real = runOutcome('restore', { exitCode: 0, startedAt: new Date(0), finishedAt: new Date(1), result: { dryRun: false, objects: { count: 7, bytes: 70 } } });
    assert.deepEqual({ bytes: real?.bytes, objects: real?.objects }, { bytes: 70, objects: 7 });
  });

  test('lines it did not write are dropped, so the file stays valid', () => {
    const families = parseExposition(updateMetrics('garbage here\nsome_other_metric 3\n# HELP x y\n', 'verify', { ok: true, finishedAt: new Date(5000), durationSeconds: 1 }));
    assert.equal(families.has('some_other_metric'), false);
    assert.equal(valueOf(families, 'pachbackup_last_result', 'verify'), 1);
  });

  describe('on disk', () => {
    let dir: string;
    before(async () => {
      dir = await mkdtemp(join(tmpdir(), 'pachbackup-metrics-test-'));
    });
    after(async () => {
      await rm(dir, { recursive: true, force: true });
    });

    test('writeMetrics replaces the file by rename and leaves no temporary file', async () => {
      const file = join(dir, 'pachbackup.prom');
      await writeFile(file, 'stale\n');
      await writeMetrics(file, 'verify', { ok: true, finishedAt: new Date(10_000), durationSeconds: 2, bytes: 3, objects: 4 });
      assert.deepEqual(await readdir(dir), ['pachbackup.prom']);
      const families = parseExposition(await readFile(file, 'utf8'));
      assert.equal(valueOf(families, 'pachbackup_last_objects', 'verify'), 4);
    });

    test('run() writes the metrics of a command after success and after failure', async () => {
      const file = join(dir, 'run.prom');
      const globals = { config: '/nonexistent.yaml', json: true, yes: false, metricsFile: file };
      const exitCode = process.exitCode;
      try {
        await run(globals, async ({ renderer }) => renderer.result('backup', backupResult, () => 'done'), { metrics: 'backup' });
        assert.equal(process.exitCode, 0);
        let families = parseExposition(await readFile(file, 'utf8'));
        assert.equal(valueOf(families, 'pachbackup_last_result', 'backup'), 1);
        assert.equal(valueOf(families, 'pachbackup_last_objects', 'backup'), 42);
        const success = valueOf(families, 'pachbackup_last_success_timestamp_seconds', 'backup');
        assert.ok(success && Math.abs(success - Date.now() / 1000) < 60);

        await run(
          globals,
          async () => {
            throw new Error('the repository is unreachable');
          },
          { metrics: 'backup' },
        );
        assert.equal(process.exitCode, 1);
        families = parseExposition(await readFile(file, 'utf8'));
        assert.equal(valueOf(families, 'pachbackup_last_result', 'backup'), 0);
        assert.equal(valueOf(families, 'pachbackup_last_success_timestamp_seconds', 'backup'), success);
        assert.equal(valueOf(families, 'pachbackup_last_objects', 'backup'), 42);

        // A command without metrics leaves the file alone.
        const before = await readFile(file, 'utf8');
        await run(globals, async () => 0);
        assert.equal(await readFile(file, 'utf8'), before);
      } finally {
        process.exitCode = exitCode;
      }
    });

    test('an unwritable metrics file is a warning, not a failure of the command', async () => {
      const exitCode = process.exitCode;
      try {
        await run({ config: 'x', json: true, yes: false, metricsFile: join(dir, 'missing-dir', 'x.prom') }, async () => 0, { metrics: 'verify' });
        assert.equal(process.exitCode, 0);
      } finally {
        process.exitCode = exitCode;
      }
    });
  });
});
