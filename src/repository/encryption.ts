/**
 * Encryption at rest of a backup repository (docs/repository-format.md, "Encryption").
 *
 * - Every file but `pachbackup.json` and `locks/` is stored as a PBE1 container: a 25-byte header
 *   (magic `PBE1`, format version, the data key's 8-byte id, a random 12-byte nonce base) and
 *   the plaintext cut into 64 KiB segments, each sealed with AES-256-GCM under the repository's
 *   data key. A segment's nonce is the nonce base XOR its index; its additional data is the
 *   header, its index, whether it is the last segment, and the file's path in the repository. So
 *   a flipped bit anywhere, a truncation (even at a segment boundary), reordered segments,
 *   segments spliced from another file, and a whole file moved to another path all fail to decrypt.
 * - The framing is fixed, so the ciphertext size is a function of the plaintext size and back:
 *   listings report plaintext sizes and everything above EncryptingStore works unchanged.
 * - The data key is random, made when the repository is created, and stored in `pachbackup.json`
 *   only wrapped (AES-256-GCM) by one or more key-encryption keys (KEKs) the user holds. Rotating
 *   a KEK rewraps the data key; the data itself is never re-encrypted.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, scrypt as scryptCallback, timingSafeEqual, type ScryptOptions } from 'node:crypto';
import { Readable, Transform, type TransformCallback } from 'node:stream';
import { z } from 'zod';
import type { Secret } from '../config/secret.js';
import { StoreError, type ObjectInfo, type ObjectStore, type PutOptions } from '../objectstore/store.js';

/** The config key that names the key-encryption key; every key error tells the user to set it. */
export const ENCRYPTION_CONFIG_KEY = 'repository.encryption.key';

/** Name of the scheme in `pachbackup.json`; a reader refuses a name it does not know. */
export const ENCRYPTION_ALGORITHM = 'pbe1-aes-256-gcm-64k';

const MAGIC = Buffer.from('PBE1', 'ascii');
const CONTAINER_VERSION = 1;
const KEY_ID_BYTES = 8;
const NONCE_BYTES = 12;
export const HEADER_BYTES = MAGIC.length + 1 + KEY_ID_BYTES + NONCE_BYTES;
export const SEGMENT_BYTES = 64 * 1024;
const TAG_BYTES = 16;
const SEALED_SEGMENT_BYTES = SEGMENT_BYTES + TAG_BYTES;

/** scrypt cost for passphrases: about 0.1 s and 32 MiB per try. Stored with each wrapped key. */
const SCRYPT_DEFAULTS = { n: 2 ** 15, r: 8, p: 1 } as const;
const MIN_PASSPHRASE_CHARS = 16;

/** A problem with the keys: none configured, a wrong one, a damaged key table. Not retryable. */
export class EncryptionKeyError extends Error {
  override name = 'EncryptionKeyError';
}

