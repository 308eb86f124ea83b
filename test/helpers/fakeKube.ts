/**
 * A protocol-level fake of the Kubernetes API server, for tests only: no API server can run in
 * this environment, so the official client (@kubernetes/client-node) is pointed at this HTTP
 * server through an ordinary kubeconfig and drives it exactly as it would drive a real cluster.
 *
 * It serves the REST paths the pause strategies and the Helm release reader use:
 * - apps/v1 deployments: list, get, patch, replace; the `scale` subresource: get, patch, replace
 * - v1 replicationcontrollers: list, get, patch, replace; `scale`: get, patch, replace
 * - v1 pods: list (labelSelector)
 * - v1 secrets: list (labelSelector), get
 * Patches: `application/merge-patch+json` (RFC 7386), `application/strategic-merge-patch+json`
 * (treated as a merge patch, which is what it is for the maps these tests patch), and
 * `application/json-patch+json` (RFC 6902 add, replace, remove, test). Label selectors: `k=v`,
 * `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
 *
 * A small controller stands in for kube-controller-manager: when a workload's replicas change,
 * missing pods are created (Running and ready after `podStartDelayMs`) and surplus pods get a
 * deletionTimestamp and disappear after `podTerminationDelayMs`, as terminating pods do.
 * `status.availableReplicas` counts ready pods not being deleted; `status.observedGeneration`
 * follows `metadata.generation` as soon as the controller has seen a change.
 *
 * Every request is recorded (method, path, query, content type, parsed body) so tests can assert
 * what the client did and in which order.
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { stringify } from 'yaml';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

export type WorkloadKind = 'Deployment' | 'ReplicationController';

export interface RecordedRequest {
  method: string;
  path: string;
  query: Record<string, string>;
  contentType: string | undefined;
  body: Json | undefined;
  status: number;
  /** Live pods (any namespace) when the request arrived. */
  livePodsBefore: number;
}

/** A write the client made, derived from the request log. */
export interface Mutation {
  kind: WorkloadKind;
  name: string;
  /** `annotate` for a patch of metadata.annotations, `scale` for a replica change. */
  op: 'annotate' | 'scale';
  /** For `scale`, the new replica count; for `annotate`, the patched annotations. */
  value: number | Record<string, Json>;
}

export interface FakeKubeOptions {
  /** Bearer token the kubeconfig carries and the server demands; random by default. */
  token?: string;
  podStartDelayMs?: number;
  podTerminationDelayMs?: number;
}

interface Workload {
  kind: WorkloadKind;
  namespace: string;
  metadata: JsonObject & { name: string; generation: number; annotations: Record<string, string>; labels: Record<string, string> };
  spec: { replicas: number; selector: Record<string, string> };
  podLabels: Record<string, string>;
  observedGeneration: number;
}

interface Pod {
  namespace: string;
  name: string;
  labels: Record<string, string>;
  owner: string;
  phase: 'Pending' | 'Running';
  ready: boolean;
  deletionTimestamp: string | undefined;
}

interface Secret {
  namespace: string;
  name: string;
  labels: Record<string, string>;
  type: string;
  /** Values base64-encoded, as the API serves them. */
  data: Record<string, string>;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly reason: string,
    message: string,
  ) {
    super(message);
  }
}

export class FakeKube {
  readonly requests: RecordedRequest[] = [];
  readonly token: string;
  private readonly workloads = new Map<string, Workload>();
  private readonly pods = new Map<string, Pod>();
  private readonly secrets = new Map<string, Secret>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private resourceVersion = 1000;
  private readonly faults: Array<{ matches: (method: string, path: string) => boolean; status: number; remaining: number }> = [];
  private readonly startDelay: number;
  private terminationDelay: number;

  private constructor(
    private readonly server: Server,
    readonly url: string,
    options: FakeKubeOptions,
  ) {
    this.token = options.token ?? randomBytes(12).toString('hex');
    this.startDelay = options.podStartDelayMs ?? 30;
    this.terminationDelay = options.podTerminationDelayMs ?? 150;
  }

