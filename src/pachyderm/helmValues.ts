/**
 * Pachyderm Helm values: point a release at restored databases and a restored bucket, check the
 * result against the chart's schema, strip secrets before values are stored in a backup, and read
 * the values of a deployed release back out of its Helm release Secret.
 *
 * Facts this module relies on (pachyderm/pachyderm v2.11.6, helm/helm v3):
 * - The chart picks the storage backend in `pachyderm.storageBackend` (_helpers.tpl):
 *   `pachd.storage.backend` if set, else `deployTarget` when it is exactly AMAZON, GOOGLE,
 *   MICROSOFT or LOCAL, else rendering fails.
 * - pachd builds its bucket from STORAGE_URL alone, LOCAL aside (src/internal/obj/bucket.go); for S3
 *   the endpoint, region and disableSSL come from the URL's query, and the URL's path is dropped.
 *   The per-backend maps (`pachd.storage.amazon` ...) only feed the pachyderm-storage-secret.
 * - NewBucket accepts AMAZON, GOOGLE, MICROSOFT and LOCAL; a MINIO backend is rejected.
 * - For LOCAL the chart mounts `<local.hostPath>pachd` at /pach, the bucket root, and does not
 *   render STORAGE_URL at all.
 * - Helm reads values with go-yaml v2 (YAML 1.1: `on`, `yes`, `y` are booleans), so values are
 *   parsed and written here with the YAML 1.1 schema too.
 * - A release Secret's `data.release` is base64(gzip(JSON)) (pkg/storage/driver/util.go), and
 *   the Kubernetes API base64-encodes Secret data once more.
 */
import { gunzipSync } from 'node:zlib';
import { isDeepStrictEqual } from 'node:util';
import AjvModule, { type ErrorObject, type ValidateFunction } from 'ajv';
import { isAlias, isMap, isNode, isScalar, isSeq, parseDocument, stringify, type Document, type Node, type Scalar, type YAMLMap } from 'yaml';
import { z } from 'zod';

// ajv is CommonJS; under NodeNext its default export arrives as the module object.
const Ajv = AjvModule.default;

const YAML_OPTIONS = { version: '1.1', lineWidth: 0 } as const;

export const REDACTED = 'REDACTED-BY-PACHBACKUP';

// ---------------------------------------------------------------------------------------------
// Restore target and the rewrite
// ---------------------------------------------------------------------------------------------

export const restoreTargetSchema = z.object({
  postgres: z.object({
    host: z.string().min(1),
    port: z.number().int().min(1).max(65535),
    database: z.string().min(1),
    identityDatabase: z.string().min(1),
    username: z.string().min(1).optional(),
    /** Written to `global.postgresql.postgresqlSSL`, the sslmode pg-bouncer uses upstream. */
    sslmode: z.string().min(1).optional(),
  }),
  objectStore: z.object({
    /** `s3://bucket`, `gs://bucket`, `azblob://container`, or `file:///host/path/pachd` for LOCAL. */
    url: z.string().min(1),
    /** Defaults to the bucket in `url`; pachd itself only reads `url`. */
    bucket: z.string().min(1).optional(),
    endpoint: z.string().min(1).optional(),
    region: z.string().min(1).optional(),
  }),
});
export type RestoreTarget = z.infer<typeof restoreTargetSchema>;

export type StorageBackend = 'AMAZON' | 'GOOGLE' | 'MICROSOFT' | 'MINIO' | 'LOCAL';

export interface HelmValuesChange {
  /** Dotted path, e.g. `global.postgresql.postgresqlPort`. */
  path: string;
  /** Absent when the key did not exist before. */
  from?: unknown;
  to: unknown;
}

export interface HelmValuesRewrite {
  yaml: string;
  changes: HelmValuesChange[];
  /** Things the operator must know or fix by hand; the rewrite itself succeeded. */
  warnings: string[];
  backend: StorageBackend;
}

/**
 * Rewrites user values so a release talks to the restored databases and bucket, and changes
 * nothing else: comments, key order, quoting and blank lines are kept byte for byte, only the
 * changed scalars are replaced and missing keys are appended to their parent map. If an edit
 * cannot be done in place (flow collections, explicit tags, aliases on the path) the values are
 * re-serialized instead: comments survive, layout may not, and a warning says so.
 *
 * The bundled PostgreSQL subchart is switched off (`postgresql.enabled: false`) unless the target
 * host is the bundled server's own service, because restored databases live on an external server
 * and an enabled subchart would start an empty database nobody uses.
 *
 * Throws when the target's URL scheme does not fit the backend the values use: moving a cluster
 * to another provider needs new credentials and is not a rewrite this function can guess.
 */
