import { InvalidArgumentError, type Command } from 'commander';
import { stringify } from 'yaml';
import { ConfigError } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { TOOL_VERSION } from '../version.js';
import { EXIT_USAGE, load, run, type GlobalOptions } from './runner.js';

/**
 * `pachbackup schedule --print`: the Kubernetes objects that run pachbackup in the cluster. A
 * CronJob runs the backup and, once it succeeded, prune; a second CronJob runs a weekly drill.
 * The ServiceAccount gets only the permissions the configured pause strategy (and Helm release
 * reading) needs; with `none`, `command` or `pachctl` it gets none and no API token is mounted.
 * docs/operations.md explains every choice made here.
 */

export interface ScheduleOptions {
  /** Prefix of every object's name. */
  name: string;
  /** Namespace of the CronJobs, ServiceAccount, ConfigMap and Secret. */
  namespace: string;
  /** Cron expression of the backup (and prune) job. */
  schedule: string;
  /** Cron expression of the drill job; null for no drill job. */
  drillSchedule: string | null;
  /** Arguments of `pachbackup prune` run after each successful backup; null for no prune. */
  pruneArgs: string[] | null;
  timeZone?: string;
  image: string;
  secretName: string;
}

export interface ScheduleManifests {
  documents: Array<Record<string, unknown>>;
  /** What the operator must know or do: config keys changed for the cluster, files to mount. */
  notes: string[];
  /** Keys the Secret must hold; each becomes an environment variable of the job's containers. */
  secretKeys: string[];
}

/** Where the job's containers find things. */
const CONFIG_DIR = '/etc/pachbackup/config';
const CONFIG_FILE = 'pachbackup.yaml';
const STATE_DIR = '/var/lib/pachbackup';
/** A non-root user; any image that runs pachbackup as a non-root user works. */
const RUN_AS = 65532;
/** Time a pod gets between SIGTERM and SIGKILL: enough for a backup to resume the cluster. */
const TERMINATION_GRACE_SECONDS = 300;

/** The RBAC rules the kubernetes pause strategy needs in the Pachyderm namespace (src/quiesce/kubernetes.ts). */
export const KUBERNETES_PAUSE_RULES = [
  { apiGroups: ['apps'], resources: ['deployments', 'deployments/scale'], verbs: ['get', 'list', 'patch'] },
  { apiGroups: [''], resources: ['replicationcontrollers', 'replicationcontrollers/scale'], verbs: ['get', 'list', 'patch'] },
  { apiGroups: [''], resources: ['pods'], verbs: ['list'] },
] as const;

/** Reading a Helm release's values: its `sh.helm.release.v1.*` Secrets. */
export const HELM_RELEASE_RULES = [{ apiGroups: [''], resources: ['secrets'], verbs: ['get', 'list'] }] as const;

/**
 * Whether the config reads the cluster's Helm values from its live release (issue 3, item 7): a
 * `helmRelease` section under `cluster` or `pause.kubernetes`. Read without the schema's types
 * so this stays right whichever of the two the config schema uses; returns the release's namespace.
 */
export function helmReleaseNamespace(config: Config): string | undefined {
  const asRecord = (v: unknown): Record<string, unknown> | undefined => (typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined);
  for (const holder of [asRecord(config.cluster), asRecord(config.pause.kubernetes)]) {
    const release = holder?.['helmRelease'];
    if (release === undefined || release === null || release === false) continue;
    const ns = asRecord(release)?.['namespace'];
    return typeof ns === 'string' && ns !== '' ? ns : (config.pause.kubernetes?.namespace ?? 'default');
  }
  return undefined;
}

