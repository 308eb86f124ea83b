/**
 * The checksum an object index records for each object. Two kinds:
 *
 * - `<64 hex>`: the SHA-256 pachbackup computed while the bytes streamed through it;
 * - `md5:<32 hex>`: the MD5 the S3 service checked for pachbackup: the object was written with a
 *   `Content-MD5` header (the service refuses a body with another MD5), or copied inside the
 *   service and the copy's ETag equals the source's plain-MD5 ETag. No byte passed through
 *   pachbackup's hash, which is what lets a copy run at the service's speed.
 *
 * Readers (verify, restore) recompute whichever kind is recorded over every byte.
 */
export type Checksum = string;
export type ChecksumAlgorithm = 'sha256' | 'md5';

const SHA256 = /^[0-9a-f]{64}$/;
const MD5 = /^md5:[0-9a-f]{32}$/;

export function isChecksum(value: unknown): value is Checksum {
  return typeof value === 'string' && (SHA256.test(value) || MD5.test(value));
}

export function algorithmOf(checksum: Checksum): ChecksumAlgorithm {
  return checksum.startsWith('md5:') ? 'md5' : 'sha256';
}

/** The checksum recorded for a hex digest of `algorithm`. */
export function checksumOf(algorithm: ChecksumAlgorithm, hex: string): Checksum {
  return algorithm === 'md5' ? `md5:${hex}` : hex;
}

/** The hex digest inside a checksum. */
export function digestHex(checksum: Checksum): string {
  return checksum.startsWith('md5:') ? checksum.slice(4) : checksum;
}

/** A short form for messages: the algorithm and the first 12 hex digits. */
export function describeChecksum(checksum: Checksum): string {
  return `${algorithmOf(checksum) === 'md5' ? 'MD5' : 'SHA-256'} ${digestHex(checksum).slice(0, 12)}…`;
}