  static async start(options: FakeKubeOptions = {}): Promise<FakeKube> {
    let fake: FakeKube | undefined;
    const server = createServer((req, res) => {
      if (fake) fake.handle(req, res);
      else res.destroy();
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', resolve);
    });
    const { port } = server.address() as AddressInfo;
    fake = new FakeKube(server, `http://127.0.0.1:${port}`, options);
    return fake;
  }

  async close(): Promise<void> {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /**
   * The next `times` requests that `matches` selects are answered with `status` (e.g. a 503 while
   * the API server's etcd elects a leader) instead of being served.
   */
  failRequests(matches: (method: string, path: string) => boolean, status = 503, times = 1): void {
    this.faults.push({ matches, status, remaining: times });
  }

  /** Changes how long pods take to stop from now on (e.g. to keep a pause waiting). */
  setPodTerminationDelay(ms: number): void {
    this.terminationDelay = ms;
  }

  // ---- seeding and inspection ---------------------------------------------------------------

  /** A Deployment whose pods are labelled `app=<name>, suite=pachyderm`, already running. */
  addDeployment(namespace: string, name: string, replicas: number, extraLabels: Record<string, string> = {}): void {
    const selector = { app: name, suite: 'pachyderm' };
    this.addWorkload('Deployment', namespace, name, replicas, selector, { ...selector, ...extraLabels }, { ...selector });
  }

  /** A worker ReplicationController as pachd creates it, already running. */
  addWorkerController(namespace: string, pipeline: string, replicas: number, version = 1): string {
    const name = `pipeline-default-${pipeline}-v${version}`;
    const labels = { app: 'pipeline', pipelineName: pipeline, pipelineProject: 'default', pipelineVersion: String(version), suite: 'pachyderm', component: 'worker' };
    this.addWorkload('ReplicationController', namespace, name, replicas, { app: 'pipeline', pipelineName: pipeline, pipelineProject: 'default', pipelineVersion: String(version) }, labels, labels);
    return name;
  }

  addSecret(namespace: string, name: string, labels: Record<string, string>, data: Record<string, Buffer | string>, type = 'Opaque'): void {
    const encoded = Object.fromEntries(Object.entries(data).map(([k, v]) => [k, Buffer.from(v).toString('base64')]));
    this.secrets.set(`${namespace}/${name}`, { namespace, name, labels, type, data: encoded });
  }

  replicas(kind: WorkloadKind, namespace: string, name: string): number | undefined {
    return this.workloads.get(key(kind, namespace, name))?.spec.replicas;
  }

  annotations(kind: WorkloadKind, namespace: string, name: string): Record<string, string> | undefined {
    const w = this.workloads.get(key(kind, namespace, name));
    return w ? { ...w.metadata.annotations } : undefined;
  }

  /** Pods that exist (running, starting or terminating), optionally only those of one namespace. */
  livePods(namespace?: string): string[] {
    return [...this.pods.values()].filter((p) => namespace === undefined || p.namespace === namespace).map((p) => p.name).sort();
  }

  /** Ready pods not being deleted, of one workload. */
  readyPods(kind: WorkloadKind, namespace: string, name: string): number {
    return [...this.pods.values()].filter((p) => p.owner === key(kind, namespace, name) && p.ready && !p.deletionTimestamp).length;
  }

  /** Scales a workload as another actor would (kubectl, pachd), bypassing the request log. */
  scaleOutOfBand(kind: WorkloadKind, namespace: string, name: string, replicas: number): void {
    const w = this.workloads.get(key(kind, namespace, name));
    if (!w) throw new Error(`no ${kind} ${namespace}/${name}`);
    this.setReplicas(w, replicas);
  }

  /** Writes, in request order, the annotation patches and replica changes the client made. */
  mutations(): Mutation[] {
    const out: Mutation[] = [];
    for (const r of this.requests) {
      if ((r.method !== 'PATCH' && r.method !== 'PUT') || r.status >= 300) continue;
      const route = parseRoute(r.path);
      if (!route || !route.name || route.resource === 'secrets' || route.resource === 'pods') continue;
      const kind: WorkloadKind = route.resource === 'deployments' ? 'Deployment' : 'ReplicationController';
      const body = r.body;
      if (r.contentType?.startsWith('application/json-patch+json') && Array.isArray(body)) {
        for (const op of body) {
          if (!isObject(op) || typeof op['path'] !== 'string') continue;
          if (op['path'].startsWith('/metadata/annotations')) out.push({ kind, name: route.name, op: 'annotate', value: { [op['path']]: op['value'] ?? null } });
          if (op['path'] === '/spec/replicas' && typeof op['value'] === 'number') out.push({ kind, name: route.name, op: 'scale', value: op['value'] });
        }
        continue;
      }
      if (!isObject(body)) continue;
      const meta = body['metadata'];
      if (isObject(meta) && isObject(meta['annotations'])) out.push({ kind, name: route.name, op: 'annotate', value: meta['annotations'] });
      const spec = body['spec'];
      if (isObject(spec) && typeof spec['replicas'] === 'number') out.push({ kind, name: route.name, op: 'scale', value: spec['replicas'] });
    }
    return out;
  }

  /**
   * Writes a kubeconfig for this server. Each context may point elsewhere (`server`), e.g. at a
   * port nothing listens on, to stand for another cluster.
   */
  async writeKubeconfig(file: string, contexts: Array<{ name: string; namespace?: string; server?: string }>, current: string): Promise<void> {
    const config = {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: contexts.map((c) => ({ name: `cluster-${c.name}`, cluster: { server: c.server ?? this.url, 'insecure-skip-tls-verify': true } })),
      users: [{ name: 'fake-user', user: { token: this.token } }],
      contexts: contexts.map((c) => ({ name: c.name, context: { cluster: `cluster-${c.name}`, user: 'fake-user', ...(c.namespace ? { namespace: c.namespace } : {}) } })),
      'current-context': current,
      preferences: {},
    };
    await writeFile(file, stringify(config), { mode: 0o600 });
  }

  // ---- the controller ------------------------------------------------------------------------

  private addWorkload(kind: WorkloadKind, namespace: string, name: string, replicas: number, selector: Record<string, string>, podLabels: Record<string, string>, labels: Record<string, string>): void {
    const w: Workload = {
      kind,
      namespace,
      metadata: {
        name,
        namespace,
        uid: randomBytes(8).toString('hex'),
        generation: 1,
        resourceVersion: String(++this.resourceVersion),
        annotations: {},
        labels,
        creationTimestamp: new Date().toISOString(),
      },
      spec: { replicas, selector },
      podLabels,
      observedGeneration: 1,
    };
    this.workloads.set(key(kind, namespace, name), w);
    for (let i = 0; i < replicas; i++) this.createPod(w, true);
  }

  private setReplicas(w: Workload, replicas: number): void {
    if (w.spec.replicas === replicas) return;
    w.spec.replicas = replicas;
    w.metadata.generation += 1;
    this.reconcile(w);
  }

  private reconcile(w: Workload): void {
    w.observedGeneration = w.metadata.generation;
    const owner = key(w.kind, w.namespace, w.metadata.name);
    const active = [...this.pods.values()].filter((p) => p.owner === owner && !p.deletionTimestamp);
    for (let i = active.length; i < w.spec.replicas; i++) this.createPod(w, false);
    for (const pod of active.slice(w.spec.replicas)) {
      pod.deletionTimestamp = new Date().toISOString();
      this.later(this.terminationDelay, () => this.pods.delete(`${pod.namespace}/${pod.name}`));
    }
  }

  private createPod(w: Workload, running: boolean): void {
    const suffix = randomBytes(3).toString('hex').slice(0, 5);
    const name = w.kind === 'Deployment' ? `${w.metadata.name}-7d4b9c-${suffix}` : `${w.metadata.name}-${suffix}`;
    const pod: Pod = {
      namespace: w.namespace,
      name,
      labels: { ...w.podLabels },
      owner: key(w.kind, w.namespace, w.metadata.name),
      phase: running ? 'Running' : 'Pending',
      ready: running,
      deletionTimestamp: undefined,
    };
    this.pods.set(`${pod.namespace}/${pod.name}`, pod);
    if (!running) {
      this.later(this.startDelay, () => {
        pod.phase = 'Running';
        pod.ready = true;
      });
    }
  }

  private later(ms: number, fn: () => void): void {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
  }

  // ---- HTTP ----------------------------------------------------------------------------------

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const url = new URL(req.url ?? '/', this.url);
      const contentType = req.headers['content-type'];
      const raw = Buffer.concat(chunks).toString('utf8');
      const record: RecordedRequest = {
        method: req.method ?? 'GET',
        path: url.pathname,
        query: Object.fromEntries(url.searchParams),
        contentType,
        body: undefined,
        status: 0,
        livePodsBefore: this.pods.size,
      };
      this.requests.push(record);
      let status = 200;
      let payload: Json;
      try {
        if (req.headers.authorization !== `Bearer ${this.token}`) throw new HttpError(401, 'Unauthorized', 'Unauthorized');
        const fault = this.faults.find((f) => f.remaining > 0 && f.matches(record.method, url.pathname));
        if (fault) {
          fault.remaining--;
          throw new HttpError(fault.status, fault.status === 503 ? 'ServiceUnavailable' : 'InternalError', `injected fault: HTTP ${fault.status}`);
        }
        if (raw !== '') {
          try {
            record.body = JSON.parse(raw) as Json;
          } catch {
            throw new HttpError(400, 'BadRequest', 'the request body is not JSON');
          }
        }
        payload = this.route(record.method, url, contentType, record.body);
      } catch (err) {
        const e = err instanceof HttpError ? err : new HttpError(500, 'InternalError', String(err));
        status = e.status;
        payload = { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message: e.message, reason: e.reason, code: e.status };
      }
      record.status = status;
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(payload));
    });
  }

  private route(method: string, url: URL, contentType: string | undefined, body: Json | undefined): Json {
    const route = parseRoute(url.pathname);
    if (!route) throw new HttpError(404, 'NotFound', `the server could not find the requested resource (${url.pathname})`);
    const selector = url.searchParams.get('labelSelector');
    const matches = selector ? parseSelector(selector) : () => true;

    if (route.resource === 'pods') {
      if (method !== 'GET' || route.name) throw new HttpError(405, 'MethodNotAllowed', `${method} not supported on pods here`);
      const items = [...this.pods.values()].filter((p) => p.namespace === route.namespace && matches(p.labels)).sort((a, b) => a.name.localeCompare(b.name));
      return { kind: 'PodList', apiVersion: 'v1', metadata: { resourceVersion: this.rv() }, items: items.map((p) => podJson(p)) };
    }

    if (route.resource === 'secrets') {
      if (method !== 'GET') throw new HttpError(405, 'MethodNotAllowed', `${method} not supported on secrets here`);
      if (route.name) {
        const s = this.secrets.get(`${route.namespace}/${route.name}`);
        if (!s) throw new HttpError(404, 'NotFound', `secrets "${route.name}" not found`);
        return secretJson(s);
      }
      const items = [...this.secrets.values()].filter((s) => s.namespace === route.namespace && matches(s.labels));
      return { kind: 'SecretList', apiVersion: 'v1', metadata: { resourceVersion: this.rv() }, items: items.map(secretJson) };
    }

    const kind: WorkloadKind = route.resource === 'deployments' ? 'Deployment' : 'ReplicationController';
    const plural = route.resource;
    if (!route.name) {
      if (method !== 'GET') throw new HttpError(405, 'MethodNotAllowed', `${method} not supported on a ${plural} collection here`);
      const items = [...this.workloads.values()].filter((w) => w.kind === kind && w.namespace === route.namespace && matches(w.metadata.labels));
      return { kind: `${kind}List`, apiVersion: apiVersion(kind), metadata: { resourceVersion: this.rv() }, items: items.map((w) => this.workloadJson(w)) };
    }
    const w = this.workloads.get(key(kind, route.namespace, route.name));
    if (!w) throw new HttpError(404, 'NotFound', `${plural}.${kind === 'Deployment' ? 'apps' : ''} "${route.name}" not found`.replace('. "', ' "'));

    const current = route.scale ? this.scaleJson(w) : this.workloadJson(w);
    if (method === 'GET') return current;
    let next: Json;
    if (method === 'PATCH') next = applyPatch(current, body, contentType);
    else if (method === 'PUT') {
      if (!isObject(body)) throw new HttpError(400, 'BadRequest', 'PUT needs an object');
      const meta = body['metadata'];
      if (isObject(meta) && typeof meta['resourceVersion'] === 'string' && meta['resourceVersion'] !== String(w.metadata['resourceVersion'])) {
        throw new HttpError(409, 'Conflict', `Operation cannot be fulfilled on ${plural} "${route.name}": the object has been modified; please apply your changes to the latest version and try again`);
      }
      next = body;
    } else throw new HttpError(405, 'MethodNotAllowed', `${method} not supported here`);
    this.apply(w, next, route.scale);
    return route.scale ? this.scaleJson(w) : this.workloadJson(w);
  }

  /** Takes the fields a client may change (replicas, annotations, labels) from the patched object. */
  private apply(w: Workload, next: Json, scale: boolean): void {
    if (!isObject(next)) throw new HttpError(422, 'Invalid', 'the patched object is not an object');
    const spec = next['spec'];
    const replicas = isObject(spec) ? spec['replicas'] : undefined;
    if (replicas !== undefined && (typeof replicas !== 'number' || !Number.isInteger(replicas) || replicas < 0)) {
      throw new HttpError(422, 'Invalid', `spec.replicas: Invalid value: ${JSON.stringify(replicas)}: must be greater than or equal to 0`);
    }
    if (!scale) {
      const meta = next['metadata'];
      if (isObject(meta)) {
        const annotations = meta['annotations'];
        w.metadata.annotations = isObject(annotations) ? stringMap(annotations, 'metadata.annotations') : {};
        const labels = meta['labels'];
        if (isObject(labels)) w.metadata.labels = stringMap(labels, 'metadata.labels');
      }
    }
    this.rvBump(w);
    if (typeof replicas === 'number') this.setReplicas(w, replicas);
  }

  private rv(): string {
    return String(this.resourceVersion);
  }

  private rvBump(w: Workload): void {
    this.resourceVersion += 1;
    w.metadata['resourceVersion'] = String(this.resourceVersion);
  }

  private workloadJson(w: Workload): JsonObject {
    const owner = key(w.kind, w.namespace, w.metadata.name);
    const pods = [...this.pods.values()].filter((p) => p.owner === owner);
    const active = pods.filter((p) => !p.deletionTimestamp);
    const ready = active.filter((p) => p.ready).length;
    const metadata: JsonObject = { ...w.metadata, annotations: { ...w.metadata.annotations }, labels: { ...w.metadata.labels } };
    if (w.kind === 'Deployment') {
      return {
        apiVersion: 'apps/v1',
        kind: 'Deployment',
        metadata,
        spec: {
          replicas: w.spec.replicas,
          selector: { matchLabels: { ...w.spec.selector } },
          template: { metadata: { labels: { ...w.podLabels } }, spec: { containers: [{ name: w.metadata.name, image: `pachyderm/${w.metadata.name}:2.11.6` }] } },
        },
        status: { observedGeneration: w.observedGeneration, replicas: active.length, readyReplicas: ready, availableReplicas: ready, updatedReplicas: active.length },
      };
    }
    return {
      apiVersion: 'v1',
      kind: 'ReplicationController',
      metadata,
      spec: {
        replicas: w.spec.replicas,
        selector: { ...w.spec.selector },
        template: { metadata: { labels: { ...w.podLabels } }, spec: { containers: [{ name: 'user', image: 'ubuntu:22.04' }] } },
      },
      status: { observedGeneration: w.observedGeneration, replicas: active.length, readyReplicas: ready, availableReplicas: ready },
    };
  }

  private scaleJson(w: Workload): JsonObject {
    const owner = key(w.kind, w.namespace, w.metadata.name);
    const active = [...this.pods.values()].filter((p) => p.owner === owner && !p.deletionTimestamp).length;
    const selector = Object.entries(w.spec.selector).map(([k, v]) => `${k}=${v}`).join(',');
    return {
      apiVersion: 'autoscaling/v1',
      kind: 'Scale',
      metadata: { name: w.metadata.name, namespace: w.namespace, uid: w.metadata['uid'] ?? null, resourceVersion: w.metadata['resourceVersion'] ?? null },
      spec: { replicas: w.spec.replicas },
      status: { replicas: active, selector },
    };
  }
}