export function rewriteHelmValues(sourceYaml: string, target: RestoreTarget): HelmValuesRewrite {
  const checkedTarget = restoreTargetSchema.parse(target);
  const values = valuesObject(parseValues(sourceYaml));
  const warnings: string[] = [];
  const edits: Array<{ path: string[]; value: ScalarValue }> = [];

  const pg = checkedTarget.postgres;
  const pgPath = (key: string): string[] => ['global', 'postgresql', key];
  edits.push({ path: pgPath('postgresqlHost'), value: pg.host });
  // The chart's schema types the port as a string, and templates quote it as-is.
  edits.push({ path: pgPath('postgresqlPort'), value: String(pg.port) });
  edits.push({ path: pgPath('postgresqlDatabase'), value: pg.database });
  edits.push({ path: pgPath('identityDatabaseFullNameOverride'), value: pg.identityDatabase });
  if (pg.username !== undefined) edits.push({ path: pgPath('postgresqlUsername'), value: pg.username });
  if (pg.sslmode !== undefined) edits.push({ path: pgPath('postgresqlSSL'), value: pg.sslmode });

  const bundledService = stringAt(values, ['postgresql', 'fullnameOverride']) || 'postgres';
  const bundledEnabled = getAt(values, ['postgresql', 'enabled']) !== false;
  if (bundledEnabled && pg.host === bundledService) {
    warnings.push(
      `target host "${pg.host}" is the bundled PostgreSQL service, so postgresql.enabled stays on; ` +
        'the restored databases must already be loaded into that server',
    );
  } else if (bundledEnabled) {
    edits.push({ path: ['postgresql', 'enabled'], value: false });
    warnings.push(
      `postgresql.enabled set to false: the restored databases are on ${pg.host}, ` +
        'and the bundled PostgreSQL subchart would otherwise start an empty server',
    );
  }
  if (getAt(values, ['cloudsqlAuthProxy', 'enabled']) === true) {
    warnings.push(
      'cloudsqlAuthProxy.enabled is true: pachd reaches Cloud SQL through the proxy, so check that ' +
        `postgresqlHost "${pg.host}" and cloudsqlAuthProxy.connectionName name the restored instance`,
    );
  }

  const store = checkedTarget.objectStore;
  const url = parseObjectStoreUrl(store.url);
  const detected = detectStorageBackend(values, store.url);
  const backend = detected.backend;
  if (!backendAcceptsScheme(backend, url.scheme)) {
    throw new Error(
      `restore target ${store.url} is a ${url.scheme}:// store but the values use the ${backend} backend ` +
        `(${detected.rule}); a restore keeps the provider, so give a ${schemesFor(backend)} URL`,
    );
  }
  warnings.push(...deployTargetWarnings(values));
  if (backend === 'MINIO') {
    warnings.push(
      'pachd.storage.backend is MINIO, which pachd 2.11 rejects ("unrecognized storage backend"); ' +
        'use backend AMAZON with an s3:// storageURL carrying ?endpoint=',
    );
  }

  const storage = (key: string): string[] => ['pachd', 'storage', key];
  const storageUrl = url.scheme === 's3' ? withS3QueryDefaults(store.url, store.endpoint, store.region) : store.url;
  // Set for LOCAL too, although the chart only renders it for other targets: a stale URL left in
  // the values would point at the source cluster's bucket if deployTarget ever changes.
  edits.push({ path: storage('storageURL'), value: storageUrl });

  if (url.scheme !== 'file' && url.prefix !== '') {
    warnings.push(
      `pachd ignores the path of storageURL ("${url.prefix}" in ${store.url}): it opens the bucket root, ` +
        'so the restored chunk/ objects must be at the root of the bucket',
    );
  }
  const bucket = store.bucket ?? url.bucket;
  if (store.bucket !== undefined && url.scheme !== 'file' && store.bucket !== url.bucket) {
    warnings.push(`objectStore.bucket "${store.bucket}" differs from the bucket in ${store.url}; pachd uses the URL`);
  }
  switch (backend) {
    case 'AMAZON':
      edits.push({ path: storage('amazon').concat('bucket'), value: bucket });
      if (store.region !== undefined) edits.push({ path: storage('amazon').concat('region'), value: store.region });
      if (store.endpoint !== undefined) {
        edits.push({ path: storage('amazon').concat('customEndpoint'), value: store.endpoint });
      }
      break;
    case 'MINIO':
      edits.push({ path: storage('minio').concat('bucket'), value: bucket });
      if (store.endpoint !== undefined) edits.push({ path: storage('minio').concat('endpoint'), value: store.endpoint });
      break;
    case 'GOOGLE':
      edits.push({ path: storage('google').concat('bucket'), value: bucket });
      break;
    case 'MICROSOFT':
      edits.push({ path: storage('microsoft').concat('container'), value: bucket });
      break;
    case 'LOCAL':
      edits.push({ path: storage('local').concat('hostPath'), value: localHostPath(url.path, store.url) });
      break;
  }

  const changes: HelmValuesChange[] = [];
  const effective: Array<{ path: string[]; value: ScalarValue }> = [];
  for (const edit of edits) {
    const from = getAt(values, edit.path);
    if (isDeepStrictEqual(from, edit.value)) continue;
    effective.push(edit);
    changes.push(from === undefined ? { path: edit.path.join('.'), to: edit.value } : { path: edit.path.join('.'), from, to: edit.value });
  }

  const applied = applyEdits(sourceYaml, effective);
  if (applied.reserialized) {
    warnings.push('the values could not be edited in place, so they were re-serialized: comments are kept, layout may differ');
  }
  return { yaml: applied.yaml, changes, warnings, backend };
}