/** A stored file that does not decrypt: modified, truncated, reordered, misplaced or not encrypted. */
export class DecryptionError extends StoreError {
  constructor(message: string) {
    super(message, false);
    this.name = 'DecryptionError';
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

/** Stored size of a plaintext of `plaintextBytes`: header, then one tag per segment (an empty file has one empty segment). */
export function ciphertextSize(plaintextBytes: number): number {
  const segments = Math.max(1, Math.ceil(plaintextBytes / SEGMENT_BYTES));
  return HEADER_BYTES + plaintextBytes + segments * TAG_BYTES;
}

/**
 * Plaintext size of a stored file of `ciphertextBytes`, or undefined when no plaintext encrypts to
 * that size (a torn or damaged file). The inverse of ciphertextSize.
 */
export function plaintextSize(ciphertextBytes: number): number | undefined {
  const body = ciphertextBytes - HEADER_BYTES;
  if (!Number.isSafeInteger(ciphertextBytes) || body < TAG_BYTES) return undefined;
  const full = Math.floor(body / SEALED_SEGMENT_BYTES);
  const rest = body % SEALED_SEGMENT_BYTES;
  if (rest === 0) return full * SEGMENT_BYTES;
  // Only an empty file has an empty last segment; a short remainder cannot hold a tag.
  if (rest < TAG_BYTES || (rest === TAG_BYTES && full > 0)) return undefined;
  return full * SEGMENT_BYTES + rest - TAG_BYTES;
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

function fingerprint(domain: string, key: Buffer): string {
  return createHash('sha256').update(`pachbackup ${domain}\0`).update(key).digest().subarray(0, KEY_ID_BYTES).toString('hex');
}

/** The repository's data key. Only its id (a fingerprint) is ever printed or stored in the clear. */
export class DataKey {
  readonly #key: Buffer;
  /** 16 hex digits: the first 8 bytes of SHA-256 over a domain string and the key. */
  readonly id: string;

  constructor(key: Buffer) {
    if (key.length !== 32) throw new EncryptionKeyError(`a data key must be 32 bytes, got ${key.length}`);
    this.#key = Buffer.from(key);
    this.id = fingerprint('data key id', this.#key);
  }

  static generate(): DataKey {
    return new DataKey(randomBytes(32));
  }

  /** The key bytes, for the cipher calls in this module only. */
  bytes(): Buffer {
    return this.#key;
  }

  toJSON(): string {
    return `[data key ${this.id}]`;
  }

  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return `DataKey(${this.id})`;
  }
}

const scryptParamsSchema = z
  .object({
    algorithm: z.literal('scrypt'),
    /** base64, 16 random bytes */
    salt: z.string(),
    // Bounded, so a tampered pachbackup.json cannot make an open allocate gigabytes.
    n: z.number().int().min(2).max(2 ** 20),
    r: z.number().int().min(1).max(32),
    p: z.number().int().min(1).max(16),
  })
  .strict();
export type ScryptParams = z.infer<typeof scryptParamsSchema>;

/** The data key wrapped by one key-encryption key. */
export const wrappedKeySchema = z
  .object({
    /** Fingerprint of the (derived) KEK: which key unwraps this entry. */
    kekId: z.string().regex(/^[0-9a-f]{16}$/),
    /** Present when the KEK is a passphrase: how the wrapping key was derived from it. */
    kdf: scryptParamsSchema.optional(),
    /** base64, 12 bytes */
    nonce: z.string(),
    /** base64 of the AES-256-GCM ciphertext of the data key followed by its 16-byte tag */
    wrapped: z.string(),
    addedAt: z.string(),
  })
  .strict();
export type WrappedKey = z.infer<typeof wrappedKeySchema>;

/** The `encryption` section of `pachbackup.json`. */
export const repositoryEncryptionSchema = z
  .object({
    /** Checked when the repository is opened, so a newer scheme gives an upgrade message. */
    algorithm: z.string(),
    /** Id of the data key; every file's header names it too. */
    keyId: z.string().regex(/^[0-9a-f]{16}$/),
    wrappedKeys: z.array(wrappedKeySchema).min(1),
  })
  .strict();
export type RepositoryEncryption = z.infer<typeof repositoryEncryptionSchema>;

/**
 * A key-encryption key as configured in `repository.encryption.key`: 32 bytes given as 64 hex
 * digits or as base64, used as is; anything else is a passphrase (at least 16 characters),
 * stretched with scrypt and a random salt stored with the wrapped key.
 */
export class KeyEncryptionKey {
  readonly #material: Buffer;
  readonly kind: 'raw' | 'passphrase';

  private constructor(material: Buffer, kind: 'raw' | 'passphrase', readonly source: string, readonly configKey: string) {
    this.#material = material;
    this.kind = kind;
  }

  /** `configKey` names the config key the secret came from, for error messages. */
  static fromSecret(secret: Secret, configKey: string): KeyEncryptionKey {
    const text = secret.reveal().trim();
    if (/^[0-9a-fA-F]{64}$/.test(text)) return new KeyEncryptionKey(Buffer.from(text, 'hex'), 'raw', secret.source, configKey);
    if (/^[A-Za-z0-9+/_-]{43}=?$/.test(text)) {
      const bytes = Buffer.from(text.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
      if (bytes.length === 32) return new KeyEncryptionKey(bytes, 'raw', secret.source, configKey);
    }
    if ([...text].length < MIN_PASSPHRASE_CHARS) {
      throw new EncryptionKeyError(
        `${configKey} (${secret.source}) is neither a 32-byte key (64 hex digits or base64; e.g. openssl rand -hex 32) nor a passphrase of at least ${MIN_PASSPHRASE_CHARS} characters`,
      );
    }
    return new KeyEncryptionKey(Buffer.from(text, 'utf8'), 'passphrase', secret.source, configKey);
  }

  /** Where the key came from, for messages: `repository.encryption.key (env NAME)`. */
  get described(): string {
    return `${this.configKey} (${this.source})`;
  }

  /** The 32-byte wrapping key for an entry: the raw key, or the passphrase run through the entry's scrypt. */
  async wrappingKey(kdf: ScryptParams | undefined): Promise<Buffer | undefined> {
    if (this.kind === 'raw') return kdf ? undefined : this.#material;
    if (!kdf) return undefined;
    return scrypt(this.#material, Buffer.from(kdf.salt, 'base64'), { N: kdf.n, r: kdf.r, p: kdf.p });
  }

  /** Fresh KDF parameters for wrapping under this key (undefined for a raw key). */
  newKdf(): ScryptParams | undefined {
    return this.kind === 'raw' ? undefined : { algorithm: 'scrypt', salt: randomBytes(16).toString('base64'), ...SCRYPT_DEFAULTS };
  }

  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return `KeyEncryptionKey(${this.kind} from ${this.source})`;
  }
}

function scrypt(password: Buffer, salt: Buffer, options: ScryptOptions): Promise<Buffer> {
  const maxmem = 256 * (options.N ?? 1) * (options.r ?? 1) + 1024 * 1024;
  return new Promise((resolve, reject) => {
    scryptCallback(password, salt, 32, { ...options, maxmem }, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

export function kekIdOf(wrappingKey: Buffer): string {
  return fingerprint('key-encryption key id', wrappingKey);
}

function wrapAad(repositoryId: string, keyId: string, kekId: string): Buffer {
  return Buffer.from(`pachbackup wrapped data key v1\0${repositoryId}\0${keyId}\0${kekId}`, 'utf8');
}

/** Wraps the data key under `kek` for the repository `repositoryId`. */
export async function wrapDataKey(dataKey: DataKey, kek: KeyEncryptionKey, repositoryId: string, now = new Date()): Promise<WrappedKey> {
  const kdf = kek.newKdf();
  const wrappingKey = (await kek.wrappingKey(kdf))!;
  const kekId = kekIdOf(wrappingKey);
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', wrappingKey, nonce);
  cipher.setAAD(wrapAad(repositoryId, dataKey.id, kekId));
  const wrapped = Buffer.concat([cipher.update(dataKey.bytes()), cipher.final(), cipher.getAuthTag()]);
  return { kekId, ...(kdf ? { kdf } : {}), nonce: nonce.toString('base64'), wrapped: wrapped.toString('base64'), addedAt: now.toISOString() };
}

/** Which entry of the key table `kek` opens, if any (runs scrypt once per passphrase entry). */
export async function findWrappedKey(encryption: RepositoryEncryption, kek: KeyEncryptionKey): Promise<{ entry: WrappedKey; wrappingKey: Buffer } | undefined> {
  for (const entry of encryption.wrappedKeys) {
    const wrappingKey = await kek.wrappingKey(entry.kdf);
    if (wrappingKey && kekIdOf(wrappingKey) === entry.kekId) return { entry, wrappingKey };
  }
  return undefined;
}

/**
 * Unwraps the repository's data key with `kek`. `where` names the repository in messages. Throws
 * EncryptionKeyError naming the config key when `kek` is not one of the repository's keys.
 */
export async function unlockDataKey(encryption: RepositoryEncryption, kek: KeyEncryptionKey, repositoryId: string, where: string): Promise<{ dataKey: DataKey; kekId: string }> {
  if (encryption.algorithm !== ENCRYPTION_ALGORITHM) {
    throw new EncryptionKeyError(`${where} is encrypted with "${encryption.algorithm}"; this pachbackup knows only "${ENCRYPTION_ALGORITHM}": upgrade pachbackup`);
  }
  const found = await findWrappedKey(encryption, kek);
  if (!found) {
    const ids = encryption.wrappedKeys.map((k) => `${k.kekId}${k.kdf ? ' (passphrase)' : ''}`).join(', ');
    const mine = kek.kind === 'raw' ? `key with KEK id ${kekIdOf((await kek.wrappingKey(undefined))!)}` : 'passphrase';
    throw new EncryptionKeyError(
      `wrong encryption key: ${where} is encrypted, and the ${mine} from ${kek.described} is not one of its keys (KEK ids ${ids}); set ${kek.configKey} to a key that was added with "pachbackup key add"`,
    );
  }
  const { entry, wrappingKey } = found;
  const sealed = Buffer.from(entry.wrapped, 'base64');
  let key: Buffer;
  try {
    const decipher = createDecipheriv('aes-256-gcm', wrappingKey, Buffer.from(entry.nonce, 'base64'));
    decipher.setAAD(wrapAad(repositoryId, encryption.keyId, entry.kekId));
    decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
    key = Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES)), decipher.final()]);
  } catch {
    throw new EncryptionKeyError(`${where}: the data key wrapped for KEK id ${entry.kekId} fails authentication: the encryption section of pachbackup.json is damaged`);
  }
  const dataKey = new DataKey(key);
  if (dataKey.id !== encryption.keyId) {
    throw new EncryptionKeyError(`${where}: KEK id ${entry.kekId} unwraps data key ${dataKey.id}, but the repository names data key ${encryption.keyId}: pachbackup.json is damaged`);
  }
  return { dataKey, kekId: entry.kekId };
}

/** A new repository's encryption section: a fresh data key wrapped by `kek`. */
export async function newRepositoryEncryption(kek: KeyEncryptionKey, repositoryId: string): Promise<{ encryption: RepositoryEncryption; dataKey: DataKey }> {
  const dataKey = DataKey.generate();
  return { dataKey, encryption: { algorithm: ENCRYPTION_ALGORITHM, keyId: dataKey.id, wrappedKeys: [await wrapDataKey(dataKey, kek, repositoryId)] } };
}

// ---------------------------------------------------------------------------------------------
// The PBE1 container
// ---------------------------------------------------------------------------------------------

function segmentNonce(base: Buffer, index: number): Buffer {
  const nonce = Buffer.from(base);
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(index));
  for (let i = 0; i < 8; i++) nonce[NONCE_BYTES - 8 + i]! ^= counter[i]!;
  return nonce;
}

function segmentAad(header: Buffer, path: Buffer, index: number, final: boolean): Buffer {
  const aad = Buffer.alloc(header.length + 9 + path.length);
  header.copy(aad, 0);
  aad.writeBigUInt64BE(BigInt(index), header.length);
  aad[header.length + 8] = final ? 1 : 0;
  path.copy(aad, header.length + 9);
  return aad;
}

/** Seals the segments of one file. */
class SegmentSealer {
  readonly header: Buffer;
  readonly #key: Buffer;
  readonly #path: Buffer;
  readonly #nonceBase: Buffer;
  #next = 0;

  constructor(dataKey: DataKey, path: string) {
    this.#key = dataKey.bytes();
    this.#path = Buffer.from(path, 'utf8');
    this.#nonceBase = randomBytes(NONCE_BYTES);
    this.header = Buffer.concat([MAGIC, Buffer.from([CONTAINER_VERSION]), Buffer.from(dataKey.id, 'hex'), this.#nonceBase]);
  }

  seal(plaintext: Buffer, final: boolean): Buffer {
    const index = this.#next++;
    const cipher = createCipheriv('aes-256-gcm', this.#key, segmentNonce(this.#nonceBase, index));
    cipher.setAAD(segmentAad(this.header, this.#path, index, final));
    return Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
  }
}

/** Checks a file's header and opens its segments in order. */
class SegmentOpener {
  readonly #key: Buffer;
  readonly #path: Buffer;
  readonly #header: Buffer;
  readonly #nonceBase: Buffer;
  next = 0;

  constructor(dataKey: DataKey, readonly path: string, header: Buffer) {
    if (!header.subarray(0, MAGIC.length).equals(MAGIC)) {
      throw new DecryptionError(`${path} is not an encrypted pachbackup file (no PBE1 header): it was written without encryption, or its header is damaged`);
    }
    const version = header[MAGIC.length]!;
    if (version !== CONTAINER_VERSION) {
      throw new DecryptionError(`${path} has encryption container version ${version}; this pachbackup reads version ${CONTAINER_VERSION}: upgrade pachbackup, or the header is damaged`);
    }
    const keyId = header.subarray(MAGIC.length + 1, MAGIC.length + 1 + KEY_ID_BYTES);
    if (!timingSafeEqual(keyId, Buffer.from(dataKey.id, 'hex'))) {
      throw new DecryptionError(`${path} is encrypted with data key ${keyId.toString('hex')}, not this repository's data key ${dataKey.id}: it comes from another repository, or its header is damaged`);
    }
    this.#key = dataKey.bytes();
    this.#path = Buffer.from(path, 'utf8');
    this.#header = Buffer.from(header);
    this.#nonceBase = header.subarray(MAGIC.length + 1 + KEY_ID_BYTES);
  }

  /** The plaintext of the next segment, or undefined when it fails authentication as `final`. */
  tryOpen(sealed: Buffer, final: boolean, index = this.next): Buffer | undefined {
    if (sealed.length < TAG_BYTES) return undefined;
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.#key, segmentNonce(this.#nonceBase, index));
      decipher.setAAD(segmentAad(this.#header, this.#path, index, final));
      decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
      return Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES)), decipher.final()]);
    } catch {
      return undefined;
    }
  }

  open(sealed: Buffer, final: boolean): Buffer {
    const plaintext = this.tryOpen(sealed, final);
    if (plaintext) {
      this.next++;
      return plaintext;
    }
    const index = this.next;
    if (final && sealed.length === SEALED_SEGMENT_BYTES && this.tryOpen(sealed, false)) {
      throw new DecryptionError(`${this.path} is truncated: it ends after segment ${index}, which is not its last segment`);
    }
    if (final && sealed.length < TAG_BYTES) {
      throw new DecryptionError(`${this.path} is truncated: its last segment (${index}) has ${sealed.length} of at least ${TAG_BYTES} bytes`);
    }
    throw new DecryptionError(
      `${this.path}: segment ${index}${final ? ' (the last)' : ''} fails authentication: the stored bytes were modified, truncated or reordered, or come from another file`,
    );
  }
}

/** Encrypts a whole buffer (small files: manifests, indexes, the ledger). */
export function encryptBuffer(dataKey: DataKey, path: string, plaintext: Buffer): Buffer {
  const sealer = new SegmentSealer(dataKey, path);
  const parts = [sealer.header];
  let offset = 0;
  do {
    const end = Math.min(offset + SEGMENT_BYTES, plaintext.length);
    parts.push(sealer.seal(plaintext.subarray(offset, end), end === plaintext.length));
    offset = end;
  } while (offset < plaintext.length);
  return Buffer.concat(parts);
}

/** Decrypts a whole buffer; throws DecryptionError naming `path` and the problem. */
export function decryptBuffer(dataKey: DataKey, path: string, ciphertext: Buffer): Buffer {
  if (ciphertext.length < HEADER_BYTES) throw new DecryptionError(`${path} is truncated: ${ciphertext.length} bytes, shorter than the ${HEADER_BYTES}-byte encryption header`);
  const opener = new SegmentOpener(dataKey, path, ciphertext.subarray(0, HEADER_BYTES));
  const parts: Buffer[] = [];
  let offset = HEADER_BYTES;
  while (ciphertext.length - offset > SEALED_SEGMENT_BYTES) {
    parts.push(opener.open(ciphertext.subarray(offset, offset + SEALED_SEGMENT_BYTES), false));
    offset += SEALED_SEGMENT_BYTES;
  }
  parts.push(opener.open(ciphertext.subarray(offset), true));
  return Buffer.concat(parts);
}

/** A FIFO of bytes that takes exact lengths without copying everything on every write. */
class ByteQueue {
  #chunks: Buffer[] = [];
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.length += chunk.length;
  }

  take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const head = this.#chunks[0]!;
      const used = Math.min(head.length, n - filled);
      head.copy(out, filled, 0, used);
      filled += used;
      if (used === head.length) this.#chunks.shift();
      else this.#chunks[0] = head.subarray(used);
    }
    this.length -= n;
    return out;
  }
}

/** A stream that encrypts what is written to it into a PBE1 container for `path`. */
export function createEncryptStream(dataKey: DataKey, path: string): Transform {
  const sealer = new SegmentSealer(dataKey, path);
  const queue = new ByteQueue();
  let started = false;
  const start = (stream: Transform): void => {
    if (!started) stream.push(sealer.header);
    started = true;
  };
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      start(this);
      queue.push(chunk);
      // A segment is sealed only once more bytes follow it, so the last one is known to be last.
      while (queue.length > SEGMENT_BYTES) this.push(sealer.seal(queue.take(SEGMENT_BYTES), false));
      callback();
    },
    flush(callback: TransformCallback) {
      start(this);
      this.push(sealer.seal(queue.take(queue.length), true));
      callback();
    },
  });
}