// ---- pure helpers ------------------------------------------------------------------------------

function key(kind: WorkloadKind, namespace: string, name: string): string {
  return `${kind}/${namespace}/${name}`;
}

function apiVersion(kind: WorkloadKind): string {
  return kind === 'Deployment' ? 'apps/v1' : 'v1';
}

interface Route {
  resource: 'deployments' | 'replicationcontrollers' | 'pods' | 'secrets';
  namespace: string;
  name: string | undefined;
  scale: boolean;
}

function parseRoute(path: string): Route | undefined {
  const m =
    /^\/apis\/apps\/v1\/namespaces\/([^/]+)\/(deployments)(?:\/([^/]+)(\/scale)?)?$/.exec(path) ??
    /^\/api\/v1\/namespaces\/([^/]+)\/(replicationcontrollers)(?:\/([^/]+)(\/scale)?)?$/.exec(path) ??
    /^\/api\/v1\/namespaces\/([^/]+)\/(pods|secrets)(?:\/([^/]+))?()$/.exec(path);
  if (!m) return undefined;
  return {
    namespace: decodeURIComponent(m[1]!),
    resource: m[2] as Route['resource'],
    name: m[3] === undefined ? undefined : decodeURIComponent(m[3]),
    scale: Boolean(m[4]),
  };
}