export function scheduleManifests(config: Config, options: ScheduleOptions): ScheduleManifests {
  const notes: string[] = [];
  const { config: clusterConfig, secretKeys } = configForCluster(config, notes);
  const labels = { 'app.kubernetes.io/name': 'pachbackup', 'app.kubernetes.io/instance': options.name, 'app.kubernetes.io/managed-by': 'pachbackup-schedule' };
  const documents: Array<Record<string, unknown>> = [];

  // ---- RBAC: one Role per namespace the job must touch, with exactly the rules it needs there.
  const rulesByNamespace = new Map<string, Array<{ apiGroups: readonly string[]; resources: readonly string[]; verbs: readonly string[] }>>();
  const addRules = (namespace: string, rules: ReadonlyArray<{ apiGroups: readonly string[]; resources: readonly string[]; verbs: readonly string[] }>) => {
    rulesByNamespace.set(namespace, [...(rulesByNamespace.get(namespace) ?? []), ...rules]);
  };
  if (config.pause.strategy === 'kubernetes') addRules(config.pause.kubernetes?.namespace ?? 'default', KUBERNETES_PAUSE_RULES);
  const helmNamespace = helmReleaseNamespace(config);
  if (helmNamespace !== undefined) addRules(helmNamespace, HELM_RELEASE_RULES);
  const usesApi = rulesByNamespace.size > 0;

  documents.push({
    apiVersion: 'v1',
    kind: 'ServiceAccount',
    metadata: { name: options.name, namespace: options.namespace, labels },
    automountServiceAccountToken: usesApi,
  });
  for (const [namespace, rules] of rulesByNamespace) {
    documents.push({
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'Role',
      metadata: { name: options.name, namespace, labels },
      rules: rules.map((r) => ({ apiGroups: [...r.apiGroups], resources: [...r.resources], verbs: [...r.verbs] })),
    });
    documents.push({
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'RoleBinding',
      metadata: { name: options.name, namespace, labels },
      subjects: [{ kind: 'ServiceAccount', name: options.name, namespace: options.namespace }],
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: options.name },
    });
  }
  documents.push({
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: { name: `${options.name}-config`, namespace: options.namespace, labels },
    data: { [CONFIG_FILE]: stringify(clusterConfig, { lineWidth: 0, aliasDuplicateObjects: false }) },
  });

  const container = (name: string, args: string[]) => ({
    name,
    image: options.image,
    imagePullPolicy: 'IfNotPresent',
    command: ['pachbackup'],
    args: ['--config', `${CONFIG_DIR}/${CONFIG_FILE}`, ...args],
    env: [
      // The local copy of the pause ledger; the durable copy is in the repository.
      { name: 'PACHBACKUP_STATE_DIR', value: STATE_DIR },
      { name: 'HOME', value: '/tmp' },
    ],
    envFrom: [{ secretRef: { name: options.secretName } }],
    volumeMounts: [
      { name: 'config', mountPath: CONFIG_DIR, readOnly: true },
      { name: 'state', mountPath: STATE_DIR },
      { name: 'tmp', mountPath: '/tmp' },
    ],
    securityContext: { allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ['ALL'] } },
  });
  const podSpec = (apiToken: boolean, containers: { initContainers?: unknown[]; containers: unknown[] }) => ({
    serviceAccountName: options.name,
    automountServiceAccountToken: apiToken,
    restartPolicy: 'Never',
    // On SIGTERM (eviction, node drain) a backup resumes the cluster before it exits, trying again
    // after a failure (2 s, 5 s): 30 s, the default, can kill it in the middle of that.
    terminationGracePeriodSeconds: TERMINATION_GRACE_SECONDS,
    securityContext: { runAsNonRoot: true, runAsUser: RUN_AS, runAsGroup: RUN_AS, fsGroup: RUN_AS, seccompProfile: { type: 'RuntimeDefault' } },
    ...containers,
    volumes: [
      { name: 'config', configMap: { name: `${options.name}-config` } },
      { name: 'state', emptyDir: {} },
      { name: 'tmp', emptyDir: {} },
    ],
  });
  const cronJob = (component: string, schedule: string, spec: Record<string, unknown>) => {
    const componentLabels = { ...labels, 'app.kubernetes.io/component': component };
    return {
      apiVersion: 'batch/v1',
      kind: 'CronJob',
      metadata: { name: `${options.name}-${component}`, namespace: options.namespace, labels: componentLabels },
      spec: {
        schedule,
        ...(options.timeZone ? { timeZone: options.timeZone } : {}),
        // Never two runs at once: a second backup would only wait for the first one's lock.
        concurrencyPolicy: 'Forbid',
        startingDeadlineSeconds: 3600,
        successfulJobsHistoryLimit: 3,
        failedJobsHistoryLimit: 5,
        jobTemplate: {
          metadata: { labels: componentLabels },
          spec: {
            // A failed run is not retried at once: it may have paused the cluster; the next schedule retries.
            backoffLimit: 0,
            template: { metadata: { labels: componentLabels }, spec },
          },
        },
      },
    };
  };

  // Prune runs as the main container after the backup init container, so only after a successful backup.
  const backupContainer = container('backup', ['--yes', 'backup']);
  documents.push(
    cronJob(
      'backup',
      options.schedule,
      options.pruneArgs ? podSpec(usesApi, { initContainers: [backupContainer], containers: [container('prune', ['prune', ...options.pruneArgs])] }) : podSpec(usesApi, { containers: [backupContainer] }),
    ),
  );
  if (options.drillSchedule) {
    if (!config.drill.objectStore || !(config.drill.postgres ?? config.restore?.postgres)) {
      throw new ConfigError('a scheduled drill needs drill.objectStore and drill.postgres (or restore.postgres) in the config; set them, or pass --no-drill');
    }
    // A drill never touches the Pachyderm cluster, so its pod gets no API token.
    documents.push(cronJob('drill', options.drillSchedule, podSpec(false, { containers: [container('drill', ['drill', 'latest'])] })));
  }
  return { documents, notes, secretKeys };
}