/**
 * A stream that decrypts a PBE1 container for `path`. It passes on only authenticated
 * plaintext, and fails with a DecryptionError at the first segment that is not.
 */
export function createDecryptStream(dataKey: DataKey, path: string): Transform {
  const queue = new ByteQueue();
  let opener: SegmentOpener | undefined;
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      try {
        queue.push(chunk);
        if (!opener && queue.length >= HEADER_BYTES) opener = new SegmentOpener(dataKey, path, queue.take(HEADER_BYTES));
        if (opener) while (queue.length > SEALED_SEGMENT_BYTES) this.push(opener.open(queue.take(SEALED_SEGMENT_BYTES), false));
        callback();
      } catch (err) {
        callback(err as Error);
      }
    },
    flush(callback: TransformCallback) {
      try {
        if (!opener) throw new DecryptionError(`${path} is truncated: ${queue.length} bytes, shorter than the ${HEADER_BYTES}-byte encryption header`);
        this.push(opener.open(queue.take(queue.length), true));
        callback();
      } catch (err) {
        callback(err as Error);
      }
    },
  });
}

// ---------------------------------------------------------------------------------------------
// The store decorator
// ---------------------------------------------------------------------------------------------

/**
 * Encrypts every put and decrypts every get of the paths it covers, and reports plaintext sizes
 * in listings and stats, so callers see the repository as if it were plaintext. Paths for which
 * `isPlaintext` is true pass through unchanged.
 *
 * A stored file whose size no plaintext encrypts to (torn or damaged) is listed with size -1,
 * which never equals a recorded size, so size checks report it as damaged.
 */
