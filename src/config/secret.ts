import { readFileSync } from 'node:fs';

/**
 * A resolved secret. Its value is only reachable through `reveal()`; every other way of turning it
 * into text (template strings, JSON, util.inspect) gives a placeholder, so a secret that slips into
 * a log line or an error shows as `[secret]` instead of its value.
 */
export class Secret {
  readonly #value: string;
  constructor(value: string, readonly source: string) {
    this.#value = value;
  }
  reveal(): string {
    return this.#value;
  }
  toString(): string {
    return '[secret]';
  }
  toJSON(): string {
    return '[secret]';
  }
  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return `[secret from ${this.source}]`;
  }
}

export type SecretRef = { env: string } | { file: string };

/** Every secret value resolved in this process, so output can be scrubbed of them. */
const known = new Set<string>();

export function registerSecretValue(value: string): void {
  // Very short values would scrub ordinary words out of messages; they are also not worth a guess.
  if (value.length >= 4) known.add(value);
}

export function resolveSecret(ref: SecretRef, keyPath: string, env: NodeJS.ProcessEnv = process.env): Secret {
  if ('env' in ref) {
    const value = env[ref.env];
    if (value === undefined || value === '') {
      throw new SecretError(`${keyPath}: environment variable ${ref.env} is not set; export it or point ${keyPath} at a file with {file: /path}`);
    }
    registerSecretValue(value);
    return new Secret(value, `env ${ref.env}`);
  }
  let value: string;
  try {
    value = readFileSync(ref.file, 'utf8').replace(/\r?\n$/, '');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'error';
    throw new SecretError(`${keyPath}: cannot read secret file ${ref.file} (${code}); check the path and its permissions`);
  }
  if (value === '') throw new SecretError(`${keyPath}: secret file ${ref.file} is empty`);
  registerSecretValue(value);
  return new Secret(value, `file ${ref.file}`);
}

/** Replaces every known secret value in `text` with `[redacted]`. Used on child-process stderr and errors. */
export function scrubSecrets(text: string): string {
  let out = text;
  for (const value of known) {
    if (out.includes(value)) out = out.split(value).join('[redacted]');
  }
  return out;
}

export class SecretError extends Error {
  override name = 'SecretError';
}
