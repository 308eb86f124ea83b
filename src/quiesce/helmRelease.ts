/**
 * Reads a deployed Helm release's user-supplied values from the cluster, so a backup can keep them
 * without the operator finding the values file. Helm 3 stores each revision in a Secret named
 * `sh.helm.release.v1.<release>.v<N>` labelled `owner=helm,name=<release>` (pkg/storage/driver/
 * secrets.go); the newest revision is the highest N, which is what `helm get values` shows.
 *
 * The values hold secrets (passwords, keys): nothing here logs or puts them into an error message.
 */
import { ApiException, CoreV1Api } from '@kubernetes/client-node';
import { decodeHelmReleaseSecret, helmValuesYamlFromRelease } from '../pachyderm/helmValues.js';
import { KubernetesError, loadKubeConfig, type KubeTarget } from './kubernetes.js';

export interface HelmReleaseValues {
  release: string;
  namespace: string;
  revision: number;
  /** Helm's status of that revision (`deployed`, `failed`, `pending-upgrade`, ...). */
  status: string | undefined;
  chartVersion: string | undefined;
  appVersion: string | undefined;
  /** The user-supplied values as YAML. Contains secrets. */
  valuesYaml: string;
}

/** The YAML of the user-supplied values of the latest revision of `release`. Contains secrets. */
export async function readHelmReleaseValues(kube: KubeTarget, namespace: string, release: string): Promise<string> {
  return (await readHelmRelease(kube, namespace, release)).valuesYaml;
}

export async function readHelmRelease(kube: KubeTarget, namespace: string, release: string): Promise<HelmReleaseValues> {
  const kc = loadKubeConfig(kube);
  const core = kc.makeApiClient(CoreV1Api);
  const where = `namespace ${namespace} (context ${kc.getCurrentContext()})`;
  let items;
  try {
    items = (await core.listNamespacedSecret({ namespace, labelSelector: `owner=helm,name=${release}` })).items;
  } catch (err) {
    const code = err instanceof ApiException ? (err as ApiException<unknown>).code : undefined;
    const hint = code === 403 ? '; pachbackup needs list on secrets in that namespace to read the Helm release' : '';
    throw new KubernetesError(`listing the Helm release Secrets of ${release} in ${where} failed: ${code ? `HTTP ${code}` : (err as Error).message}${hint}`);
  }
  const pattern = new RegExp(`^sh\\.helm\\.release\\.v1\\.${escapeRegExp(release)}\\.v(\\d+)$`);
  let latest: { revision: number; data: string; status: string | undefined } | undefined;
  for (const secret of items) {
    const match = pattern.exec(secret.metadata?.name ?? '');
    const data = secret.data?.['release'];
    if (!match || data === undefined) continue;
    const revision = Number(match[1]);
    if (!latest || revision > latest.revision) latest = { revision, data, status: secret.metadata?.labels?.['status'] };
  }
  if (!latest) {
    throw new KubernetesError(`no Helm release "${release}" in ${where} (no Secret sh.helm.release.v1.${release}.v<N>); check the release name and namespace ("helm list -A")`);
  }
  let decoded;
  try {
    decoded = decodeHelmReleaseSecret(latest.data);
  } catch (err) {
    // The decoder's messages describe the format, never the content.
    throw new KubernetesError(`Secret sh.helm.release.v1.${release}.v${latest.revision} in ${where} is not a readable Helm release: ${(err as Error).message}`);
  }
  return {
    release,
    namespace,
    revision: latest.revision,
    status: decoded.status ?? latest.status,
    chartVersion: decoded.chartVersion,
    appVersion: decoded.appVersion,
    valuesYaml: helmValuesYamlFromRelease(decoded.config),
  };
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