function podJson(p: Pod): JsonObject {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name: p.name, namespace: p.namespace, labels: { ...p.labels }, ...(p.deletionTimestamp ? { deletionTimestamp: p.deletionTimestamp } : {}) },
    spec: { containers: [{ name: 'main', image: 'fake' }] },
    status: { phase: p.phase, conditions: [{ type: 'Ready', status: p.ready ? 'True' : 'False' }] },
  };
}

function secretJson(s: Secret): JsonObject {
  return { apiVersion: 'v1', kind: 'Secret', metadata: { name: s.name, namespace: s.namespace, labels: { ...s.labels } }, type: s.type, data: { ...s.data } };
}

function isObject(value: Json | undefined): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function stringMap(value: JsonObject, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(value)) {
    if (typeof v !== 'string') throw new HttpError(422, 'Invalid', `${what}.${k}: Invalid value: must be a string`);
    out[k] = v;
  }
  return out;
}

function applyPatch(target: Json, patch: Json | undefined, contentType: string | undefined): Json {
  const type = (contentType ?? '').split(';')[0]!.trim();
  if (patch === undefined) throw new HttpError(400, 'BadRequest', 'empty patch');
  if (type === 'application/merge-patch+json' || type === 'application/strategic-merge-patch+json') return mergePatch(target, patch);
  if (type === 'application/json-patch+json') return jsonPatch(target, patch);
  throw new HttpError(415, 'UnsupportedMediaType', `the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got ${type || 'none'})`);
}

