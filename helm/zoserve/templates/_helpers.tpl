{{/* Chart name. */}}
{{- define "zoserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "zoserve.fullname" -}}
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

{{- define "zoserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zoserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "zoserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "zoserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "zoserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "zoserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "zoserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cpu" "" (eq .Values.device "cpu"))) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Secret this chart creates (API keys, external Redis URL). */}}
{{- define "zoserve.secretName" -}}
{{- include "zoserve.fullname" . }}
{{- end }}

{{/* Does the chart's own Secret hold anything? */}}
{{- define "zoserve.ownSecretNeeded" -}}
{{- if or (and (not .Values.apiKeys.existingSecret) (or .Values.apiKeys.admin .Values.apiKeys.inference)) (and .Values.externalRedis.url (not .Values.externalRedis.existingSecret)) }}true{{ end }}
{{- end }}

{{/* The bitnami/redis subchart's names: fullname is <release>-redis unless the release name contains "redis". */}}
{{- define "zoserve.redisFullname" -}}
{{- if contains "redis" .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-redis" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Refuse configurations that cannot work, with a message naming the value. */}}
{{- define "zoserve.validate" -}}
{{- $externalRedis := or .Values.externalRedis.url .Values.externalRedis.existingSecret }}
{{- if and .Values.redis.enabled $externalRedis }}
{{- fail "redis.enabled and externalRedis are exclusive: use the bundled Redis or an external one" }}
{{- end }}
{{- if and .Values.externalRedis.url .Values.externalRedis.existingSecret }}
{{- fail "externalRedis: set url or existingSecret, not both" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not (or .Values.redis.enabled $externalRedis)) }}
{{- fail "replicaCount > 1 needs Redis: set redis.enabled=true or externalRedis.url (the embedded store is per pod)" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) .Values.persistence.enabled (ne .Values.persistence.accessMode "ReadWriteMany") }}
{{- fail "replicaCount > 1 needs persistence.accessMode=ReadWriteMany: every replica reads every adapter's blobs" }}
{{- end }}
{{- if and .Values.apiKeys.existingSecret (or .Values.apiKeys.admin .Values.apiKeys.inference) }}
{{- fail "apiKeys: set admin/inference or existingSecret, not both" }}
{{- end }}
{{- end }}