export class EncryptingStore implements ObjectStore {
  readonly description: string;

  constructor(
    readonly inner: ObjectStore,
    private readonly dataKey: DataKey,
    private readonly isPlaintext: (key: string) => boolean,
  ) {
    this.description = `${inner.description} (encrypted, data key ${dataKey.id})`;
  }

  check(): Promise<void> {
    return this.inner.check();
  }

  async *list(prefix?: string): AsyncIterable<ObjectInfo> {
    for await (const info of this.inner.list(prefix)) yield this.plaintextInfo(info);
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const info = await this.inner.stat(key);
    return info && this.plaintextInfo(info);
  }

  async get(key: string, signal?: AbortSignal): Promise<Readable> {
    const body = await this.inner.get(key, signal);
    if (this.isPlaintext(key)) return body;
    const plaintext = createDecryptStream(this.dataKey, key);
    body.on('error', (err) => plaintext.destroy(err));
    // A reader that stops early, or a decryption failure, must still release the stored object.
    plaintext.on('close', () => {
      if (!body.destroyed) body.destroy();
    });
    return body.pipe(plaintext);
  }

  async put(key: string, body: Readable | Buffer, options: PutOptions = {}, signal?: AbortSignal): Promise<void> {
    if (this.isPlaintext(key)) return this.inner.put(key, body, options, signal);
    // The service would see ciphertext: it cannot check the plaintext's MD5 (md5CheckedPutLimit is absent).
    if (options.contentMd5 !== undefined) throw new StoreError(`writing ${key}: an encrypted repository cannot have the service check the plaintext's MD5`, false);
    const stored: PutOptions = {
      ...options,
      contentType: 'application/octet-stream',
      ...(options.size !== undefined ? { size: ciphertextSize(options.size) } : {}),
    };
    if (Buffer.isBuffer(body)) {
      const sealed = encryptBuffer(this.dataKey, key, body);
      return this.inner.put(key, sealed, { ...stored, size: sealed.length }, signal);
    }
    const sealed = createEncryptStream(this.dataKey, key);
    // A failing source fails the upload, so no partial object is stored.
    body.on('error', (err) => sealed.destroy(err));
    body.pipe(sealed);
    try {
      await this.inner.put(key, sealed, stored, signal);
    } catch (err) {
      body.unpipe(sealed);
      if (!body.destroyed) body.destroy();
      throw err;
    }
  }

  remove(keys: string[]): Promise<void> {
    return this.inner.remove(keys);
  }

  private plaintextInfo(info: ObjectInfo): ObjectInfo {
    if (this.isPlaintext(info.key)) return info;
    return { ...info, size: plaintextSize(info.size) ?? -1 };
  }
}