/** RFC 7386: objects merge recursively, null deletes, anything else replaces. */
function mergePatch(target: Json, patch: Json): Json {
  if (!isObject(patch)) return patch;
  const out: JsonObject = isObject(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k] ?? null, v);
  }
  return out;
}

/** RFC 6902, the operations clients use for these objects: add, replace, remove, test. */
function jsonPatch(target: Json, patch: Json): Json {
  if (!Array.isArray(patch)) throw new HttpError(400, 'BadRequest', 'a JSON patch must be an array of operations');
  let doc: Json = structuredClone(target);
  for (const op of patch) {
    if (!isObject(op) || typeof op['op'] !== 'string' || typeof op['path'] !== 'string') throw new HttpError(400, 'BadRequest', 'malformed JSON patch operation');
    const tokens = op['path'].split('/').slice(1).map((t) => t.replace(/~1/g, '/').replace(/~0/g, '~'));
    const last = tokens.pop();
    if (last === undefined) {
      if (op['op'] === 'replace' || op['op'] === 'add') doc = op['value'] ?? null;
      continue;
    }
    let parent: Json = doc;
    for (const t of tokens) {
      if (!isObject(parent) || !(t in parent)) {
        if (op['op'] === 'add' && isObject(parent)) {
          parent[t] = {};
        } else throw new HttpError(422, 'Invalid', `JSON patch path ${op['path']} does not exist`);
      }
      parent = (parent as JsonObject)[t]!;
    }
    if (!isObject(parent)) throw new HttpError(422, 'Invalid', `JSON patch path ${op['path']} is not inside an object`);
    switch (op['op']) {
      case 'add':
        parent[last] = op['value'] ?? null;
        break;
      case 'replace':
        if (!(last in parent)) throw new HttpError(422, 'Invalid', `JSON patch replace: ${op['path']} does not exist`);
        parent[last] = op['value'] ?? null;
        break;
      case 'remove':
        if (!(last in parent)) throw new HttpError(422, 'Invalid', `JSON patch remove: ${op['path']} does not exist`);
        delete parent[last];
        break;
      case 'test':
        if (JSON.stringify(parent[last]) !== JSON.stringify(op['value'])) throw new HttpError(422, 'Invalid', `JSON patch test failed at ${op['path']}`);
        break;
      default:
        throw new HttpError(400, 'BadRequest', `JSON patch operation ${op['op']} is not supported by this fake`);
    }
  }
  return doc;
}

