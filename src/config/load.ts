import { readFileSync } from 'node:fs';
import { parseDocument } from 'yaml';
import type { z } from 'zod';
import { configSchema, type Config } from './schema.js';

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** A dotted path (`backup.concurrency`) and the value a command-line flag sets there. */
export type ConfigOverride = [path: string, value: unknown];

/** Reads, overrides and validates a config file. Every error names the key and how to fix it. */
export function loadConfig(file: string, overrides: ConfigOverride[] = []): Config {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      throw new ConfigError(`config file ${file} does not exist; pass --config <file> or create ./pachbackup.yaml (see README, "Configuration")`);
    }
    throw new ConfigError(`cannot read config file ${file}: ${code ?? String(err)}`);
  }
  return parseConfigText(text, file, overrides);
}

export function parseConfigText(text: string, origin: string, overrides: ConfigOverride[] = []): Config {
  const doc = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const first = doc.errors[0]!;
    const where = first.linePos?.[0] ? ` at line ${first.linePos[0].line}, column ${first.linePos[0].col}` : '';
    throw new ConfigError(`${origin} is not valid YAML${where}: ${first.message.split('\n')[0]}`);
  }
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: 100 }) ?? {};
  } catch (err) {
    // e.g. an alias bomb: the parser refuses to expand it.
    throw new ConfigError(`${origin} is not usable YAML: ${(err as Error).message}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ConfigError(`${origin} must hold a YAML mapping with the keys cluster, repository, pause, backup, restore`);
  }
  for (const [path, value] of overrides) setPath(raw as Record<string, unknown>, path, value);
  return validateConfig(raw, origin);
}

export function validateConfig(raw: unknown, origin: string): Config {
  // reportInput lets a wrong type be told from a missing key; secret references fail as unions,
  // whose message never quotes the input, so a literal secret is not echoed.
  const result = configSchema.safeParse(raw, { reportInput: true });
  if (result.success) return result.data;
  const lines = result.error.issues.map(formatIssue);
  throw new ConfigError(`${origin} is not a valid pachbackup config:\n  ${lines.join('\n  ')}`);
}

function formatIssue(issue: z.core.$ZodIssue): string {
  const path = issue.path.map(String).join('.');
  if (issue.code === 'unrecognized_keys') {
    const where = path === '' ? 'top level' : path;
    return `${where}: unknown key ${issue.keys.map((k) => `"${k}"`).join(', ')}; check the spelling against the README's configuration reference`;
  }
  if (issue.code === 'invalid_type' && issue.input === undefined) {
    return `${path}: is required (expected ${issue.expected})`;
  }
  if (issue.code === 'invalid_type') {
    // A string where a section belongs is quoted never: it is typically a secret written in
    // place of its section (a passphrase for repository.encryption, a connection URL with its
    // password for cluster.postgres).
    const got = issue.expected === 'object' && typeof issue.input === 'string' ? 'a string (not shown: it may hold a secret)' : describe(issue.input);
    return `${path}: expected ${issue.expected}, got ${got}`;
  }
  return `${path || 'config'}: ${issue.message}`;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'string') return `the string "${value.length > 40 ? `${value.slice(0, 40)}…` : value}"`;
  return typeof value === 'object' ? 'a mapping' : `${typeof value} ${String(value)}`;
}

function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split('.');
  let node = target;
  for (const part of parts.slice(0, -1)) {
    const next = node[part];
    if (typeof next !== 'object' || next === null || Array.isArray(next)) node[part] = {};
    node = node[part] as Record<string, unknown>;
  }
  node[parts[parts.length - 1]!] = value;
}
