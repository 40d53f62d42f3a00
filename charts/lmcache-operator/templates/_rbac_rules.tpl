{{/*
What the operator does in a watched namespace, and nothing more (see lmcache_operator/kube.py).
Shared by the ClusterRole (all namespaces) and the per-namespace Roles (`watchNamespaces`), so
the two cannot drift. The custom resource is only read, and written only through /status: the
operator uses kopf event handlers, so no finalizers or annotations land on user objects. Its
children are watched by label (kopf), server-side applied with one field manager (PATCH,
creating when missing) and deleted when a feature is turned off. Secrets are not watched (RBAC
cannot narrow list/watch by label): the generated Valkey password is created once (POST), only
its metadata is ever read (a GET as PartialObjectMetadata, also for an existingSecret, to roll
pods when it changes), and it is deleted with the Valkey server that used it.
*/}}
{{- define "lmcache-operator.rules" -}}
- apiGroups: ["serving.lmcache-kube.io"]
  resources: ["lmcachedeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serving.lmcache-kube.io"]
  resources: ["lmcachedeployments/status"]
  verbs: ["get", "patch"]
# Children carry blockOwnerDeletion; where the OwnerReferencesPermissionEnforcement admission
# plugin is on (OpenShift, hardened clusters), setting it needs this.
- apiGroups: ["serving.lmcache-kube.io"]
  resources: ["lmcachedeployments/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
