/**
 * The `kubernetes` pause strategy: scales Deployment `pachd`, Deployment `pachw` and every worker
 * ReplicationController to 0 through the Kubernetes API, waits until none of their pods runs, and
 * later puts back exactly the replica counts it found.
 *
 * The original counts live in three places, so no crash can lose them: the PauseRecord (written to
 * the pause ledger before anything changes), and an annotation on each object
 * (`pachbackup.io/paused-replicas`), written before that object is scaled and removed only after it
 * has been scaled back. Resume reads the annotation first (the count found right before that object
 * was scaled) and the record as the fallback, and also restores any object carrying the annotation
 * that the record does not know (a worker RC that appeared during the pause, before the ledger was
 * rewritten). It only undoes its own scale-down: an object no longer at 0, or no longer annotated,
 * was scaled by someone else since and keeps its count.
 *
 * Order matters: the deployments go first and their pods must be gone before the worker RCs are
 * scaled, because a running pachd scales worker RCs itself and would undo the pause.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  ApiException,
  AppsV1Api,
  CoreV1Api,
  KubeConfig,
  PatchStrategy,
  setHeaderOptions,
  type V1Deployment,
  type V1LabelSelector,
  type V1ObjectMeta,
  type V1Pod,
  type V1ReplicationController,
} from '@kubernetes/client-node';
import { z } from 'zod';
import { assertExpectedContext, type PauseRecord, type QuiesceEvents, type QuiesceStrategy } from './strategy.js';

export const PAUSED_REPLICAS_ANNOTATION = 'pachbackup.io/paused-replicas';
export const PAUSED_AT_ANNOTATION = 'pachbackup.io/paused-at';

/** Which cluster to talk to: a kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster) and a context in it. */
export interface KubeTarget {
  kubeconfig?: string | undefined;
  context?: string | undefined;
}

export interface KubernetesPauseOptions extends KubeTarget {
  namespace: string;
  /** Deployment names; `pachd` (or else the first) must exist, the others may be absent. */
  deployments: string[];
  /** Label selector of the worker ReplicationControllers and of their pods. */
  workerSelector: string;
  /** Limit for the pause (scaling and waiting for pods to go); the resume gets this too, but at least 60 s. */
  timeoutSeconds: number;
  /** When set, nothing is changed unless the kube context is exactly this. */
  expectedContext?: string | undefined;
  /** How often pods and deployment status are polled; default 1000 ms. */
  pollIntervalMs?: number;
}