type LabelMatcher = (labels: Record<string, string>) => boolean;

/** Parses a label selector as the API server does for the forms listed in the header. */
export function parseSelector(selector: string): LabelMatcher {
  const terms: string[] = [];
  let depth = 0;
  let current = '';
  for (const ch of selector) {
    if (ch === '(') depth++;
    if (ch === ')') depth--;
    if (ch === ',' && depth === 0) {
      terms.push(current);
      current = '';
    } else current += ch;
  }
  terms.push(current);
  const matchers = terms
    .map((t) => t.trim())
    .filter((t) => t !== '')
    .map((term): LabelMatcher => {
      let m = /^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(term);
      if (m) {
        const [, k, op, list] = m as unknown as [string, string, string, string];
        const values = list.split(',').map((v) => v.trim());
        return op === 'in' ? (l) => k in l && values.includes(l[k]!) : (l) => !(k in l) || !values.includes(l[k]!);
      }
      m = /^([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)$/.exec(term);
      if (m) {
        const [, k, op, v] = m as unknown as [string, string, string, string];
        return op === '!=' ? (l) => l[k] !== v : (l) => l[k] === v;
      }
      m = /^(!?)([\w./-]+)$/.exec(term);
      if (m) {
        const [, not, k] = m as unknown as [string, string, string];
        return not ? (l) => !(k in l) : (l) => k in l;
      }
      throw new HttpError(400, 'BadRequest', `unable to parse requirement: ${term}`);
    });
  return (labels) => matchers.every((m) => m(labels));
}
