import { pauseSchema, type PauseConfig } from '../config/schema.js';
import { CommandPause } from './command.js';
import { NoPause } from './none.js';
import { PachctlPause } from './pachctl.js';
import type { QuiesceStrategy } from './strategy.js';

export { assertExpectedContext } from './strategy.js';

/** Builds the pause strategy the config names. Nothing is contacted until the strategy is used. */
export async function createStrategy(config: PauseConfig): Promise<QuiesceStrategy> {
  switch (config.strategy) {
    case 'none':
      return new NoPause();
    case 'command':
      if (!config.command) throw new Error('pause.strategy is "command" but pause.command is not set');
      return new CommandPause(config.command);
    case 'kubernetes': {
      // An absent section means the schema's defaults, taken from the schema so they cannot drift.
      const k = config.kubernetes ?? pauseSchema.shape.kubernetes.unwrap().parse({});
      // Loaded only when used: the Kubernetes client costs every other command ~1 s of CPU and ~100 MiB at start.
      const { KubernetesPause } = await import('./kubernetes.js');
      return new KubernetesPause({ ...k, expectedContext: config.expectedContext });
    }
    case 'pachctl': {
      const p = config.pachctl ?? pauseSchema.shape.pachctl.unwrap().parse({});
      return new PachctlPause({ ...p, expectedContext: config.expectedContext });
    }
  }
}