/**
 * Which storage backend the values use, first rule that answers wins:
 * 1. `pachd.storage.backend`, when non-empty (what the chart itself uses first);
 * 2. `deployTarget`, when exactly AMAZON, GOOGLE, MICROSOFT or LOCAL (the chart compares
 *    case-sensitively; CUSTOM and MINIO need rule 1);
 * 3. the scheme of the values' current `pachd.storage.storageURL`;
 * 4. the only backend map under `pachd.storage` holding a non-empty location or credential
 *    (amazon/minio/google bucket, microsoft container, local hostPath, id, secret, cred);
 * 5. the scheme of `targetUrl`.
 * Rules 3 to 5 only apply to values the chart would refuse to render anyway; they decide which
 * backend map to update.
 */
export function detectStorageBackend(values: unknown, targetUrl?: string): { backend: StorageBackend; rule: string } {
  const backend = stringAt(values, ['pachd', 'storage', 'backend']);
  if (backend !== '') {
    const known = asBackend(backend.toUpperCase());
    if (known === undefined) throw new Error(`pachd.storage.backend "${backend}" is not one of AMAZON, GOOGLE, MICROSOFT, MINIO, LOCAL`);
    return { backend: known, rule: `pachd.storage.backend is ${backend}` };
  }
  const deployTarget = stringAt(values, ['deployTarget']);
  if (deployTarget === 'AMAZON' || deployTarget === 'GOOGLE' || deployTarget === 'MICROSOFT' || deployTarget === 'LOCAL') {
    return { backend: deployTarget, rule: `deployTarget is ${deployTarget}` };
  }
  const currentUrl = stringAt(values, ['pachd', 'storage', 'storageURL']);
  const fromCurrentUrl = currentUrl === '' ? undefined : backendForScheme(schemeOf(currentUrl));
  if (fromCurrentUrl !== undefined) return { backend: fromCurrentUrl, rule: `pachd.storage.storageURL is ${schemeOf(currentUrl)}://` };
  const used = BACKEND_MAPS.filter(({ map, fields }) =>
    fields.some((field) => stringAt(values, ['pachd', 'storage', map, field]) !== ''),
  );
  const onlyUsed = used.length === 1 ? used[0] : undefined;
  if (onlyUsed !== undefined) return { backend: onlyUsed.backend, rule: `only pachd.storage.${onlyUsed.map} is filled in` };
  const fromTarget = targetUrl === undefined ? undefined : backendForScheme(schemeOf(targetUrl));
  if (fromTarget !== undefined) return { backend: fromTarget, rule: `the values name no backend; taken from ${schemeOf(targetUrl ?? '')}:// of the target` };
  throw new Error('cannot tell the storage backend: set pachd.storage.backend or deployTarget');
}

const BACKEND_MAPS: ReadonlyArray<{ backend: StorageBackend; map: string; fields: readonly string[] }> = [
  { backend: 'AMAZON', map: 'amazon', fields: ['bucket', 'id', 'secret', 'region', 'customEndpoint'] },
  { backend: 'GOOGLE', map: 'google', fields: ['bucket', 'cred'] },
  { backend: 'MICROSOFT', map: 'microsoft', fields: ['container', 'id', 'secret'] },
  { backend: 'MINIO', map: 'minio', fields: ['bucket', 'endpoint', 'id', 'secret'] },
  { backend: 'LOCAL', map: 'local', fields: ['hostPath'] },
];

function asBackend(name: string): StorageBackend | undefined {
  return name === 'AMAZON' || name === 'GOOGLE' || name === 'MICROSOFT' || name === 'MINIO' || name === 'LOCAL' ? name : undefined;
}

// Schemes as pachd's obj.ParseURL accepts them (gcs and wasb are its aliases).
function backendForScheme(scheme: string): StorageBackend | undefined {
  switch (scheme) {
    case 's3':
      return 'AMAZON';
    case 'gs':
    case 'gcs':
      return 'GOOGLE';
    case 'azblob':
    case 'wasb':
      return 'MICROSOFT';
    case 'file':
      return 'LOCAL';
    default:
      return undefined;
  }
}

function backendAcceptsScheme(backend: StorageBackend, scheme: string): boolean {
  const forScheme = backendForScheme(scheme);
  return forScheme === backend || (backend === 'MINIO' && forScheme === 'AMAZON');
}

function schemesFor(backend: StorageBackend): string {
  switch (backend) {
    case 'AMAZON':
    case 'MINIO':
      return 's3://';
    case 'GOOGLE':
      return 'gs://';
    case 'MICROSOFT':
      return 'azblob://';
    case 'LOCAL':
      return 'file://';
  }
}

