{{/* Object name prefix, capped at 63 characters (DNS label limit of many name fields). */}}
{{- define "lmcache-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmcache-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels: immutable on a Deployment, so nothing that changes between releases. */}}
{{- define "lmcache-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmcache-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels for everything the release owns, whatever its component. */}}
{{- define "lmcache-operator.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: lmcache-kube
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lmcache-operator.labels" -}}
{{ include "lmcache-operator.commonLabels" . }}
app.kubernetes.io/name: {{ include "lmcache-operator.name" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lmcache-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmcache-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A digest pins the image exactly, so it wins over the tag. */}}
{{- define "lmcache-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Non-empty when the Prometheus Operator API is served (or, rendering offline, named with
`--api-versions monitoring.coreos.com/v1`), so its objects never fail an install without it.
*/}}
{{- define "lmcache-operator.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}
