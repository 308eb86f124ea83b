import { InvalidArgumentError, type Command } from 'commander';
import { resolveSecret } from '../config/secret.js';
import { openRepository } from '../engine/context.js';
import { EncryptionKeyError, KeyEncryptionKey, type RepositoryEncryption } from '../repository/encryption.js';
import type { Repository } from '../repository/repository.js';
import { table } from './render.js';
import { load, run, type GlobalOptions } from './runner.js';

/**
 * `pachbackup key list|add|remove`: manage the key-encryption keys of an encrypted repository.
 * Every command opens the repository with the key in repository.encryption.key, so only a holder
 * of a current key can add or remove one. The data is never re-encrypted (docs/repository-format.md,
 * "Key rotation").
 */
export function registerKeyCommands(program: Command, globals: () => GlobalOptions): void {
  const key = program.command('key').description("manage an encrypted repository's key-encryption keys (rotation)");

  key
    .command('list')
    .description('list the keys that unlock the repository')
    .action(async () => {
      await run(globals(), async ({ renderer }) => {
        const repo = await openEncrypted(globals());
        const encryption = repo.encryption!;
        const keys = encryption.wrappedKeys.map((k) => ({ kekId: k.kekId, kind: k.kdf ? 'passphrase' : 'key', addedAt: k.addedAt, inUse: k.kekId === repo.openedWithKekId }));
        renderer.result('key-list', { dataKeyId: encryption.keyId, keys }, () => keyListText(encryption, repo.openedWithKekId));
      }, { interrupt: 'exit' });
    });

  key
    .command('add')
    .description('let one more key unlock the repository (wraps the data key under it)')
    .option('--new-key-env <name>', 'environment variable holding the new key (64 hex digits, base64 of 32 bytes, or a passphrase of 16+ characters)')
    .option('--new-key-file <path>', 'file holding the new key')
    .action(async (opts: { newKeyEnv?: string; newKeyFile?: string }) => {
      await run(globals(), async ({ renderer }) => {
        if (Boolean(opts.newKeyEnv) === Boolean(opts.newKeyFile)) {
          throw new InvalidArgumentError('give the new key with exactly one of --new-key-env NAME or --new-key-file PATH');
        }
        const ref = opts.newKeyEnv ? { env: opts.newKeyEnv } : { file: opts.newKeyFile! };
        const flag = opts.newKeyEnv ? `--new-key-env ${opts.newKeyEnv}` : `--new-key-file ${opts.newKeyFile}`;
        const repo = await openEncrypted(globals());
        const kek = KeyEncryptionKey.fromSecret(resolveSecret(ref, flag), flag);
        const entry = await repo.addKey(kek);
        const configured = opts.newKeyEnv ? `{env: ${opts.newKeyEnv}}` : `{file: ${opts.newKeyFile}}`;
        renderer.result('key-add', { dataKeyId: repo.encryption!.keyId, kekId: entry.kekId, kind: entry.kdf ? 'passphrase' : 'key' }, () =>
          [
            `added key ${entry.kekId} (${entry.kdf ? 'passphrase' : 'key'} from ${kek.source}) to ${repo.rawStore.description}; the data key ${repo.encryption!.keyId} is unchanged`,
            'to retire the old key:',
            `  1. set repository.encryption.key: ${configured} in the config (and wherever backups run)`,
            '  2. check it: pachbackup key list',
            `  3. remove the old key: pachbackup key remove ${repo.openedWithKekId}`,
          ].join('\n'),
        );
      }, { interrupt: 'exit' });
    });

  key
    .command('remove <kekId>')
    .description('stop a key from unlocking the repository (it cannot be the key in repository.encryption.key)')
    .action(async (kekId: string) => {
      await run(globals(), async ({ renderer }) => {
        const repo = await openEncrypted(globals());
        await repo.removeKey(kekId);
        const left = repo.encryption!.wrappedKeys.map((k) => k.kekId);
        renderer.result('key-remove', { removed: kekId, remaining: left }, () =>
          [
            `removed key ${kekId} from ${repo.rawStore.description}; remaining: ${left.join(', ')}`,
            'a copy of pachbackup.json made before this still opens with the removed key: if that key leaked, see "Key rotation" in docs/repository-format.md',
          ].join('\n'),
        );
      }, { interrupt: 'exit' });
    });
}

async function openEncrypted(globals: GlobalOptions): Promise<Repository> {
  const config = load(globals, []);
  if (!config.repository.encryption) {
    throw new EncryptionKeyError('repository.encryption is not set: key commands manage an encrypted repository and open it with repository.encryption.key');
  }
  const repo = openRepository(config);
  await repo.open(false);
  return repo;
}

function keyListText(encryption: RepositoryEncryption, inUse: string | undefined): string {
  const rows = encryption.wrappedKeys.map((k) => [k.kekId, k.kdf ? 'passphrase (scrypt)' : '256-bit key', k.addedAt, k.kekId === inUse ? 'yes (repository.encryption.key)' : '']);
  return `data key ${encryption.keyId} (${encryption.algorithm}), unlocked by:\n${table(['KEK id', 'kind', 'added', 'in use'], rows)}`;
}
