import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { ObjectStoreConfig } from '../config/schema.js';
import { resolveSecret } from '../config/secret.js';
import { FaultStore, faultsFromEnv } from './faults.js';
import { FsObjectStore } from './fs.js';
import { RetryStore, defaultRetryPolicy, type RetryPolicy } from './retry.js';
import { S3ObjectStore } from './s3.js';
import type { ObjectStore } from './store.js';
import { parseStoreUrl, type StoreLocation } from './url.js';

export interface OpenedStore {
  store: ObjectStore;
  location: StoreLocation;
  /** The unwrapped S3 store, for server-side copies; undefined for other kinds. */
  s3?: S3ObjectStore;
}

/** How a store is opened: its retry policy (default defaultRetryPolicy) and HTTP sockets (S3). */
export interface OpenOptions {
  retry?: RetryPolicy;
  maxSockets?: number;
}

/** Builds the store a config section describes, wrapped in the retry policy. `keyPath` names it in errors. */
export function openStore(config: ObjectStoreConfig, keyPath: string, options: OpenOptions = {}): OpenedStore {
  const location = parseStoreUrl(config.url, `${keyPath}.url`);
  const retry = options.retry ?? defaultRetryPolicy;
  // Faults sit under the retry decorator, so injected transient faults exercise the retry policy.
  const faults = faultsFromEnv().filter((rule) => rule.store === keyPath);
  const inject = (store: ObjectStore): ObjectStore => (faults.length > 0 ? new FaultStore(store, faults) : store);
  if (location.kind === 'file') {
    return { store: new RetryStore(inject(new FsObjectStore(location.path)), retry), location };
  }
  if (Boolean(config.accessKeyId) !== Boolean(config.secretAccessKey)) {
    throw new Error(`${keyPath}: set both accessKeyId and secretAccessKey, or neither to use the default AWS credential chain`);
  }
  // A private CA: the config's caFile, else AWS_CA_BUNDLE (as the AWS CLI and the other SDKs read
  // it). AWS_CA_BUNDLE only matters to an https endpoint (or AWS itself); a plain-http one ignores it.
  const tls = config.endpoint === undefined || /^https:/i.test(config.endpoint);
  const caFile = config.caFile ?? (tls ? process.env['AWS_CA_BUNDLE'] || undefined : undefined);
  const ca = caFile ? readCaFile(caFile, config.caFile ? `${keyPath}.caFile` : 'AWS_CA_BUNDLE') : undefined;
  const s3 = new S3ObjectStore({
    configKey: keyPath,
    ...(ca ? { ca } : {}),
    bucket: location.bucket,
    prefix: location.prefix,
    ...(config.endpoint ? { endpoint: config.endpoint } : {}),
    region: config.region,
    forcePathStyle: config.forcePathStyle,
    ...(config.accessKeyId ? { accessKeyId: resolveSecret(config.accessKeyId, `${keyPath}.accessKeyId`) } : {}),
    ...(config.secretAccessKey ? { secretAccessKey: resolveSecret(config.secretAccessKey, `${keyPath}.secretAccessKey`) } : {}),
    checksums: config.checksums,
    requestTimeoutSeconds: config.requestTimeoutSeconds,
    ...(options.maxSockets ? { maxSockets: options.maxSockets } : {}),
  });
  return { store: new RetryStore(inject(s3), retry), location, s3 };
}

/** CA files read and checked, by path: a bundle of 150 certificates takes some 70 ms to check, and a run opens a store several times. */
const caFiles = new Map<string, string>();

function readCaFile(caFile: string, caKey: string): string {
  const known = caFiles.get(caFile);
  if (known !== undefined) return known;
  let ca: string;
  try {
    ca = readFileSync(caFile, 'utf8');
  } catch (err) {
    throw new Error(`${caKey}: cannot read CA file ${caFile}; check the path and its permissions (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  // TLS ignores what is not a certificate, and the endpoint would then fail as if no CA were given.
  const blocks = ca.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
  try {
    if (blocks.length === 0) throw new Error('no -----BEGIN CERTIFICATE----- block');
    for (const block of blocks) new X509Certificate(block);
  } catch (err) {
    throw new Error(`${caKey}: ${caFile} is not a PEM certificate file (${(err as Error).message})`);
  }
  caFiles.set(caFile, ca);
  return ca;
}
