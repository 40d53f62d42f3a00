{{/*
What the operator does in a watched namespace, and nothing more. Shared by the ClusterRole
(all namespaces) and the per-namespace Roles (`watchNamespaces`), so the two cannot drift.
Children are server-side applied (PATCH, creating when missing) and deleted when a feature is
turned off; the CR itself is only read, with finalizers on metadata and writes to /status.
*/}}
{{- define "lmcache-operator.rules" -}}
- apiGroups: ["serving.lmcache-kube.io"]
  resources: ["lmcachedeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["serving.lmcache-kube.io"]
  resources: ["lmcachedeployments/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
