#!/usr/bin/env node
/**
 * Writes docs/reliability.md from the fault and bad-input tests' own output, so the table of
 * every fault and bad input tried, how many runs, and the outcome stays true.
 *
 *   node scripts/reliability-report.mjs [--no-build] [--jobs N] [--only faults,tls] [--out FILE]
 *
 * It builds the project, runs each test file with node's test runner and this file as the
 * reporter (a machine-readable JSON line per test and diagnostic), and turns the results into
 * markdown. A test describes what it tried with `t.diagnostic('reliability {json}')`, where the
 * JSON holds { category, fault, runs, detail }; a test without one becomes a row of its own. The
 * outcome (passed, FAILED, skipped) always comes from the runner. The exit code is 1 when any
 * test failed; the document is written either way, failures included.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPORTER_ROLE = 'PACHBACKUP_RELIABILITY_REPORTER';

/**
 * As a reporter (loaded by `node --test --test-reporter=<this file>`): one JSON line per
 * finished test and per diagnostic, with the file it came from.
 */
export default async function* reliabilityReporter(source) {
  for await (const event of source) {
    const data = event.data ?? {};
    if (event.type === 'test:pass' || event.type === 'test:fail') {
      const details = data.details ?? {};
      const error = details.error ? String(details.error.cause?.message ?? details.error.message ?? details.error) : undefined;
      yield `${JSON.stringify({
        type: event.type === 'test:pass' ? 'pass' : 'fail',
        name: data.name,
        nesting: data.nesting,
        file: data.file,
        suite: details.type === 'suite',
        ms: details.duration_ms,
        skip: data.skip === undefined || data.skip === false ? undefined : String(data.skip === true ? '' : data.skip),
        todo: data.todo === undefined || data.todo === false ? undefined : String(data.todo === true ? '' : data.todo),
        error,
      })}\n`;
    } else if (event.type === 'test:diagnostic' && data.file) {
      yield `${JSON.stringify({ type: 'diagnostic', nesting: data.nesting, file: data.file, message: data.message })}\n`;
    }
  }
}

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

/** The files of the suite that inject faults or feed bad input, and the category of rows without a record. */
const FILES = [
  { name: 'faults', category: 'object store' },
  { name: 'changedObject', category: 'object store' },
  { name: 'repositoryReads', category: 'object store' },
  { name: 'getReader', category: 'object store: own object reads' },
  { name: 'crashpoints', category: 'process' },
  { name: 'corruption', category: 'corruption' },
  { name: 'badInputTable', category: 'bad input' },
  { name: 'tls', category: 'TLS' },
  { name: 'secrets', category: 'secrets' },
  { name: 'lock', category: 'locks: races, stale and lost locks' },
  { name: 'prune', category: 'prune: crashes and unreadable backups' },
  { name: 'pauseGuards', category: 'pause: the cluster never left paused' },
  { name: 'restoreRollback', category: 'restore: rollback and refusals' },
  // Issue 2's tests of the same kind, when present.
  { name: 'failures', category: 'object store (issue 2 tests)' },
  { name: 'badInput', category: 'bad input (issue 2 tests)' },
  { name: 'verify', category: 'corruption (issue 2 tests)' },
];

function parseArgs(argv) {
  const options = { build: true, jobs: 1, only: undefined, out: join(ROOT, 'docs', 'reliability.md') };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--no-build') options.build = false;
    else if (arg === '--jobs') options.jobs = Math.max(1, Number(argv[++i]));
    else if (arg === '--only') options.only = argv[++i].split(',');
    else if (arg === '--out') options.out = argv[++i];
    else {
      process.stderr.write(`unknown argument ${arg}\nusage: node scripts/reliability-report.mjs [--no-build] [--jobs N] [--only faults,tls] [--out FILE]\n`);
      process.exit(2);
    }
  }
  return options;
}

