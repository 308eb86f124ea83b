import type { Config, ObjectStoreConfig } from '../config/schema.js';
import { resolveSecret } from '../config/secret.js';
import { openStore, type OpenedStore, type OpenOptions } from '../objectstore/open.js';
import { CHECKSUM_FALLBACK, RetryTally } from '../objectstore/retry.js';
import { locationsOverlap } from '../objectstore/url.js';
import { pgServer, type PgServer } from '../postgres/connection.js';
import { ENCRYPTION_CONFIG_KEY, KeyEncryptionKey } from '../repository/encryption.js';
import { Repository } from '../repository/repository.js';

export class PreflightError extends Error {
  override name = 'PreflightError';
}

/** The repository the config names, with its key-encryption key when `repository.encryption` is set (unlocked by `open`). */
export function openRepository(config: Config, options: OpenOptions = {}): Repository {
  const store = openStore(config.repository, 'repository', options).store;
  const encryption = config.repository.encryption;
  const kek = encryption ? KeyEncryptionKey.fromSecret(resolveSecret(encryption.key, ENCRYPTION_CONFIG_KEY), ENCRYPTION_CONFIG_KEY) : undefined;
  return new Repository(store, kek ? { kek } : {});
}

/** Refuses a repository that can see the cluster's own objects, or vice versa. */
export function assertSeparateStores(cluster: ObjectStoreConfig, clusterKey: string, repository: ObjectStoreConfig): void {
  const a = openStore(cluster, clusterKey).location;
  const b = openStore(repository, 'repository').location;
  if (locationsOverlap(a, cluster.endpoint, b, repository.endpoint)) {
    throw new PreflightError(
      `repository.url (${repository.url}) overlaps ${clusterKey}.url (${cluster.url}): the backup would live inside the bucket it backs up; use a separate bucket or directory for the repository`,
    );
  }
}

export interface ClusterHandles {
  postgres: PgServer;
  source: OpenedStore;
  databases: Array<{ role: 'pachyderm' | 'dex'; name: string }>;
}

export function openCluster(config: Config, options: OpenOptions = {}): ClusterHandles {
  const databases: ClusterHandles['databases'] = [{ role: 'pachyderm', name: config.cluster.databases.pachyderm }];
  if (config.cluster.databases.dex) databases.push({ role: 'dex', name: config.cluster.databases.dex });
  return {
    postgres: pgServer(config.cluster.postgres, 'cluster.postgres'),
    source: openStore(config.cluster.objectStore, 'cluster.objectStore', options),
    databases,
  };
}

/** The run's retry counter; the first retry of each cause is reported as it happens. */
export function newRetryTally(warn: (message: string) => void): RetryTally {
  return new RetryTally((cause, err) => {
    // A second pass after the service did not vouch for an MD5 is reported where it is decided.
    if (cause === CHECKSUM_FALLBACK) return;
    warn(`transient object-store fault (${cause}): ${err.message}; retrying with backoff (the summary counts every retry; frequent SlowDown means: lower the concurrency)`);
  });
}
