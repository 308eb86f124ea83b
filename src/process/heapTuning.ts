import { setFlagsFromString } from 'node:v8';

/**
 * How far V8 lets the old generation grow past what the last full collection left alive, in
 * percent (V8's `--heap-growing-percent`; by default it picks 10–300 % from recent GC cost).
 */
export const HEAP_GROWING_PERCENT = 300;

/**
 * Tunes V8's heap for a process that streams object bodies, as pachbackup's commands do.
 *
 * Every socket read arrives in a new 64 KiB buffer held outside the JS heap. With the default
 * heap-growth heuristic, a heap of pachbackup's size (~12 MiB once its modules are loaded) gets a
 * limit only a few MiB above what is alive, and that external churn starts a full mark-compact
 * every ~20 MB streamed: ~80 for 200 × 8 MiB objects, a third of the client's CPU. A limit four
 * times the live heap leaves those buffers to the cheap young-generation collections (measured:
 * 2–5 full collections, client CPU 4.3 → 2.6 s; bench/RESULTS.md). The cost is memory: the old
 * generation may grow to four times its live size (three parts garbage) before it is collected, still
 * bounded by the live heap (which pachbackup keeps independent of object count) and by
 * `--max-old-space-size`.
 *
 * V8 reads this flag at every full collection, so setting it at run time works. The value comes
 * from PACHBACKUP_HEAP_GROWING_PERCENT when set (0: V8's own heuristic); a value given on node's
 * command line is left alone. (NODE_OPTIONS cannot carry this V8 flag: node refuses it there.)
 */
export function tuneHeapForStreaming(env: NodeJS.ProcessEnv = process.env): void {
  if (process.execArgv.some((arg) => /^--heap[-_]growing[-_]percent/.test(arg))) return;
  const raw = env['PACHBACKUP_HEAP_GROWING_PERCENT'];
  let percent = HEAP_GROWING_PERCENT;
  if (raw !== undefined && raw !== '') {
    if (!/^\d+$/.test(raw.trim()) || Number(raw) > 1000) {
      throw new Error(`PACHBACKUP_HEAP_GROWING_PERCENT must be a whole number from 0 (V8's own heuristic) to 1000, not "${raw}"`);
    }
    percent = Number(raw);
  }
  if (percent > 0) setFlagsFromString(`--heap-growing-percent=${percent}`);
}
