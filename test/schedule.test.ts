/**
 * `pachbackup schedule --print`: the emitted multi-document YAML parses, every document is a
 * well-formed Kubernetes object of the expected apiVersion and kind, the CronJobs run backup,
 * prune after it and a weekly drill, and RBAC grants exactly what each pause strategy needs.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { parse, parseAllDocuments, stringify } from 'yaml';
import { cronExpression, scheduleManifests, scheduleYaml, type ScheduleOptions } from '../src/cli/schedule.js';
import { validateConfig } from '../src/config/load.js';
import type { Config } from '../src/config/schema.js';

const MAIN = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

type Doc = Record<string, any>;

const baseConfig = {
  cluster: {
    postgres: { host: 'pg.example.internal', user: 'pachyderm', password: { env: 'PACHBACKUP_PG_PASSWORD' }, sslmode: 'require', binDir: '/usr/lib/postgresql/15/bin' },
    objectStore: { url: 's3://pachyderm-data', endpoint: 'https://s3.example.internal', accessKeyId: { env: 'SRC_KEY_ID' }, secretAccessKey: { file: '/home/ops/src-secret' } },
    helmValues: '/home/ops/values.yaml',
  },
  repository: { url: 's3://pachyderm-backups/prod', endpoint: 'https://s3.example.internal', accessKeyId: { env: 'REPO_KEY_ID' }, secretAccessKey: { env: 'REPO_SECRET' } },
  restore: { postgres: { host: 'pg-restore.example.internal', user: 'restorer', password: { env: 'RESTORE_PG_PASSWORD' } } },
  drill: { objectStore: { url: 's3://pachbackup-scratch', endpoint: 'https://s3.example.internal', accessKeyId: { env: 'REPO_KEY_ID' }, secretAccessKey: { env: 'REPO_SECRET' } } },
};

const PAUSE: Record<string, unknown> = {
  kubernetes: { strategy: 'kubernetes', kubernetes: { namespace: 'pachyderm', kubeconfig: '/home/ops/.kube/config', context: 'prod' } },
  pachctl: { strategy: 'pachctl', pachctl: { context: 'prod' } },
  command: { strategy: 'command', command: { pause: ['pause-it'], resume: ['resume-it'] } },
  none: { strategy: 'none' },
};

function configFor(strategy: string): Config {
  return validateConfig({ ...baseConfig, pause: PAUSE[strategy] }, `${strategy} config`);
}

const options: ScheduleOptions = {
  name: 'pachbackup',
  namespace: 'backups',
  schedule: '0 2 * * *',
  drillSchedule: '0 4 * * 0',
  pruneArgs: ['--keep-daily', '7', '--keep-weekly', '5'],
  image: 'registry.example.internal/pachbackup:1.0.0',
  secretName: 'pachbackup-secrets',
};

/** Parses the multi-document YAML strictly and checks the shape every Kubernetes object has. */
function parseManifests(text: string): Doc[] {
  const docs = parseAllDocuments(text, { uniqueKeys: true });
  assert.ok(Array.isArray(docs), 'multi-document YAML');
  const out: Doc[] = [];
  for (const doc of docs) {
    assert.deepEqual(doc.errors, [], 'no YAML errors');
    assert.deepEqual(doc.warnings, [], 'no YAML warnings');
    const obj = doc.toJS() as Doc;
    assert.equal(typeof obj.apiVersion, 'string');
    assert.equal(typeof obj.kind, 'string');
    assert.match(obj.metadata?.name, /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, 'metadata.name is a DNS label');
    assert.match(obj.metadata?.namespace, /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, 'metadata.namespace is set');
    out.push(obj);
  }
  return out;
}

function render(config: Config, opts: ScheduleOptions = options): Doc[] {
  const text = scheduleYaml(scheduleManifests(config, opts), opts);
  // Anchors and aliases are valid YAML but not every Kubernetes tool accepts them.
  assert.doesNotMatch(text, /(^|\s)[&*][a-z]\d+(\s|$)/m, 'no YAML anchors or aliases');
  return parseManifests(text);
}