/** Runs one compiled test file with this module as the reporter; resolves with its events. */
function runTestFile(file) {
  return new Promise((resolvePromise) => {
    const started = performance.now();
    const child = spawn(process.execPath, ['--test', `--test-reporter=${fileURLToPath(import.meta.url)}`, '--test-reporter-destination=stdout', file], {
      cwd: ROOT,
      env: { ...process.env, [REPORTER_ROLE]: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d.toString()));
    child.stderr.on('data', (d) => (stderr = (stderr + d.toString()).slice(-20_000)));
    child.on('close', (code, signal) => {
      const events = [];
      for (const line of stdout.split('\n')) {
        if (!line.startsWith('{')) continue;
        try {
          events.push(JSON.parse(line));
        } catch {
          // not one of ours
        }
      }
      resolvePromise({ file, code, signal, events, stderr, ms: performance.now() - started });
    });
  });
}

/** Turns a file's events into report rows: a test's reliability records, or one row for the test. */
function rowsOf(run, category) {
  const rows = [];
  const pendingByNesting = new Map();
  for (const event of run.events) {
    if (event.type === 'pass' || event.type === 'fail') {
      if (event.suite) continue;
      const outcome = event.skip !== undefined ? 'skipped' : event.todo !== undefined ? 'todo' : event.type === 'pass' ? 'passed' : 'FAILED';
      const test = { name: event.name, outcome, reason: event.skip ?? event.todo ?? '', error: event.error, ms: event.ms, records: [], notes: [] };
      rows.push(test);
      pendingByNesting.set(event.nesting, test);
    } else if (event.type === 'diagnostic') {
      const test = pendingByNesting.get(event.nesting);
      if (!test) continue;
      const match = /^reliability (\{.*\})$/s.exec(event.message);
      if (match) {
        try {
          test.records.push(JSON.parse(match[1]));
        } catch {
          test.notes.push(event.message);
        }
      } else {
        test.notes.push(event.message);
      }
    }
  }
  const out = [];
  for (const test of rows) {
    const records = test.records.length > 0 ? test.records : [{ category, fault: test.name, runs: test.outcome === 'skipped' ? 0 : 1, detail: '' }];
    for (const record of records) out.push({ ...record, test: test.name, outcome: test.outcome, reason: test.reason, error: test.error, file: run.file });
  }
  return { rows: out, tests: rows };
}

/**
 * Run-specific details (backup ids, temp paths, ports, pids, checksum prefixes, chunk keys) are
 * replaced by placeholders, so a new report differs from the last one only where behaviour did.
 */
function stable(text) {
  return String(text ?? '')
    .replace(/\b\d{8}T\d{6}Z-[0-9a-f]{6}\b/g, '<id>')
    .replace(/\/tmp\/[^/\s"'`)]+/g, '<tmp>')
    .replace(/\b(127\.0\.0\.\d+|localhost):\d{2,5}\b/g, '$1:<port>')
    .replace(/\bpid \d+/g, 'pid <n>')
    .replace(/chunk\/[0-9a-f]{64}\.[0-9a-f]{16}/g, 'chunk/<key>')
    .replace(/\b[0-9a-f]{12}…/g, '…');
}

function cell(text) {
  return stable(text).replace(/\r?\n/g, ' ').replace(/\|/g, '\\|').trim();
}

function outcomeCell(row) {
  if (row.outcome === 'passed') return 'passed';
  if (row.outcome === 'skipped') return `skipped${row.reason ? `: ${row.reason}` : ''}`;
  if (row.outcome === 'FAILED') return `**FAILED**: ${(row.error ?? '').split('\n')[0].slice(0, 200)}`;
  return row.outcome;
}

/** The assertion's message, then the lines of the command's output that say what went wrong. */
function failureExcerpt(error) {
  const lines = stable(error ?? '').split('\n');
  const telling = lines.slice(1).filter((l) => /pachbackup: error:|"type":"(error|warning)"|Error:|did not finish/.test(l));
  return [lines[0] ?? '', ...telling.slice(0, 6)];
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

function markdown(results, meta) {
  const all = results.flatMap((r) => r.rows);
  const tests = results.flatMap((r) => r.tests);
  const count = (outcome) => tests.filter((t) => t.outcome === outcome).length;
  const runs = all.reduce((n, r) => n + (Number(r.runs) || 0), 0);
  const lines = [
    '# Reliability: faults and bad input',
    '',
    `Generated by \`node scripts/reliability-report.mjs\` from the test suite's own output on ${meta.date} (commit ${meta.commit}, Node ${process.version}, ${meta.host}). Do not edit by hand: run the script again.`,
    '',
    `**${all.length} faults and bad inputs tried in ${runs} runs** by ${tests.length} tests in ${results.length} test files: ${count('passed')} passed, ${count('FAILED')} failed, ${count('skipped')} skipped.`,
    'Each test runs real PostgreSQL 15 servers, real `pg_dump`/`pg_restore` and real stores (filesystem, s3rver, Ceph RGW), and the real CLI process unless noted.',
    'A run is one backup, restore, verify or other command under the fault. "Passed" means every promise of the test held: no data lost (restored data equal to the source),',
    'the cluster never left paused, nothing that failed sealed, and the message the test expects.',
    '',
    '## Test files',
    '',
    '| File | Tests | Passed | Failed | Skipped | Time |',
    '|---|---:|---:|---:|---:|---:|',
    ...results.map((r) => {
      const c = (o) => r.tests.filter((t) => t.outcome === o).length;
      const crashed = r.code !== 0 && c('FAILED') === 0 ? ' (the runner exited with an error)' : '';
      return `| \`${relative(ROOT, r.source)}\`${crashed} | ${r.tests.length} | ${c('passed')} | ${c('FAILED')} | ${c('skipped')} | ${seconds(r.ms)} |`;
    }),
    ...(meta.missing.length > 0 ? ['', `Not present, so not run: ${meta.missing.map((m) => `\`test/${m}.test.ts\``).join(', ')}.`] : []),
    '',
  ];
  const categories = [...new Set(all.map((r) => r.category))];
  for (const category of categories) {
    lines.push(`## ${category}`, '', '| Fault or bad input | Runs | Outcome | What happened | Test |', '|---|---:|---|---|---|');
    for (const row of all.filter((r) => r.category === category)) {
      lines.push(`| ${cell(row.fault)} | ${cell(row.runs)} | ${cell(outcomeCell(row))} | ${cell(row.detail)} | ${cell(`${relative(join(ROOT, 'dist'), row.file).replace(/\.js$/, '.ts')}: ${row.test}`)} |`);
    }
    lines.push('');
  }
  const failed = tests.filter((t) => t.outcome === 'FAILED');
  if (failed.length > 0) {
    lines.push('## Failures', '', 'What each failing test reported (first lines):', '');
    for (const t of failed) {
      const where = results.find((r) => r.tests.includes(t));
      lines.push(`### ${cell(t.name)}`, '', `\`${relative(ROOT, where.source)}\``, '', '```', ...failureExcerpt(t.error).map((l) => l.slice(0, 400)), '```', '');
    }
  }
  return `${lines.join('\n').trimEnd()}\n`;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  if (options.build) {
    process.stderr.write('building (tsc -p tsconfig.json)…\n');
    const tsc = spawnSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { cwd: ROOT, stdio: 'inherit' });
    if (tsc.status !== 0) process.exit(tsc.status ?? 1);
  }
  const wanted = FILES.filter((f) => !options.only || options.only.includes(f.name));
  const present = wanted.filter((f) => existsSync(join(ROOT, 'test', `${f.name}.test.ts`)) && existsSync(join(ROOT, 'dist', 'test', `${f.name}.test.js`)));
  const missing = wanted.filter((f) => !present.includes(f)).map((f) => f.name);
  const queue = [...present];
  const results = [];
  const worker = async () => {
    for (let next = queue.shift(); next; next = queue.shift()) {
      process.stderr.write(`running test/${next.name}.test.ts…\n`);
      const run = await runTestFile(join(ROOT, 'dist', 'test', `${next.name}.test.js`));
      const { rows, tests } = rowsOf(run, next.category);
      const failed = tests.filter((t) => t.outcome === 'FAILED').length;
      process.stderr.write(`  test/${next.name}.test.ts: ${tests.length} tests, ${failed} failed, ${seconds(run.ms)}\n`);
      if (tests.length === 0) process.stderr.write(run.stderr.slice(-4000));
      results.push({ ...run, name: next.name, source: join(ROOT, 'test', `${next.name}.test.ts`), rows, tests, order: present.indexOf(next) });
    }
  };
  await Promise.all(Array.from({ length: options.jobs }, worker));
  results.sort((a, b) => a.order - b.order);
  const git = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' });
  const meta = {
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    commit: git.status === 0 ? git.stdout.trim() : 'unknown',
    host: `${process.platform}/${process.arch}`,
    missing,
  };
  await mkdir(dirname(options.out), { recursive: true });
  await writeFile(options.out, markdown(results, meta));
  const failedTests = results.flatMap((r) => r.tests).filter((t) => t.outcome === 'FAILED').length;
  const brokenFiles = results.filter((r) => r.code !== 0 && r.tests.every((t) => t.outcome !== 'FAILED')).length;
  process.stderr.write(`wrote ${relative(process.cwd(), options.out)}: ${failedTests} failed tests\n`);
  process.exitCode = failedTests > 0 || brokenFiles > 0 ? 1 : 0;
}

if (process.env[REPORTER_ROLE] !== '1') await main();
