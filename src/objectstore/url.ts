import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export type StoreLocation =
  | { kind: 's3'; bucket: string; prefix: string }
  | { kind: 'file'; path: string };

export class StoreUrlError extends Error {
  override name = 'StoreUrlError';
}

/**
 * Parses a store URL as `pachd.storage.storageURL` writes it: `s3://bucket[/prefix]` or
 * `file:///absolute/path`. The prefix never starts or ends with `/`.
 */
export function parseStoreUrl(url: string, keyPath: string): StoreLocation {
  const scheme = /^([a-z0-9+]+):\/\//i.exec(url)?.[1]?.toLowerCase();
  if (scheme === 's3') {
    const rest = url.slice('s3://'.length);
    const slash = rest.indexOf('/');
    const bucket = slash < 0 ? rest : rest.slice(0, slash);
    const prefix = slash < 0 ? '' : rest.slice(slash + 1).replace(/^\/+|\/+$/g, '');
    if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) {
      throw new StoreUrlError(`${keyPath}: "${bucket}" is not a valid S3 bucket name in ${url}; bucket names are 3-63 lowercase letters, digits, dots and hyphens`);
    }
    return { kind: 's3', bucket, prefix };
  }
  if (scheme === 'file') {
    let path: string;
    try {
      path = fileURLToPath(url);
    } catch {
      throw new StoreUrlError(`${keyPath}: ${url} is not a valid file URL; write it as file:///absolute/path`);
    }
    return { kind: 'file', path: resolve(path) };
  }
  if (scheme === 'gs' || scheme === 'azblob') {
    throw new StoreUrlError(`${keyPath}: ${scheme}:// stores are not supported yet; use s3:// (GCS and Azure through an S3-compatible gateway) or file://`);
  }
  throw new StoreUrlError(`${keyPath}: "${url}" is not a store URL; use s3://bucket[/prefix] or file:///absolute/path`);
}

/** Whether two locations can see each other's keys (same bucket and one prefix inside the other). */
export function locationsOverlap(a: StoreLocation, aEndpoint: string | undefined, b: StoreLocation, bEndpoint: string | undefined): boolean {
  if (a.kind === 'file' && b.kind === 'file') return pathInside(a.path, b.path) || pathInside(b.path, a.path);
  if (a.kind === 's3' && b.kind === 's3') {
    if (normaliseEndpoint(aEndpoint) !== normaliseEndpoint(bEndpoint) || a.bucket !== b.bucket) return false;
    return prefixInside(a.prefix, b.prefix) || prefixInside(b.prefix, a.prefix);
  }
  return false;
}

function pathInside(inner: string, outer: string): boolean {
  return inner === outer || inner.startsWith(outer.endsWith('/') ? outer : `${outer}/`);
}

function prefixInside(inner: string, outer: string): boolean {
  return outer === '' || inner === outer || inner.startsWith(`${outer}/`);
}

function normaliseEndpoint(endpoint: string | undefined): string {
  if (!endpoint) return 'aws';
  try {
    const u = new URL(endpoint);
    // Every AWS S3 endpoint (global, regional, dualstack, FIPS) reaches the one namespace of bucket names, as no endpoint does.
    if (/(^|\.)amazonaws\.com$/.test(u.hostname.toLowerCase())) return 'aws';
    // Loopback spellings name the same server.
    const host = ['localhost', '[::1]', '127.0.0.1'].includes(u.hostname.toLowerCase()) ? 'loopback' : u.hostname.toLowerCase();
    return `${u.protocol}//${host}:${u.port || (u.protocol === 'https:' ? '443' : '80')}`;
  } catch {
    return endpoint;
  }
}