const kinds = (docs: Doc[]) => docs.map((d) => `${d.apiVersion} ${d.kind}`);

const KUBERNETES_RULES = [
  { apiGroups: ['apps'], resources: ['deployments', 'deployments/scale'], verbs: ['get', 'list', 'patch'] },
  { apiGroups: [''], resources: ['replicationcontrollers', 'replicationcontrollers/scale'], verbs: ['get', 'list', 'patch'] },
  { apiGroups: [''], resources: ['pods'], verbs: ['list'] },
];

describe('schedule --print', () => {
  test('kubernetes strategy: the documents, and RBAC exactly for scaling in the Pachyderm namespace', () => {
    const docs = render(configFor('kubernetes'));
    assert.deepEqual(kinds(docs), [
      'v1 ServiceAccount',
      'rbac.authorization.k8s.io/v1 Role',
      'rbac.authorization.k8s.io/v1 RoleBinding',
      'v1 ConfigMap',
      'batch/v1 CronJob',
      'batch/v1 CronJob',
    ]);
    const [sa, role, binding] = docs as [Doc, Doc, Doc];
    assert.deepEqual(sa.metadata.namespace, 'backups');
    assert.equal(sa.automountServiceAccountToken, true);
    assert.equal(role.metadata.namespace, 'pachyderm', 'the Role lives where the workloads are');
    assert.deepEqual(role.rules, KUBERNETES_RULES);
    assert.equal(binding.metadata.namespace, 'pachyderm');
    assert.deepEqual(binding.subjects, [{ kind: 'ServiceAccount', name: 'pachbackup', namespace: 'backups' }]);
    assert.deepEqual(binding.roleRef, { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: role.metadata.name });
    const backup = docs.find((d) => d.kind === 'CronJob' && d.metadata.name === 'pachbackup-backup')!;
    assert.equal(backup.spec.jobTemplate.spec.template.spec.automountServiceAccountToken, true);
    const drill = docs.find((d) => d.kind === 'CronJob' && d.metadata.name === 'pachbackup-drill')!;
    assert.equal(drill.spec.jobTemplate.spec.template.spec.automountServiceAccountToken, false, 'a drill needs no API access');
  });

  for (const strategy of ['pachctl', 'command', 'none']) {
    test(`${strategy} strategy: no Role, no RoleBinding, no API token`, () => {
      const docs = render(configFor(strategy));
      assert.deepEqual(kinds(docs), ['v1 ServiceAccount', 'v1 ConfigMap', 'batch/v1 CronJob', 'batch/v1 CronJob']);
      assert.equal(docs[0]!.automountServiceAccountToken, false);
      for (const cron of docs.filter((d) => d.kind === 'CronJob')) assert.equal(cron.spec.jobTemplate.spec.template.spec.automountServiceAccountToken, false);
    });
  }

  test('reading the Helm release adds get/list on secrets, and only that, in the release namespace', () => {
    const withRelease = (config: Config, release: unknown): Config => ({ ...config, cluster: { ...config.cluster, helmRelease: release } }) as Config;
    const kube = render(withRelease(configFor('kubernetes'), { release: 'pachd' }));
    const role = kube.find((d) => d.kind === 'Role')!;
    assert.deepEqual(role.rules, [...KUBERNETES_RULES, { apiGroups: [''], resources: ['secrets'], verbs: ['get', 'list'] }]);
    const pachctl = render(withRelease(configFor('pachctl'), { release: 'pachd', namespace: 'pach-prod' }));
    const roles = pachctl.filter((d) => d.kind === 'Role');
    assert.equal(roles.length, 1);
    assert.equal(roles[0]!.metadata.namespace, 'pach-prod');
    assert.deepEqual(roles[0]!.rules, [{ apiGroups: [''], resources: ['secrets'], verbs: ['get', 'list'] }]);
    assert.equal(pachctl[0]!.automountServiceAccountToken, true);
  });

  test('CronJobs: batch/v1, Forbid, backup with --yes then prune, weekly drill of the latest backup', () => {
    const docs = render(configFor('kubernetes'));
    const backup = docs.find((d) => d.metadata.name === 'pachbackup-backup')!;
    assert.equal(backup.apiVersion, 'batch/v1');
    assert.equal(backup.spec.schedule, '0 2 * * *');
    assert.equal(backup.spec.concurrencyPolicy, 'Forbid');
    const pod = backup.spec.jobTemplate.spec.template.spec;
    assert.equal(pod.restartPolicy, 'Never');
    assert.ok(pod.terminationGracePeriodSeconds >= 120, 'an evicted backup has time to resume the cluster (with retries) before SIGKILL');
    assert.equal(pod.serviceAccountName, 'pachbackup');
    assert.equal(pod.initContainers.length, 1);
    const [backupContainer] = pod.initContainers;
    assert.deepEqual(backupContainer.args, ['--config', '/etc/pachbackup/config/pachbackup.yaml', '--yes', 'backup']);
    assert.equal(backupContainer.image, options.image);
    assert.deepEqual(backupContainer.envFrom, [{ secretRef: { name: 'pachbackup-secrets' } }]);
    assert.deepEqual(pod.containers.map((c: Doc) => c.args.slice(2)), [['prune', '--keep-daily', '7', '--keep-weekly', '5']]);
    assert.deepEqual(pod.volumes.find((v: Doc) => v.name === 'config'), { name: 'config', configMap: { name: 'pachbackup-config' } });
    const drill = docs.find((d) => d.metadata.name === 'pachbackup-drill')!;
    assert.equal(drill.spec.schedule, '0 4 * * 0');
    assert.equal(drill.spec.concurrencyPolicy, 'Forbid');
    assert.deepEqual(drill.spec.jobTemplate.spec.template.spec.containers.map((c: Doc) => c.args.slice(2)), [['drill', 'latest']]);
    for (const cron of [backup, drill]) {
      assert.deepEqual(cron.spec.jobTemplate.spec.template.metadata.labels, cron.metadata.labels);
      assert.equal(cron.spec.jobTemplate.spec.template.spec.securityContext.runAsNonRoot, true);
    }
  });

  test('--no-prune and --no-drill leave them out', () => {
    const docs = render(configFor('none'), { ...options, pruneArgs: null, drillSchedule: null });
    const crons = docs.filter((d) => d.kind === 'CronJob');
    assert.deepEqual(crons.map((c) => c.metadata.name), ['pachbackup-backup']);
    const pod = crons[0]!.spec.jobTemplate.spec.template.spec;
    assert.equal(pod.initContainers, undefined);
    assert.deepEqual(pod.containers.map((c: Doc) => c.args.slice(2)), [['--yes', 'backup']]);
  });

  test('the ConfigMap holds a valid config without secrets or machine-local paths; the Secret keys are listed', () => {
    const config = configFor('kubernetes');
    const manifests = scheduleManifests(config, options);
    const configMap = manifests.documents.find((d) => d.kind === 'ConfigMap') as Doc;
    const text: string = configMap.data['pachbackup.yaml'];
    const inCluster = validateConfig(parse(text), 'ConfigMap config');
    assert.deepEqual(inCluster.cluster.objectStore.secretAccessKey, { env: 'PACHBACKUP_CLUSTER_OBJECT_STORE_SECRET_ACCESS_KEY' });
    assert.equal(inCluster.cluster.postgres.binDir, undefined);
    assert.equal(inCluster.cluster.helmValues, undefined);
    assert.equal(inCluster.pause.kubernetes?.kubeconfig, undefined);
    assert.equal(inCluster.pause.kubernetes?.context, undefined);
    assert.equal(inCluster.pause.kubernetes?.namespace, 'pachyderm');
    assert.doesNotMatch(text, /\/home\/ops/);
    assert.deepEqual(manifests.secretKeys, [
      'PACHBACKUP_CLUSTER_OBJECT_STORE_SECRET_ACCESS_KEY',
      'PACHBACKUP_PG_PASSWORD',
      'REPO_KEY_ID',
      'REPO_SECRET',
      'RESTORE_PG_PASSWORD',
      'SRC_KEY_ID',
    ]);
    const yaml = scheduleYaml(manifests, options);
    assert.match(yaml, /kubectl -n backups create secret generic pachbackup-secrets --from-literal=PACHBACKUP_CLUSTER_OBJECT_STORE_SECRET_ACCESS_KEY=\.\.\./);
    assert.ok(manifests.notes.some((n) => n.includes('cluster.helmValues')));
    assert.ok(manifests.notes.some((n) => n.includes('pause.kubernetes.kubeconfig')));
  });

  test('a drill CronJob without drill targets in the config is refused', () => {
    const config = validateConfig({ ...baseConfig, drill: {}, pause: PAUSE.none }, 'no drill');
    assert.throws(() => scheduleManifests(config, options), /drill\.objectStore/);
    assert.doesNotThrow(() => scheduleManifests(config, { ...options, drillSchedule: null }));
  });

  test('cron expressions are checked', () => {
    assert.equal(cronExpression(' 0  2 * * * '), '0 2 * * *');
    assert.equal(cronExpression('@weekly'), '@weekly');
    assert.equal(cronExpression('*/15 1-5 * JAN,FEB MON-FRI'), '*/15 1-5 * JAN,FEB MON-FRI');
    assert.throws(() => cronExpression('0 2 * *'), /5 fields/);
    assert.throws(() => cronExpression('0 2 * * * *'), /5 fields/);
    assert.throws(() => cronExpression('0 2 * * $(reboot)'), /5 fields/);
  });

  describe('CLI', () => {
    let dir: string;
    let configFile: string;
    before(async () => {
      dir = await mkdtemp(join(tmpdir(), 'pachbackup-schedule-test-'));
      configFile = join(dir, 'pachbackup.yaml');
      await writeFile(configFile, stringify({ ...baseConfig, pause: PAUSE.kubernetes }));
    });
    after(async () => {
      await rm(dir, { recursive: true, force: true });
    });

    test('pachbackup schedule --print emits the YAML on stdout', () => {
      const r = spawnSync(process.execPath, [MAIN, '-c', configFile, 'schedule', '--print', '--namespace', 'ops', '--schedule', '30 1 * * *', '--image', 'example/pachbackup:2', '--secret-name', 'pb'], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      const docs = parseManifests(r.stdout);
      const backup = docs.find((d) => d.metadata.name === 'pachbackup-backup')!;
      assert.equal(backup.metadata.namespace, 'ops');
      assert.equal(backup.spec.schedule, '30 1 * * *');
      assert.equal(backup.spec.jobTemplate.spec.template.spec.initContainers[0].image, 'example/pachbackup:2');
      assert.deepEqual(backup.spec.jobTemplate.spec.template.spec.initContainers[0].envFrom, [{ secretRef: { name: 'pb' } }]);
      assert.match(r.stderr, /cluster\.helmValues/, 'notes are shown on stderr');
    });

    test('without --print it changes nothing and exits 2; a bad cron exits 2', () => {
      assert.equal(spawnSync(process.execPath, [MAIN, '-c', configFile, 'schedule'], { encoding: 'utf8' }).status, 2);
      const bad = spawnSync(process.execPath, [MAIN, '-c', configFile, 'schedule', '--print', '--schedule', 'daily'], { encoding: 'utf8' });
      assert.equal(bad.status, 2);
      assert.match(bad.stderr, /cron expression/);
    });
  });
});
