import type { PauseConfig } from '../config/schema.js';
import { CommandPause } from './command.js';
import { NoPause } from './none.js';
import type { QuiesceStrategy } from './strategy.js';

/** Builds the pause strategy the config names. */
export async function createStrategy(config: PauseConfig): Promise<QuiesceStrategy> {
  switch (config.strategy) {
    case 'none':
      return new NoPause();
    case 'command':
      if (!config.command) throw new Error('pause.strategy is "command" but pause.command is not set');
      return new CommandPause(config.command);
    case 'kubernetes':
    case 'pachctl':
      throw new Error(`pause.strategy "${config.strategy}" is not available in this build; use "command" with kubectl or pachctl commands`);
  }
}