/** The multi-document YAML, with the notes and the Secret's keys as a comment header. */
export function scheduleYaml(manifests: ScheduleManifests, options: ScheduleOptions): string {
  const header = [
    `# Generated by pachbackup ${TOOL_VERSION} (pachbackup schedule --print). Apply with: kubectl apply -f <this file>`,
    `# The Secret "${options.secretName}" in namespace "${options.namespace}" is referenced, not created here; every key becomes an environment variable.`,
    ...(manifests.secretKeys.length
      ? [
          `# It must hold: ${manifests.secretKeys.join(', ')}. For example:`,
          `#   kubectl -n ${options.namespace} create secret generic ${options.secretName} ${manifests.secretKeys.map((k) => `--from-literal=${k}=...`).join(' ')}`,
        ]
      : ['# The config references no secret; the Secret may be empty (it can hold AWS_* credentials for the default credential chain).']),
    ...manifests.notes.map((n) => `# NOTE: ${n}`),
  ];
  return `${header.join('\n')}\n${manifests.documents.map((d) => `---\n${stringify(d, { lineWidth: 0, aliasDuplicateObjects: false })}`).join('')}`;
}

/**
 * The config as the job sees it. Secret references all become environment variables (a `file`
 * reference is turned into one, since the Secret is mounted as env); paths that exist only on the
 * machine that ran this command are removed, each with a note.
 */
function configForCluster(config: Config, notes: string[]): { config: Record<string, unknown>; secretKeys: string[] } {
  const copy = JSON.parse(JSON.stringify(config)) as Record<string, unknown>;
  const secretKeys = new Set<string>();
  const walk = (node: unknown, path: string[]): void => {
    if (typeof node !== 'object' || node === null || Array.isArray(node)) return;
    const record = node as Record<string, unknown>;
    for (const [key, value] of Object.entries(record)) {
      const here = [...path, key];
      const ref = secretRefOf(value);
      if (ref?.kind === 'env') {
        secretKeys.add(ref.name);
      } else if (ref?.kind === 'file') {
        const env = `PACHBACKUP_${here.join('_').replace(/([a-z])([A-Z])/g, '$1_$2').toUpperCase()}`;
        record[key] = { env };
        secretKeys.add(env);
        notes.push(`${here.join('.')} read a file (${ref.name}) on this machine; in the cluster it reads the Secret key ${env}`);
      } else if (key === 'binDir' && typeof value === 'string') {
        delete record[key];
        notes.push(`${here.join('.')} (${value}) removed: the image's PostgreSQL client tools are used`);
      } else if ((key === 'sslrootcert' || key === 'caFile') && typeof value === 'string') {
        notes.push(`${here.join('.')} is ${value}: mount that CA file into the job's containers at the same path`);
      } else {
        walk(value, here);
      }
    }
  };
  walk(copy, []);
  const cluster = copy['cluster'] as Record<string, unknown>;
  if (typeof cluster['helmValues'] === 'string') {
    notes.push(`cluster.helmValues (${String(cluster['helmValues'])}) removed: a file on this machine; configure reading the Helm release from the cluster to keep the values with each backup`);
    delete cluster['helmValues'];
  }
  const restore = copy['restore'] as Record<string, unknown> | undefined;
  if (restore && 'helmValuesOut' in restore) delete restore['helmValuesOut'];
  const kubernetes = (copy['pause'] as Record<string, unknown>)['kubernetes'] as Record<string, unknown> | undefined;
  if (kubernetes) {
    for (const key of ['kubeconfig', 'context']) {
      if (key in kubernetes) {
        notes.push(`pause.kubernetes.${key} removed: in the cluster pachbackup uses its ServiceAccount`);
        delete kubernetes[key];
      }
    }
    if (config.pause.expectedContext) {
      notes.push(`pause.expectedContext is "${config.pause.expectedContext}": in the cluster the Kubernetes context is the in-cluster one; check that the guard still matches, or remove it`);
    }
  }
  return { config: copy, secretKeys: [...secretKeys].sort() };
}

