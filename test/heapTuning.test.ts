/**
 * The V8 heap tuning every command applies at start (src/process/heapTuning.ts): its override and
 * a bad value of it. Its effect (full GCs while streaming) is measured in bench/copy.ts, not here:
 * GC counts depend on timing.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { tuneHeapForStreaming } from '../src/process/heapTuning.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'src', 'cli', 'main.js');

test('PACHBACKUP_HEAP_GROWING_PERCENT: whole numbers 0–1000 accepted, anything else refused with the variable named', () => {
  for (const ok of ['0', '50', '300', '1000', '']) assert.doesNotThrow(() => tuneHeapForStreaming({ PACHBACKUP_HEAP_GROWING_PERCENT: ok }), ok);
  for (const bad of ['-1', '1001', '3.5', 'lots', '0x10']) {
    assert.throws(() => tuneHeapForStreaming({ PACHBACKUP_HEAP_GROWING_PERCENT: bad }), (err: unknown) => err instanceof Error && err.message.includes('PACHBACKUP_HEAP_GROWING_PERCENT') && err.message.includes(`"${bad}"`), bad);
  }
});

test('a bad PACHBACKUP_HEAP_GROWING_PERCENT stops the CLI before any command: one line, exit 2, no stack trace', async () => {
  const run = promisify(execFile);
  await assert.rejects(run(process.execPath, [CLI, '--version'], { env: { ...process.env, PACHBACKUP_HEAP_GROWING_PERCENT: 'lots' } }), (err: unknown) => {
    const e = err as { code: number; stderr: string; stdout: string };
    assert.equal(e.code, 2);
    assert.equal(e.stdout, '');
    assert.match(e.stderr, /^pachbackup: PACHBACKUP_HEAP_GROWING_PERCENT must be a whole number from 0 .* not "lots"\n$/);
    return true;
  });
  const { stdout } = await run(process.execPath, [CLI, '--version'], { env: { ...process.env, PACHBACKUP_HEAP_GROWING_PERCENT: '0' } });
  assert.match(stdout, /^\d+\.\d+\.\d+\n$/);
});