export class KubernetesError extends Error {
  override name = 'KubernetesError';
  constructor(
    message: string,
    /** The API server's HTTP status, when it answered. */
    readonly status?: number,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

type WorkloadKind = 'Deployment' | 'ReplicationController';

const workloadRecordSchema = z.object({
  kind: z.enum(['Deployment', 'ReplicationController']),
  name: z.string().min(1),
  /** The count found before pausing. Absent only in a damaged record: the annotation is used then. */
  replicas: z.number().int().min(0).optional(),
  /** A configured deployment that does not exist (e.g. `pachw` before Pachyderm 2.8). */
  absent: z.boolean().optional(),
});
type WorkloadRecord = z.infer<typeof workloadRecordSchema>;

/** `PauseRecord.state` of this strategy; parsed, not trusted, since it comes back from a ledger file. */
const kubernetesStateSchema = z.object({
  context: z.string().min(1),
  namespace: z.string().min(1),
  deployments: z.array(z.string().min(1)),
  workerSelector: z.string(),
  workloads: z.array(workloadRecordSchema),
});
export type KubernetesPauseState = z.infer<typeof kubernetesStateSchema>;

/** Loads the kubeconfig and selects the context, with errors that say which file and context. */
export function loadKubeConfig(target: KubeTarget): KubeConfig {
  const kc = new KubeConfig();
  const source = target.kubeconfig ?? 'the default kubeconfig ($KUBECONFIG or ~/.kube/config)';
  try {
    if (target.kubeconfig) kc.loadFromFile(target.kubeconfig);
    else kc.loadFromDefault();
  } catch (err) {
    // Only the first line: a YAML error goes on to quote the lines around the mistake, tokens and keys included.
    const reason = errorMessage(err).split('\n')[0]!.trim();
    throw new KubernetesError(`cannot load ${source}: ${reason}; check pause.kubernetes.kubeconfig`);
  }
  // Without any kubeconfig the client silently falls back to http://localhost:8080.
  if (!target.kubeconfig && kc.getCurrentContext() === 'loaded-context' && kc.getCurrentCluster()?.server === 'http://localhost:8080') {
    throw new KubernetesError('no kubeconfig found ($KUBECONFIG, ~/.kube/config, or an in-cluster service account); set pause.kubernetes.kubeconfig');
  }
  if (target.context) {
    if (!kc.getContextObject(target.context)) {
      const known = kc.getContexts().map((c) => c.name);
      throw new KubernetesError(`${source} has no context "${target.context}"${known.length ? `; it has: ${known.join(', ')}` : ''}; check pause.kubernetes.context`);
    }
    kc.setCurrentContext(target.context);
  }
  if (!kc.getCurrentContext()) throw new KubernetesError(`${source} has no current context; set pause.kubernetes.context`);
  if (!kc.getCurrentCluster()) throw new KubernetesError(`context "${kc.getCurrentContext()}" in ${source} names no cluster`);
  return kc;
}

/** The Kubernetes calls this strategy makes, with errors translated into sentences. */
class KubeApi {
  private readonly apps: AppsV1Api;
  private readonly core: CoreV1Api;
  readonly context: string;
  private readonly server: string;

  constructor(
    kc: KubeConfig,
    readonly namespace: string,
  ) {
    this.apps = kc.makeApiClient(AppsV1Api);
    this.core = kc.makeApiClient(CoreV1Api);
    this.context = kc.getCurrentContext();
    this.server = kc.getCurrentCluster()?.server ?? '(no server)';
  }

  describe(): string {
    return `kubernetes context ${this.context}, namespace ${this.namespace}`;
  }

  async readReplicas(kind: WorkloadKind, name: string): Promise<{ replicas: number; annotations: Record<string, string> } | undefined> {
    const object = await this.call<V1Deployment | V1ReplicationController>(`reading ${kindLabel(kind)} ${name}`, () =>
      kind === 'Deployment'
        ? this.apps.readNamespacedDeployment({ name, namespace: this.namespace })
        : this.core.readNamespacedReplicationController({ name, namespace: this.namespace }),
    ).catch((err: unknown) => {
      if (isNotFound(err)) return undefined;
      throw err;
    });
    if (!object) return undefined;
    // spec.replicas defaults to 1 on both kinds when omitted.
    return { replicas: object.spec?.replicas ?? 1, annotations: object.metadata?.annotations ?? {} };
  }

  async deploymentSelector(name: string): Promise<string | undefined> {
    const d = await this.readDeployment(name);
    return d?.spec?.selector ? labelSelectorString(d.spec.selector) : undefined;
  }

  async deploymentAvailability(name: string): Promise<{ desired: number; available: number; current: boolean } | undefined> {
    const d = await this.readDeployment(name);
    if (!d) return undefined;
    return {
      desired: d.spec?.replicas ?? 1,
      available: d.status?.availableReplicas ?? 0,
      // A status older than the spec still describes the previous replica count.
      current: (d.status?.observedGeneration ?? 0) >= (d.metadata?.generation ?? 0),
    };
  }

  private async readDeployment(name: string): Promise<V1Deployment | undefined> {
    return this.call(`reading deployment ${name}`, () => this.apps.readNamespacedDeployment({ name, namespace: this.namespace })).catch((err: unknown) => {
      if (isNotFound(err)) return undefined;
      throw err;
    });
  }

  async listWorkerControllers(selector: string): Promise<Array<{ name: string; replicas: number; annotations: Record<string, string> }>> {
    const list = await this.call(`listing replication controllers matching ${selector}`, () =>
      this.core.listNamespacedReplicationController({ namespace: this.namespace, labelSelector: selector }),
    );
    return list.items
      .map((rc) => ({ name: rc.metadata?.name ?? '', replicas: rc.spec?.replicas ?? 1, annotations: rc.metadata?.annotations ?? {} }))
      .filter((rc) => rc.name !== '')
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Merge-patches annotations; a null value removes the key (and removing a missing key is a no-op). */
  async annotate(kind: WorkloadKind, name: string, annotations: Record<string, string | null>): Promise<void> {
    const body = { metadata: { annotations } };
    const options = setHeaderOptions('Content-Type', PatchStrategy.MergePatch);
    await this.call<unknown>(`annotating ${kindLabel(kind)} ${name}`, () =>
      kind === 'Deployment'
        ? this.apps.patchNamespacedDeployment({ name, namespace: this.namespace, body }, options)
        : this.core.patchNamespacedReplicationController({ name, namespace: this.namespace, body }, options),
    );
  }

  /** Scales through the scale subresource, which needs only `patch` on `<kind>/scale`. */
  async scale(kind: WorkloadKind, name: string, replicas: number): Promise<void> {
    const body = { spec: { replicas } };
    const options = setHeaderOptions('Content-Type', PatchStrategy.MergePatch);
    await this.call<unknown>(`scaling ${kindLabel(kind)} ${name} to ${replicas}`, () =>
      kind === 'Deployment'
        ? this.apps.patchNamespacedDeploymentScale({ name, namespace: this.namespace, body }, options)
        : this.core.patchNamespacedReplicationControllerScale({ name, namespace: this.namespace, body }, options),
    );
  }

  async listPods(selector: string): Promise<V1Pod[]> {
    const list = await this.call(`listing pods matching ${selector}`, () => this.core.listNamespacedPod({ namespace: this.namespace, labelSelector: selector }));
    return list.items;
  }

  private async call<T>(what: string, request: () => Promise<T>): Promise<T> {
    try {
      return await request();
    } catch (err) {
      throw this.explain(err, what);
    }
  }

  private explain(err: unknown, what: string): Error {
    const where = `${what} in namespace ${this.namespace} (context ${this.context})`;
    if (err instanceof ApiException) {
      const code = (err as ApiException<unknown>).code;
      const detail = statusMessage((err as ApiException<unknown>).body);
      let hint = '';
      if (code === 401) hint = '; the API server rejected the credentials: refresh them in the kubeconfig';
      if (code === 403) {
        hint =
          '; pachbackup needs get, list and patch on deployments, deployments/scale, replicationcontrollers and replicationcontrollers/scale, and list on pods, in this namespace';
      }
      return new KubernetesError(`${where}: HTTP ${code}${detail ? ` ${detail}` : ''}${hint}`, code, { cause: err });
    }
    const code = (err as { code?: unknown }).code;
    if (typeof code === 'string' && /^(ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ETIMEDOUT|EHOSTUNREACH|ECONNRESET)$/.test(code)) {
      return new KubernetesError(`${where}: cannot reach the API server ${this.server} (${code}); check the kubeconfig and the network`, undefined, { cause: err });
    }
    return new KubernetesError(`${where}: ${errorMessage(err)}`, undefined, { cause: err });
  }
}

function isNotFound(err: unknown): boolean {
  return err instanceof KubernetesError && err.status === 404;
}

function statusMessage(body: unknown): string {
  let value: unknown = body;
  if (typeof body === 'string') {
    try {
      value = JSON.parse(body);
    } catch {
      return body.trim().slice(0, 300);
    }
  }
  if (typeof value === 'object' && value !== null && 'message' in value && typeof value.message === 'string') return value.message;
  return '';
}

function kindLabel(kind: WorkloadKind): string {
  return kind === 'Deployment' ? 'deployment' : 'replication controller';
}

/** A LabelSelector as the `labelSelector` query parameter spells it. */
export function labelSelectorString(selector: V1LabelSelector): string {
  const parts = Object.entries(selector.matchLabels ?? {}).map(([k, v]) => `${k}=${v}`);
  for (const e of selector.matchExpressions ?? []) {
    const values = (e.values ?? []).join(',');
    if (e.operator === 'In') parts.push(`${e.key} in (${values})`);
    else if (e.operator === 'NotIn') parts.push(`${e.key} notin (${values})`);
    else if (e.operator === 'Exists') parts.push(e.key);
    else if (e.operator === 'DoesNotExist') parts.push(`!${e.key}`);
  }
  return parts.join(',');
}

/** Pods whose containers may still run: Succeeded and Failed pods (e.g. evicted ones) linger but write nothing. */
function livePods(pods: V1Pod[]): V1Pod[] {
  return pods.filter((p) => p.status?.phase !== 'Succeeded' && p.status?.phase !== 'Failed');
}

function podLabel(pod: V1Pod): string {
  const meta: V1ObjectMeta | undefined = pod.metadata;
  return `${meta?.name ?? '?'}${meta?.deletionTimestamp ? ' (terminating)' : ''}`;
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function listShort(names: string[], max = 5): string {
  return names.length <= max ? names.join(', ') : `${names.slice(0, max).join(', ')} and ${names.length - max} more`;
}

export class KubernetesPause implements QuiesceStrategy {
  readonly name = 'kubernetes';
  readonly needsConfirmation = true;
  private kubeConfig: KubeConfig | undefined;

  constructor(private readonly options: KubernetesPauseOptions) {}

  async currentContext(): Promise<string | undefined> {
    return this.config().getCurrentContext();
  }

  async describeTarget(): Promise<string> {
    const api = this.api();
    const workloads = await this.inventory(api);
    return describeWorkloads(api.describe(), workloads);
  }

  /** Reads what is about to change; refuses a cluster that an earlier pachbackup run left paused. */
  async plan(): Promise<PauseRecord> {
    await assertExpectedContext(this, this.options.expectedContext);
    const api = this.api();
    const workloads = await this.inventory(api);
    const state: KubernetesPauseState = {
      context: api.context,
      namespace: api.namespace,
      deployments: [...this.options.deployments],
      workerSelector: this.options.workerSelector,
      workloads,
    };
    return { strategy: this.name, target: describeWorkloads(api.describe(), workloads), startedAt: new Date().toISOString(), state };
  }

  async pause(record: PauseRecord, events: QuiesceEvents, signal?: AbortSignal): Promise<PauseRecord> {
    await assertExpectedContext(this, this.options.expectedContext);
    const state = parseState(record);
    const api = this.api();
    if (api.context !== state.context || api.namespace !== state.namespace) {
      throw new KubernetesError(`the pause record is for context ${state.context}, namespace ${state.namespace}, but this strategy talks to ${api.describe()}; nothing was changed`);
    }
    const deadline = Date.now() + this.options.timeoutSeconds * 1000;
    const pausedAt = new Date().toISOString();
    const workloads: WorkloadRecord[] = [];

    // Every object is annotated with its count before any is scaled: the cluster itself then
    // holds the original counts even if the ledger is lost.
    for (const w of state.workloads) {
      signal?.throwIfAborted();
      if (w.absent) {
        workloads.push(w);
        continue;
      }
      const current = await api.readReplicas(w.kind, w.name);
      if (!current) {
        events.warn(`${kindLabel(w.kind)} ${w.name} disappeared since the plan; nothing to pause there`);
        continue;
      }
      if (w.replicas !== undefined && current.replicas !== w.replicas) {
        events.warn(`${kindLabel(w.kind)} ${w.name} changed from ${w.replicas} to ${current.replicas} replicas since the plan; ${current.replicas} will be restored`);
      }
      await api.annotate(w.kind, w.name, { [PAUSED_REPLICAS_ANNOTATION]: String(current.replicas), [PAUSED_AT_ANNOTATION]: pausedAt });
      workloads.push({ kind: w.kind, name: w.name, replicas: current.replicas });
    }
    const updated = (): PauseRecord => ({ ...record, target: describeWorkloads(api.describe(), workloads), state: { ...state, workloads: workloads.map((w) => ({ ...w })) } });

    const deployments = workloads.filter((x) => x.kind === 'Deployment' && !x.absent);
    const deploymentSelectors: string[] = [];
    for (const w of deployments) {
      // An empty selector would match every pod in the namespace, and the wait would never end.
      const selector = await api.deploymentSelector(w.name);
      if (!selector) throw new KubernetesError(`deployment ${w.name} has no pod selector; cannot tell when its pods are gone`);
      deploymentSelectors.push(selector);
    }
    for (const w of deployments) {
      signal?.throwIfAborted();
      await api.scale('Deployment', w.name, 0);
    }
    events.info(`scaled deployments ${listShort(deployments.map((x) => x.name))} to 0; waiting for their pods to stop`);
    await this.waitForNoPods(api, deploymentSelectors, deadline, events, signal);

    // pachd is gone now, so no new worker RC can appear and none is rescaled behind our back.
    const known = new Set(workloads.filter((x) => x.kind === 'ReplicationController').map((x) => x.name));
    for (const rc of await api.listWorkerControllers(state.workerSelector)) {
      if (known.has(rc.name)) continue;
      events.warn(`worker replication controller ${rc.name} appeared since the plan; pausing it too (${rc.replicas} replicas)`);
      await api.annotate('ReplicationController', rc.name, { [PAUSED_REPLICAS_ANNOTATION]: String(rc.replicas), [PAUSED_AT_ANNOTATION]: pausedAt });
      workloads.push({ kind: 'ReplicationController', name: rc.name, replicas: rc.replicas });
    }
    const controllers = workloads.filter((x) => x.kind === 'ReplicationController');
    for (const rc of controllers) {
      signal?.throwIfAborted();
      await api.scale('ReplicationController', rc.name, 0);
    }
    if (controllers.length > 0) events.info(`scaled ${controllers.length} worker replication controller(s) to 0; waiting for their pods to stop`);
    await this.waitForNoPods(api, [...deploymentSelectors, ...(state.workerSelector ? [state.workerSelector] : [])], deadline, events, signal);
    events.info(`paused: no pod of ${listShort(workloads.filter((x) => !x.absent).map((x) => x.name))} is running`);
    return updated();
  }

  /**
   * Puts back every recorded count (the annotation when the record lacks one), then every object
   * still annotated that the record does not name, removes the annotations, and waits until pachd
   * is available. One object failing does not stop the others; the errors are reported together.
   */
  async resume(record: PauseRecord, events: QuiesceEvents): Promise<void> {
    const state = parseState(record);
    // The record says which cluster was paused; that one is resumed, whatever the config says now.
    const api = new KubeApi(loadKubeConfig({ kubeconfig: this.options.kubeconfig, context: state.context }), state.namespace);
    const failures: string[] = [];
    const restored = new Set<string>();
    const restore = async (kind: WorkloadKind, name: string, recorded: number | undefined): Promise<void> => {
      try {
        const current = await api.readReplicas(kind, name);
        if (!current) {
          events.warn(`${kindLabel(kind)} ${name} no longer exists; nothing to restore there`);
          return;
        }
        const annotated = parseCount(current.annotations[PAUSED_REPLICAS_ANNOTATION]);
        // The annotation is the count found right before this object was scaled; the record may be
        // the plan's, read earlier (the pause threw before returning its own), so it is the fallback.
        const target = annotated ?? recorded;
        if (target === undefined) {
          failures.push(`${kindLabel(kind)} ${name}: neither the pause record nor the ${PAUSED_REPLICAS_ANNOTATION} annotation holds its replica count; scale it by hand`);
          return;
        }
        if (current.replicas !== target) {
          // Only our own scale-down is undone: an object still at 0 and still carrying our annotation.
          // Any other count was set since (by the operator, or by a pachd already running again after
          // a resume whose ledger was not cleared) and is kept.
          if (current.replicas === 0 && PAUSED_REPLICAS_ANNOTATION in current.annotations) {
            await api.scale(kind, name, target);
            events.info(`${kindLabel(kind)} ${name}: ${current.replicas} → ${target} replicas`);
          } else {
            events.warn(
              `${kindLabel(kind)} ${name} has ${current.replicas} replicas, not the ${target} recorded before the pause, and ${current.replicas === 0 ? 'no longer carries the ' + PAUSED_REPLICAS_ANNOTATION + ' annotation' : 'was scaled since'}; left as it is`,
            );
          }
        }
        if (PAUSED_REPLICAS_ANNOTATION in current.annotations || PAUSED_AT_ANNOTATION in current.annotations) {
          await api.annotate(kind, name, { [PAUSED_REPLICAS_ANNOTATION]: null, [PAUSED_AT_ANNOTATION]: null });
        }
        restored.add(`${kind}/${name}`);
      } catch (err) {
        failures.push(errorMessage(err));
      }
    };

    // Workers first, so a starting pachd finds its pipelines' controllers as they were.
    for (const w of state.workloads.filter((x) => x.kind === 'ReplicationController' && !x.absent)) await restore(w.kind, w.name, w.replicas);
    try {
      for (const rc of await api.listWorkerControllers(state.workerSelector)) {
        if (!restored.has(`ReplicationController/${rc.name}`) && PAUSED_REPLICAS_ANNOTATION in rc.annotations) {
          await restore('ReplicationController', rc.name, undefined);
        }
      }
    } catch (err) {
      failures.push(errorMessage(err));
    }
    for (const w of state.workloads.filter((x) => x.kind === 'Deployment' && !x.absent)) await restore(w.kind, w.name, w.replicas);
    for (const name of state.deployments) {
      if (restored.has(`Deployment/${name}`) || state.workloads.some((w) => w.kind === 'Deployment' && w.name === name && !w.absent)) continue;
      try {
        const current = await api.readReplicas('Deployment', name);
        if (current && PAUSED_REPLICAS_ANNOTATION in current.annotations) await restore('Deployment', name, undefined);
      } catch (err) {
        failures.push(errorMessage(err));
      }
    }
    if (failures.length > 0) throw new KubernetesError(`resume of ${api.describe()} incomplete: ${failures.join('; ')}`);

    const primary = primaryDeployment(state.deployments);
    if (primary && restored.has(`Deployment/${primary}`)) {
      await this.waitUntilAvailable(api, primary, Date.now() + this.resumeSeconds() * 1000, events);
    }
  }

  /** A short pause timeout bounds downtime; the resume must not give up as quickly, or the cluster stays down. */
  private resumeSeconds(): number {
    return Math.max(this.options.timeoutSeconds, 60);
  }

  private config(): KubeConfig {
    this.kubeConfig ??= loadKubeConfig(this.options);
    return this.kubeConfig;
  }

  private api(): KubeApi {
    return new KubeApi(this.config(), this.options.namespace);
  }

  private async inventory(api: KubeApi): Promise<WorkloadRecord[]> {
    const workloads: WorkloadRecord[] = [];
    const stillPaused: string[] = [];
    const noteStillPaused = (kind: WorkloadKind, name: string, replicas: number, annotations: Record<string, string>): void => {
      if (replicas === 0 && PAUSED_REPLICAS_ANNOTATION in annotations) {
        stillPaused.push(`${kindLabel(kind)} ${name} (paused at ${annotations[PAUSED_AT_ANNOTATION] ?? 'an unknown time'}, ${annotations[PAUSED_REPLICAS_ANNOTATION]} replicas before)`);
      }
    };
    for (const name of this.options.deployments) {
      const d = await api.readReplicas('Deployment', name);
      if (!d) {
        workloads.push({ kind: 'Deployment', name, absent: true });
        continue;
      }
      noteStillPaused('Deployment', name, d.replicas, d.annotations);
      workloads.push({ kind: 'Deployment', name, replicas: d.replicas });
    }
    const primary = primaryDeployment(this.options.deployments);
    if (primary && workloads.some((w) => w.name === primary && w.absent)) {
      throw new KubernetesError(
        `deployment ${primary} not found in ${api.describe()}: is Pachyderm installed in another namespace or cluster? Set pause.kubernetes.namespace and context; nothing was changed`,
      );
    }
    for (const rc of await api.listWorkerControllers(this.options.workerSelector)) {
      noteStillPaused('ReplicationController', rc.name, rc.replicas, rc.annotations);
      workloads.push({ kind: 'ReplicationController', name: rc.name, replicas: rc.replicas });
    }
    if (stillPaused.length > 0) {
      throw new KubernetesError(
        `${api.describe()} is still paused by an earlier pachbackup run: ${listShort(stillPaused, 3)}. Run "pachbackup resume" first (or scale back by hand and remove the ${PAUSED_REPLICAS_ANNOTATION} annotations); nothing was changed`,
      );
    }
    return workloads;
  }

  private async waitForNoPods(api: KubeApi, selectors: string[], deadline: number, events: QuiesceEvents, signal?: AbortSignal): Promise<void> {
    const interval = this.options.pollIntervalMs ?? 1000;
    let lastReport = '';
    let lastReportAt = 0;
    for (;;) {
      signal?.throwIfAborted();
      const byName = new Map<string, V1Pod>();
      for (const selector of selectors) for (const pod of livePods(await api.listPods(selector))) byName.set(pod.metadata?.name ?? '', pod);
      if (byName.size === 0) return;
      const labels = [...byName.values()].map(podLabel).sort();
      if (Date.now() >= deadline) {
        throw new KubernetesError(
          `${byName.size} pod(s) still running after ${this.options.timeoutSeconds}s (pause.kubernetes.timeoutSeconds): ${listShort(labels, 10)}; the cluster is being resumed`,
        );
      }
      const report = `waiting for ${byName.size} pod(s) to stop: ${listShort(labels)}`;
      if (report !== lastReport || Date.now() - lastReportAt > 10_000) {
        events.info(report);
        lastReport = report;
        lastReportAt = Date.now();
      }
      await sleep(Math.min(interval, Math.max(0, deadline - Date.now())), undefined, signal ? { signal } : {});
    }
  }

  private async waitUntilAvailable(api: KubeApi, name: string, deadline: number, events: QuiesceEvents): Promise<void> {
    const interval = this.options.pollIntervalMs ?? 1000;
    let lastReportAt = 0;
    for (;;) {
      const status = await api.deploymentAvailability(name);
      if (!status) throw new KubernetesError(`deployment ${name} disappeared while waiting for it to become available in ${api.describe()}`);
      if (status.current && status.available >= status.desired) {
        events.info(`deployment ${name} is available (${status.available}/${status.desired})`);
        return;
      }
      if (Date.now() >= deadline) {
        throw new KubernetesError(
          `replica counts were restored, but deployment ${name} is not available after ${this.resumeSeconds()}s (${status.available}/${status.desired} replicas available); check "kubectl -n ${api.namespace} get pods"`,
        );
      }
      if (Date.now() - lastReportAt > 5_000) {
        events.info(`waiting for deployment ${name} to become available (${status.available}/${status.desired})`);
        lastReportAt = Date.now();
      }
      await sleep(Math.min(interval, Math.max(0, deadline - Date.now())));
    }
  }
}

function primaryDeployment(deployments: string[]): string | undefined {
  return deployments.includes('pachd') ? 'pachd' : deployments[0];
}

function parseState(record: PauseRecord): KubernetesPauseState {
  const result = kubernetesStateSchema.safeParse(record.state);
  if (!result.success) {
    throw new KubernetesError(`the pause record is not a kubernetes pause record (${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')})`);
  }
  return result.data;
}

function parseCount(value: string | undefined): number | undefined {
  if (value === undefined || !/^\d+$/.test(value.trim())) return undefined;
  return Number(value.trim());
}

function describeWorkloads(where: string, workloads: WorkloadRecord[]): string {
  const deployments = workloads.filter((w) => w.kind === 'Deployment').map((w) => `${w.name} (${w.absent ? 'absent' : (w.replicas ?? '?')})`);
  const controllers = workloads.filter((w) => w.kind === 'ReplicationController');
  const workerReplicas = controllers.reduce((n, w) => n + (w.replicas ?? 0), 0);
  return `${where}: deployments ${deployments.join(', ') || 'none'}, ${controllers.length} worker RC${controllers.length === 1 ? '' : 's'} (${workerReplicas} replicas)`;
}