function deployTargetWarnings(values: unknown): string[] {
  const deployTarget = stringAt(values, ['deployTarget']);
  if (deployTarget === '') {
    return ['deployTarget is empty: the chart refuses to render ("deployTarget must be set"); set it before installing'];
  }
  const known = ['GOOGLE', 'AMAZON', 'MINIO', 'MICROSOFT', 'CUSTOM', 'LOCAL'];
  if (!known.includes(deployTarget) && stringAt(values, ['pachd', 'storage', 'backend']) === '') {
    return [`deployTarget "${deployTarget}" is not one of ${known.join(', ')} and pachd.storage.backend is empty: the chart will not render`];
  }
  return [];
}

interface ObjectStoreUrl {
  scheme: string;
  bucket: string;
  /** Path after the bucket, without surrounding slashes; for file URLs, empty. */
  prefix: string;
  /** For file URLs, the absolute path. */
  path: string;
}

function schemeOf(url: string): string {
  return /^([a-z][a-z0-9+.-]*):\/\//i.exec(url)?.[1]?.toLowerCase() ?? '';
}

function parseObjectStoreUrl(url: string): ObjectStoreUrl {
  const match = /^([a-z][a-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?[^#]*)?$/i.exec(url);
  const scheme = match?.[1]?.toLowerCase();
  if (match === null || scheme === undefined || backendForScheme(scheme) === undefined) {
    throw new Error(`object store URL "${url}" must be s3://bucket, gs://bucket, azblob://container or file:///path`);
  }
  const authority = match[2] ?? '';
  const rest = match[3] ?? '';
  if (scheme === 'file') {
    if (authority !== '' && authority !== 'localhost') throw new Error(`file URL "${url}" must be file:///absolute/path`);
    return { scheme, bucket: '', prefix: '', path: decodeURIComponent(rest) };
  }
  // wasb://container@account/... names the container in the user part.
  const bucket = scheme === 'wasb' ? authority.split('@')[0] ?? '' : authority;
  if (bucket === '') throw new Error(`object store URL "${url}" names no bucket`);
  return { scheme, bucket, prefix: rest.replace(/^\/+|\/+$/g, ''), path: '' };
}

/**
 * pachd reads the S3 endpoint and region from the storageURL query, not from the amazon map,
 * so target values the URL does not already carry are appended to it.
 */
function withS3QueryDefaults(url: string, endpoint: string | undefined, region: string | undefined): string {
  const query = url.includes('?') ? url.slice(url.indexOf('?') + 1) : '';
  const present = new URLSearchParams(query);
  const additions: string[] = [];
  const encode = (value: string): string => encodeURIComponent(value).replace(/%3A/gi, ':').replace(/%2F/gi, '/');
  if (endpoint !== undefined && !present.has('endpoint')) additions.push(`endpoint=${encode(endpoint)}`);
  if (region !== undefined && !present.has('region')) additions.push(`region=${encode(region)}`);
  if (additions.length === 0) return url;
  const separator = !url.includes('?') ? '?' : url.endsWith('?') || url.endsWith('&') ? '' : '&';
  return url + separator + additions.join('&');
}

/** The chart mounts `<hostPath>pachd` as the bucket root, so the URL must end in `/pachd`. */
function localHostPath(path: string, url: string): string {
  const match = /^(\/(?:.*\/)?)pachd\/?$/.exec(path);
  if (match?.[1] === undefined) {
    throw new Error(
      `LOCAL restore target ${url} must end in /pachd: the chart mounts <pachd.storage.local.hostPath>pachd ` +
        'as the bucket root, so restore the objects into a directory named pachd',
    );
  }
  return match[1];
}

// ---------------------------------------------------------------------------------------------
// Editing YAML text in place
// ---------------------------------------------------------------------------------------------

type ScalarValue = string | boolean;

function parseValues(text: string): Document.Parsed {
  const doc = parseDocument(text, YAML_OPTIONS);
  const problem = doc.errors[0];
  // Only the first line: the parser's message goes on to quote the lines around the error, which
  // in Helm values are often a password (one with a ': ' or a quote in it is a common cause).
  if (problem !== undefined) throw new Error(`values are not valid YAML: ${problem.message.split('\n')[0]!.replace(/:$/, '')}`);
  return doc;
}

function valuesObject(doc: Document.Parsed): Record<string, unknown> {
  const js: unknown = doc.toJS();
  if (js === null || js === undefined) return {};
  if (!isPlainObject(js)) throw new Error('values must be a YAML mapping at the top level');
  return js;
}

/**
 * Applies the edits one at a time to the text, re-parsing in between so every edit sees current
 * offsets, then proves the result parses to exactly the expected values. Any edit that cannot be
 * done as a text splice, or a result that does not prove out, falls back to the Document API.
 */
function applyEdits(source: string, edits: ReadonlyArray<{ path: string[]; value: ScalarValue }>): { yaml: string; reserialized: boolean } {
  const expected = structuredClone(valuesObject(parseValues(source)));
  for (const edit of edits) setAt(expected, edit.path, edit.value);

  let text: string | undefined = source;
  for (const edit of edits) {
    text = spliceValue(text, edit.path, edit.value);
    if (text === undefined) break;
  }
  if (text !== undefined) {
    const doc = parseDocument(text, YAML_OPTIONS);
    if (doc.errors.length === 0 && isDeepStrictEqual(doc.toJS() ?? {}, expected)) return { yaml: text, reserialized: false };
  }

  const doc = parseValues(source);
  for (const edit of edits) {
    for (let depth = 1; depth < edit.path.length; depth++) {
      const prefix = edit.path.slice(0, depth);
      const existing: unknown = doc.getIn(prefix, true);
      if (isMap(existing)) continue;
      const created = doc.createNode({});
      // A comment hanging on the replaced `key:` node would otherwise vanish with it.
      if (isNode(existing)) {
        created.commentBefore = existing.commentBefore;
        created.comment = existing.comment;
      }
      doc.setIn(prefix, created);
    }
    doc.setIn(edit.path, edit.value);
  }
  return { yaml: doc.toString(YAML_OPTIONS), reserialized: true };
}

/** Returns the text with `path` set to `value`, or undefined when no clean splice exists. */
function spliceValue(text: string, path: readonly string[], value: ScalarValue): string | undefined {
  const doc = parseDocument(text, YAML_OPTIONS);
  if (doc.errors.length > 0) return undefined;
  let node: unknown = doc.contents;
  if (node === null || (isScalar(node) && node.value === null)) {
    // An empty document (only comments, perhaps): append the whole branch at column 0.
    const range = rangeOf(node);
    if (range !== undefined && range[0] !== range[1]) return undefined;
    return appendBlock(text, text.length, 0, path, value);
  }
  for (let depth = 0; depth < path.length; depth++) {
    if (!isMap(node)) return undefined;
    const segment = path[depth];
    const pair = node.items.find((item) => keyString(item.key) === segment);
    if (pair === undefined) return insertIntoBlockMap(text, node, path.slice(depth), value);
    if (depth === path.length - 1) return isScalar(pair.value) ? replaceScalar(text, pair.value, value) : undefined;
    const emptyValue = isScalar(pair.value) && pair.value.value === null ? rangeOf(pair.value) : undefined;
    const keyStart = rangeOf(pair.key)?.[0];
    if (emptyValue !== undefined && emptyValue[0] === emptyValue[1] && keyStart !== undefined) {
      // `key:` with nothing after it: the rest of the branch goes on the following lines.
      const column = keyStart - (text.lastIndexOf('\n', keyStart - 1) + 1);
      return appendBlock(text, emptyValue[1], column + 2, path.slice(depth + 1), value);
    }
    node = pair.value;
  }
  return undefined;
}

function insertIntoBlockMap(text: string, map: YAMLMap, rest: readonly string[], value: ScalarValue): string | undefined {
  const first = map.items[0];
  const last = map.items[map.items.length - 1];
  if (map.flow === true || first === undefined || last === undefined) return undefined;
  const firstKey: unknown = first.key;
  const lastEnd = rangeOf(last.value)?.[2] ?? rangeOf(last.key)?.[2];
  const keyStart = rangeOf(firstKey)?.[0];
  if (lastEnd === undefined || keyStart === undefined) return undefined;
  const column = keyStart - (text.lastIndexOf('\n', keyStart - 1) + 1);
  return appendBlock(text, lastEnd, column, rest, value);
}

/** Inserts `path: value` as block YAML indented by `column`, at the start of the line at or after `offset`. */
function appendBlock(text: string, offset: number, column: number, path: readonly string[], value: ScalarValue): string {
  let at = offset;
  if (at > 0 && text[at - 1] !== '\n') {
    const newline = text.indexOf('\n', at);
    at = newline < 0 ? text.length : newline + 1;
  }
  const nested = path.reduceRight<unknown>((inner, key) => ({ [key]: inner }), value);
  const indent = ' '.repeat(column);
  const block = stringify(nested, { ...YAML_OPTIONS, indent: 2 })
    .split('\n')
    .filter((line) => line !== '')
    .map((line) => indent + line + '\n')
    .join('');
  const lead = at === text.length && text.length > 0 && !text.endsWith('\n') ? '\n' : '';
  return text.slice(0, at) + lead + block + text.slice(at);
}

function replaceScalar(text: string, scalar: Scalar, value: ScalarValue): string | undefined {
  const range = scalar.range;
  // Explicit tags and other oddities are not special-cased: the caller re-parses and falls back.
  if (range === undefined || range === null) return undefined;
  const [start, end] = range;
  const original = text.slice(start, end);
  let rendered = renderScalarLike(scalar, value);
  // Block scalars own the newline that ends them; a `key:` with no value owns nothing.
  if ((scalar.type === 'BLOCK_LITERAL' || scalar.type === 'BLOCK_FOLDED') && original.endsWith('\n')) rendered += '\n';
  if (start === end) rendered = ' ' + rendered;
  return text.slice(0, start) + rendered + text.slice(end);
}

/** Keeps the original quote style where the new value allows it, so diffs stay minimal. */
function renderScalarLike(scalar: Scalar, value: ScalarValue): string {
  if (typeof value === 'string' && !value.includes('\n')) {
    if (scalar.type === 'QUOTE_DOUBLE') return JSON.stringify(value);
    if (scalar.type === 'QUOTE_SINGLE') return `'${value.replaceAll("'", "''")}'`;
  }
  if (typeof value === 'string' && value.includes('\n')) return JSON.stringify(value);
  return stringify(value, YAML_OPTIONS).replace(/\n$/, '');
}

function rangeOf(node: unknown): readonly [number, number, number] | undefined {
  if (node !== null && typeof node === 'object' && 'range' in node) {
    const range = (node as Node).range;
    return range ?? undefined;
  }
  return undefined;
}

function keyString(key: unknown): string | undefined {
  if (!isScalar(key)) return undefined;
  const raw: unknown = key.value;
  return raw === null ? '' : String(raw);
}

// ---------------------------------------------------------------------------------------------
// Schema validation
// ---------------------------------------------------------------------------------------------

export interface ValidateOptions {
  /**
   * The chart's values.yaml (text or parsed). When given, the user values are merged over it the
   * way Helm coalesces them before validating, which is exactly what `helm install` checks.
   * Without it only the user values are checked; the chart's schema has no `required` keywords,
   * so that finds the same type errors in what the user wrote.
   */
  defaults?: string | Record<string, unknown>;
}

const compiledSchemas = new WeakMap<object, ValidateFunction>();

/**
 * Validates values against the chart's values.schema.json; returns readable errors, empty when
 * valid. YAML syntax errors are returned the same way rather than thrown.
 */
export function validateHelmValues(yaml: string, schemaJson: object, options: ValidateOptions = {}): string[] {
  const doc = parseDocument(yaml, YAML_OPTIONS);
  if (doc.errors.length > 0) return doc.errors.map((error) => `YAML: ${error.message}`);
  const userValues: unknown = doc.toJS() ?? {};
  let values: unknown = userValues;
  if (options.defaults !== undefined) {
    const defaults = typeof options.defaults === 'string' ? valuesObject(parseValues(options.defaults)) : options.defaults;
    if (!isPlainObject(userValues)) return ['(root): values must be a mapping'];
    values = coalesceHelmValues(defaults, userValues);
  }
  let validate = compiledSchemas.get(schemaJson);
  if (validate === undefined) {
    // The chart's schema declares `$schema: http://json-schema.org/schema#` but only uses
    // draft-07 keywords; strict:false keeps ajv from rejecting anything it does not know.
    const ajv = new Ajv({ strict: false, allErrors: true, validateSchema: false });
    validate = ajv.compile(schemaJson);
    compiledSchemas.set(schemaJson, validate);
  }
  if (validate(values)) return [];
  return (validate.errors ?? []).map((error) => describeSchemaError(error, values));
}

function describeSchemaError(error: ErrorObject, values: unknown): string {
  const segments = error.instancePath === '' ? [] : error.instancePath.slice(1).split('/').map((s) => s.replaceAll('~1', '/').replaceAll('~0', '~'));
  const where = segments.length === 0 ? '(root)' : formatPath(segments);
  const actual = getAt(values, segments);
  if (error.keyword === 'type') return `${where}: must be ${String(error.params['type'])}, got ${describeValue(actual)}`;
  if (error.keyword === 'enum') {
    const allowed = error.params['allowedValues'];
    return `${where}: ${describeValue(actual)} is not one of ${JSON.stringify(allowed)}`;
  }
  return `${where}: ${error.message ?? error.keyword}`;
}

function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

/**
 * Helm's coalescing of user values over chart defaults: mappings merge key by key, a user `null`
 * deletes the default, anything else replaces it.
 */
export function coalesceHelmValues(defaults: Record<string, unknown>, overrides: Record<string, unknown>): Record<string, unknown> {
  const result: Record<string, unknown> = { ...defaults };
  for (const [key, override] of Object.entries(overrides)) {
    const base = result[key];
    if (override === null) delete result[key];
    else if (isPlainObject(base) && isPlainObject(override)) result[key] = coalesceHelmValues(base, override);
    else result[key] = override;
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------------

// Keys whose value is secret material. Anchored at the end so `IDTokenExpiry` (a duration),
// `existingSecretName`, `credentialsSecretName` and other names of Kubernetes Secrets do not match.
const SECRET_KEY = /(password|passwd|secret|token|cred|creds|credential|credentials|connection_?string|.key)$/i;
// These end like secrets but hold the name of an entry inside a Kubernetes Secret, or a label key.
const NAMES_NOT_SECRETS = /(existingsecretkey|clientsecretkey|topologykey)$/i;
// Storage access key ids (and the Azure account name) are half of a credential pair.
const CREDENTIAL_ID_PATH = /^pachd\.storage\.(amazon|minio|microsoft)\.id$/;

/**
 * Whether the value at `path` is secret material. A key is secret when its name ends in password,
 * passwd, secret, token, cred(s), credential(s), connection(_)string, or `<something>Key`
 * (licenseKey, secretKey, accessKey, private_key, tls.key), except existingSecretKey,
 * clientSecretKey and topologyKey, which name things. A bare `key` is not secret on its own (it
 * is a label or taint key in tolerations and affinities); the chart's TLS private keys sit under
 * `newSecret`, which is. Everything below a secret key is secret, and so are the storage
 * credential ids `pachd.storage.{amazon,minio,microsoft}.id`.
 */
export function isSecretValuePath(path: ReadonlyArray<string | number>): boolean {
  const dotted = path.join('.');
  if (CREDENTIAL_ID_PATH.test(dotted)) return true;
  return path.some((segment) => typeof segment === 'string' && SECRET_KEY.test(segment) && !NAMES_NOT_SECRETS.test(segment));
}

/**
 * Replaces every non-empty string or number at a secret path (see isSecretValuePath) with
 * REDACTED, keeping comments and layout. Booleans, nulls and empty strings are left alone: they
 * carry no secret and show whether a secret was configured. Returns the redacted paths.
 */
export function redactHelmSecrets(yaml: string): { yaml: string; redacted: string[] } {
  const doc = parseValues(yaml);
  const targets: Array<{ scalar: Scalar; path: Array<string | number> }> = [];
  const visit = (node: unknown, path: Array<string | number>): void => {
    if (isMap(node)) {
      for (const pair of node.items) {
        const key = keyString(pair.key);
        if (key !== undefined) visit(pair.value, [...path, key]);
      }
    } else if (isSeq(node)) {
      node.items.forEach((item, index) => visit(item, [...path, index]));
    } else if (isAlias(node) && isSecretValuePath(path)) {
      // The secret lives where the anchor is, which may be under an innocent-looking key.
      const anchored: unknown = node.resolve(doc);
      if (isScalar(anchored) && holdsSecret(anchored.value)) targets.push({ scalar: anchored, path });
    } else if (isScalar(node) && isSecretValuePath(path) && holdsSecret(node.value)) {
      targets.push({ scalar: node, path });
    }
  };
  visit(doc.contents, []);

  let text = yaml;
  const ordered = [...new Set(targets.map(({ scalar }) => scalar))].map((scalar) => ({ scalar })).sort((a, b) => (b.scalar.range?.[0] ?? 0) - (a.scalar.range?.[0] ?? 0));
  for (const { scalar } of ordered) {
    const next = replaceScalar(text, scalar, REDACTED);
    if (next === undefined) {
      text = '';
      break;
    }
    text = next;
  }
  const redactedPaths = targets.map(({ path }) => path);
  if (text === '' || !redactionHolds(text, redactedPaths)) {
    for (const { scalar } of targets) {
      scalar.value = REDACTED;
      scalar.type = 'PLAIN';
    }
    text = doc.toString(YAML_OPTIONS);
  }
  return { yaml: text, redacted: redactedPaths.map(formatPath) };
}

function holdsSecret(value: unknown): boolean {
  return (typeof value === 'string' && value !== '') || (typeof value === 'number' && Number.isFinite(value));
}

function redactionHolds(text: string, paths: ReadonlyArray<ReadonlyArray<string | number>>): boolean {
  const doc = parseDocument(text, YAML_OPTIONS);
  if (doc.errors.length > 0) return false;
  const values: unknown = doc.toJS();
  return paths.every((path) => getAt(values, path) === REDACTED);
}

// ---------------------------------------------------------------------------------------------
// Helm release Secrets
// ---------------------------------------------------------------------------------------------

export interface HelmRelease {
  name: string;
  /** The release revision, N in `sh.helm.release.v1.<name>.v<N>`. */
  version: number;
  namespace?: string;
  /** The user-supplied values (`helm get values`), not merged with the chart's defaults. */
  config: Record<string, unknown>;
  chartName?: string;
  chartVersion?: string;
  appVersion?: string;
  status?: string;
}

const releaseJsonSchema = z.object({
  name: z.string(),
  version: z.number().int(),
  namespace: z.string().optional(),
  config: z.record(z.string(), z.unknown()).nullish(),
  chart: z
    .object({
      metadata: z
        .object({ name: z.string().optional(), version: z.string().optional(), appVersion: z.string().optional() })
        .nullish(),
    })
    .nullish(),
  info: z.object({ status: z.string().optional() }).nullish(),
});

const GZIP_MAGIC = [0x1f, 0x8b, 0x08];

/**
 * Decodes the `release` entry of a `sh.helm.release.v1.*` Secret. Accepts the value as the
 * Kubernetes API returns it (base64 of Helm's base64 of gzip of JSON) and also the once-decoded
 * value (`kubectl get secret -o jsonpath=... | base64 -d`). Like Helm, a payload without the gzip
 * magic bytes is taken as uncompressed JSON, which is how releases were stored before compression.
 */
export function decodeHelmReleaseSecret(secretData: string): HelmRelease {
  let bytes = decodeBase64(secretData, 'release Secret data');
  let json: Buffer | undefined;
  for (let layer = 0; layer < 2 && json === undefined; layer++) {
    if (GZIP_MAGIC.every((byte, i) => bytes[i] === byte)) json = gunzipSync(bytes);
    else if (bytes.toString('utf8').trimStart().startsWith('{')) json = bytes;
    else if (layer === 0) bytes = decodeBase64(bytes.toString('latin1'), 'the release inside the Secret');
  }
  if (json === undefined) throw new Error('release Secret data is neither gzip nor JSON after base64 decoding');
  let parsed: unknown;
  try {
    parsed = JSON.parse(json.toString('utf8'));
  } catch (error) {
    throw new Error(`release JSON is malformed: ${error instanceof Error ? error.message : String(error)}`);
  }
  const result = releaseJsonSchema.safeParse(parsed);
  if (!result.success) throw new Error(`not a Helm release: ${result.error.issues.map((issue) => `${issue.path.join('.')}: ${issue.message}`).join('; ')}`);
  const release = result.data;
  const metadata = release.chart?.metadata ?? undefined;
  return {
    name: release.name,
    version: release.version,
    ...(release.namespace !== undefined ? { namespace: release.namespace } : {}),
    config: release.config ?? {},
    ...(metadata?.name !== undefined ? { chartName: metadata.name } : {}),
    ...(metadata?.version !== undefined ? { chartVersion: metadata.version } : {}),
    ...(metadata?.appVersion !== undefined ? { appVersion: metadata.appVersion } : {}),
    ...(release.info?.status !== undefined ? { status: release.info.status } : {}),
  };
}

/** The user-supplied values as a values file, quoted so Helm's YAML 1.1 reader gets the same types. */
export function helmValuesYamlFromRelease(config: Record<string, unknown>): string {
  return stringify(config, YAML_OPTIONS);
}

function decodeBase64(text: string, what: string): Buffer {
  const compact = text.replace(/\s+/g, '');
  if (compact.length === 0 || compact.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(compact)) {
    throw new Error(`${what} is not base64`);
  }
  return Buffer.from(compact, 'base64');
}

// ---------------------------------------------------------------------------------------------
// Plain-object paths
// ---------------------------------------------------------------------------------------------

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function getAt(root: unknown, path: ReadonlyArray<string | number>): unknown {
  let node = root;
  for (const segment of path) {
    if (Array.isArray(node) && typeof segment === 'number') node = node[segment];
    else if (Array.isArray(node) && /^\d+$/.test(String(segment))) node = node[Number(segment)];
    else if (isPlainObject(node)) node = node[String(segment)];
    else return undefined;
  }
  return node;
}

function stringAt(root: unknown, path: readonly string[]): string {
  const value = getAt(root, path);
  return typeof value === 'string' ? value : '';
}

function setAt(root: Record<string, unknown>, path: readonly string[], value: unknown): void {
  let node = root;
  path.forEach((segment, index) => {
    if (index === path.length - 1) {
      node[segment] = value;
      return;
    }
    const child = node[segment];
    if (isPlainObject(child)) node = child;
    else {
      const created: Record<string, unknown> = {};
      node[segment] = created;
      node = created;
    }
  });
}

/** `a.b[0]["eks.amazonaws.com/role-arn"]`: dots between plain keys, brackets where a dot would mislead. */
function formatPath(path: ReadonlyArray<string | number>): string {
  return path
    .map((segment, index) => {
      if (typeof segment === 'number') return `[${segment}]`;
      if (/^[A-Za-z0-9_-]+$/.test(segment)) return index === 0 ? segment : `.${segment}`;
      return `[${JSON.stringify(segment)}]`;
    })
    .join('');
}

/**
 * Whether Pachyderm's garbage collection is on for a release with these values. Both GC loops run
 * unless their period is negative (`pachd.storageGCPeriod`, `pachd.storageChunkGCPeriod`; 0 or
 * unset means the default period), so GC is off only when both are negative.
 */
export function pachydermGcEnabled(sourceYaml: string): boolean {
  const values = valuesObject(parseValues(sourceYaml));
  const pachd = values.pachd;
  const periods = typeof pachd === 'object' && pachd !== null ? (pachd as Record<string, unknown>) : {};
  const negative = (v: unknown): boolean => Number(v) < 0;
  return !(negative(periods.storageGCPeriod) && negative(periods.storageChunkGCPeriod));
}