function secretRefOf(value: unknown): { kind: 'env' | 'file'; name: string } | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const entries = Object.entries(value);
  if (entries.length !== 1) return undefined;
  const [kind, name] = entries[0]!;
  return (kind === 'env' || kind === 'file') && typeof name === 'string' ? { kind, name } : undefined;
}

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const CRON_MACRO = /^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$/;
const CRON_FIELD = /^[0-9A-Za-z*?,/-]+$/;

export function cronExpression(value: string): string {
  const trimmed = value.trim();
  if (CRON_MACRO.test(trimmed)) return trimmed;
  const fields = trimmed.split(/\s+/);
  if (fields.length !== 5 || !fields.every((f) => CRON_FIELD.test(f))) {
    throw new InvalidArgumentError('must be a cron expression of 5 fields (minute hour day-of-month month day-of-week), e.g. "0 2 * * *", or @daily/@weekly');
  }
  return fields.join(' ');
}

function dnsLabel(max: number) {
  return (value: string): string => {
    if (value.length > max || !DNS_LABEL.test(value)) throw new InvalidArgumentError(`must be a Kubernetes name: lower-case letters, digits and "-", at most ${max} characters`);
    return value;
  };
}

function secretName(value: string): string {
  if (value.length > 253 || !DNS_SUBDOMAIN.test(value)) throw new InvalidArgumentError('must be a Kubernetes Secret name: lower-case letters, digits, "-" and "."');
  return value;
}

interface ScheduleFlags {
  print: boolean;
  namespace?: string;
  name: string;
  schedule: string;
  drillSchedule: string;
  drill: boolean;
  pruneArgs: string;
  prune: boolean;
  timeZone?: string;
  image: string;
  secretName: string;
}

export function registerScheduleCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('schedule')
    .description('print Kubernetes objects that run pachbackup in the cluster: backup then prune, a weekly drill, least-privilege RBAC')
    .option('--print', 'print the YAML on stdout (pipe it to kubectl apply -f -)', false)
    .option('--namespace <ns>', 'namespace of the CronJobs, ServiceAccount, ConfigMap and Secret (default: pause.kubernetes.namespace, else "default")', dnsLabel(63))
    .option('--name <name>', 'name (prefix) of the objects', dnsLabel(45), 'pachbackup')
    .option('--schedule <cron>', 'when to back up (and prune)', cronExpression, '0 2 * * *')
    .option('--drill-schedule <cron>', 'when to run a restore drill of the latest backup', cronExpression, '0 4 * * 0')
    .option('--no-drill', 'no drill CronJob')
    .option('--prune-args <args>', 'arguments of the prune run after each successful backup', '--keep-daily 7 --keep-weekly 5 --keep-monthly 12')
    .option('--no-prune', 'do not prune after backups')
    .option('--time-zone <tz>', 'time zone of the schedules (CronJob spec.timeZone), e.g. Europe/Berlin; default: the controller\'s, usually UTC')
    .option('--image <image>', 'container image with pachbackup as "pachbackup" on PATH', `pachbackup:${TOOL_VERSION}`)
    .option('--secret-name <name>', 'Secret whose keys become the jobs\' environment (the config\'s {env: ...} references)', secretName, 'pachbackup')
    .action(async (opts: ScheduleFlags) => {
      await run(globals(), async ({ renderer }) => {
        if (!opts.print) {
          renderer.line('pachbackup schedule changes nothing in a cluster by itself: pass --print and apply the output, e.g. pachbackup schedule --print | kubectl apply -f -');
          return EXIT_USAGE;
        }
        const config = load(globals(), []);
        const options: ScheduleOptions = {
          name: opts.name,
          namespace: opts.namespace ?? config.pause.kubernetes?.namespace ?? 'default',
          schedule: opts.schedule,
          drillSchedule: opts.drill ? opts.drillSchedule : null,
          pruneArgs: opts.prune ? opts.pruneArgs.split(/\s+/).filter((a) => a !== '') : null,
          ...(opts.timeZone ? { timeZone: opts.timeZone } : {}),
          image: opts.image,
          secretName: opts.secretName,
        };
        const manifests = scheduleManifests(config, options);
        for (const note of manifests.notes) renderer.sink({ type: 'warning', message: note });
        renderer.result('schedule', { documents: manifests.documents, secretKeys: manifests.secretKeys, notes: manifests.notes }, () => scheduleYaml(manifests, options));
      });
    });
}
