{{/*
Expand the name of the chart.
*/}}
{{- define "attest-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "attest-service.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "attest-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "attest-service.labels" -}}
helm.sh/chart: {{ include "attest-service.chart" . }}
{{ include "attest-service.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "attest-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "attest-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "attest-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "attest-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: a digest, when given, pins the exact image and wins over the tag.
*/}}
{{- define "attest-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the nonce store is Redis, from an inline URL or an existing Secret.
Every other case is the embedded SQLite store, which only a single replica may use.
*/}}
{{- define "attest-service.redisEnabled" -}}
{{- if or .Values.nonceStore.redisUrl .Values.nonceStore.existingSecret }}true{{- end }}
{{- end }}

{{/*
Name of the Secret the chart creates for inline secret values (API key hashes, Redis URL).
*/}}
{{- define "attest-service.secretName" -}}
{{- printf "%s-secrets" (include "attest-service.fullname" .) }}
{{- end }}

{{/*
True (non-empty) when the chart must create its own Secret: some secret value is given inline.
*/}}
{{- define "attest-service.createSecret" -}}
{{- if or (and .Values.apiKeys.keys (not .Values.apiKeys.existingSecret)) (and .Values.nonceStore.redisUrl (not .Values.nonceStore.existingSecret)) }}true{{- end }}
{{- end }}

{{/*
True (non-empty) when callers may present nonces of their own: API keys (a client with a key may, unless a
policy says otherwise), a policy file (which the chart cannot read when it is an existing ConfigMap), or the
open mode. Without any of them callers must use service-issued challenges.
*/}}
{{- define "attest-service.callerNonces" -}}
{{- if or .Values.apiKeys.keys .Values.apiKeys.existingSecret .Values.policy.toml .Values.policy.existingConfigMap .Values.settings.allowOpen }}true{{- end }}
{{- end }}

{{/*
Name of the PersistentVolumeClaim of the SQLite file, when there is one (an existing claim, or the chart's).
*/}}
{{- define "attest-service.sqliteClaim" -}}
{{- if not (include "attest-service.redisEnabled" .) }}
{{- if .Values.nonceStore.sqlite.existingClaim }}{{ .Values.nonceStore.sqlite.existingClaim }}
{{- else if .Values.nonceStore.sqlite.persistence.enabled }}{{ printf "%s-nonces" (include "attest-service.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when pinned certificates come from values rather than from the image.
*/}}
{{- define "attest-service.pinsFromValues" -}}
{{- range $cloud, $roles := .Values.pinnedCerts }}{{- range $role, $files := $roles }}{{- if $files }}true{{- end }}{{- end }}{{- end }}
{{- end }}

{{/*
Refuse contradictory values, each with the sentence an operator needs. Every rule that relates two values
lives here rather than in values.schema.json: helm reports a schema's if/then as JSON-Schema jargon ("Must
validate "then" as "if" was valid"), a fail as written. The schema keeps the rules of one value each.
*/}}
{{- define "attest-service.validate" -}}
{{- if and .Values.nonceStore.redisUrl .Values.nonceStore.existingSecret }}
{{- fail "nonceStore: set either redisUrl or existingSecret, not both (existingSecret names a Secret that holds the URL)" }}
{{- end }}
{{- if and .Values.apiKeys.keys .Values.apiKeys.existingSecret }}
{{- fail "apiKeys: set either keys or existingSecret, not both (existingSecret names a Secret that holds ATTEST_API_KEYS)" }}
{{- end }}
{{- if and .Values.policy.toml .Values.policy.existingConfigMap }}
{{- fail "policy: set either toml or existingConfigMap, not both (existingConfigMap names a ConfigMap that holds the policy)" }}
{{- end }}
{{- if and .Values.settings.allowOpen (or .Values.apiKeys.keys .Values.apiKeys.existingSecret .Values.policy.toml .Values.policy.existingConfigMap) }}
{{- fail "settings.allowOpen applies only without apiKeys and without a policy: with either, who may call is already decided; remove settings.allowOpen" }}
{{- end }}
{{- if and (not (include "attest-service.redisEnabled" .)) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount %d: more than one replica needs nonceStore.redisUrl (or nonceStore.existingSecret): each replica would keep its own SQLite store, and a document accepted by one could be accepted again by another" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (not (include "attest-service.redisEnabled" .)) .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled: autoscaling runs more than one replica, which needs nonceStore.redisUrl (or nonceStore.existingSecret): each replica would keep its own SQLite store, and a document accepted by one could be accepted again by another" }}
{{- end }}
{{- if and .Values.results.enabled (not .Values.results.existingSecret) (not .Values.results.generateKey) }}
{{- fail "results: set results.existingSecret (a Secret holding the PEM keys; make one with attest-service keys new DIR and kubectl create secret generic NAME --from-file=DIR), or results.generateKey true (the chart generates a key at the first helm install and keeps it; not with helm template or Argo CD, which render without a cluster), or results.enabled false" }}
{{- end }}
{{- $sqlite := .Values.nonceStore.sqlite }}
{{- if and $sqlite.existingClaim $sqlite.persistence.enabled }}
{{- fail "nonceStore.sqlite: set either existingClaim or persistence.enabled, not both (existingClaim names a PersistentVolumeClaim you made; persistence.enabled has the chart make one)" }}
{{- end }}
{{- if and (include "attest-service.callerNonces" .) (not (include "attest-service.redisEnabled" .)) (not (or $sqlite.existingClaim $sqlite.persistence.enabled $sqlite.acceptNonceLossOnRestart)) }}
{{- fail "with apiKeys, a policy or settings.allowOpen, callers may use nonces of their own, and the SQLite store on an emptyDir forgets every accepted nonce when the pod is replaced (a captured document could then be replayed until it expires): set nonceStore.redisUrl or existingSecret, nonceStore.sqlite.existingClaim or nonceStore.sqlite.persistence.enabled, or accept the loss with nonceStore.sqlite.acceptNonceLossOnRestart (docs/DEPLOYMENT.md)" }}
{{- end }}
{{- end }}

{{/*
Labels of the `helm test` pod. They deliberately omit app.kubernetes.io/name, so the Service, the PDB and
the NetworkPolicy, which select on the selector labels, never take the test pod for a server.
*/}}
{{- define "attest-service.testLabels" -}}
helm.sh/chart: {{ include "attest-service.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
An alert expression of files/alerts.yaml with one threshold literal replaced by its value from
prometheusRule.alerts: (list ALERT EXPR LITERAL REPLACEMENT). Fails when the literal is gone from the
expression, so that the file and the values cannot drift apart silently.
*/}}
{{- define "attest-service.alertThreshold" -}}
{{- $name := index . 0 }}
{{- $expr := index . 1 }}
{{- $literal := index . 2 }}
{{- if not (contains $literal $expr) }}
{{- fail (printf "files/alerts.yaml: the expression of %s no longer contains %q, which prometheusRule.alerts.%s sets" $name $literal $name) }}
{{- end }}
{{- replace $literal (index . 3) $expr }}
{{- end }}

{{/*
True (non-empty) when the CRLs are fetched beside the service: the trust directory is then assembled in an
emptyDir, which the fetch can write.
*/}}
{{- define "attest-service.crlRefresh" -}}
{{- if gt (float64 .Values.settings.crlRefreshSeconds) 0.0 }}true{{- end }}
{{- end }}

{{/*
True (non-empty) when a fingerprint pin is in use: always with the image's bundled pins (Azure China's issuing
CAs are pinned so), else when a cloud's intermediates/fingerprints.txt in pinnedCerts holds an entry (a line
that is more than a comment).
*/}}
{{- define "attest-service.fingerprintPins" -}}
{{- if not (include "attest-service.pinsFromValues" .) }}true{{- end }}
{{- range $cloud, $roles := .Values.pinnedCerts }}
{{- if and (kindIs "map" $roles) (kindIs "map" $roles.intermediates) }}
{{- range splitList "\n" (toString (get $roles.intermediates "fingerprints.txt")) }}
{{- if trim (regexReplaceAll "#.*" . "") }}true{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when a fetch of the service needs HTTP(S) egress (networkPolicy.fetchTo): the fingerprint-pinned
CAs (settings.fingerprintFetch with such pins in use), the AIA fallback, or the CRLs fetched beside the service.
*/}}
{{- define "attest-service.fetchEgress" -}}
{{- if and .Values.settings.fingerprintFetch (include "attest-service.fingerprintPins" .) }}true{{- end }}
{{- if .Values.settings.aiaFetch }}true{{- end }}
{{- include "attest-service.crlRefresh" . }}
{{- end }}

{{/*
The trust directory the service reads [ATTEST_PINNED_CERTS]: the pins as mounted (or bundled in the image), or
the assembled one when the CRLs are fetched beside the service.
*/}}
{{- define "attest-service.trustDirectory" -}}
{{- if include "attest-service.crlRefresh" . }}/var/lib/attest-service-trust{{ else }}/etc/attest-service/pinned_certs{{ end }}
{{- end }}

{{/*
The init container's script that assembles the writable trust directory: for each cloud, links to the pinned
roots and intermediates (so that edits of a ConfigMap still reach the service through them), the manifest, and
a crls/ folder that starts with the CRLs the pins ship and that the fetch then keeps current. Run again when
the pod restarts, it keeps the CRLs fetched since.
*/}}
{{- define "attest-service.trustDirectoryScript" -}}
set -eu
src=/etc/attest-service/pinned_certs
dst=/var/lib/attest-service-trust
for cloud in public usgov china germany; do
  mkdir -p "$dst/$cloud/crls"
  for part in roots intermediates; do
    ln -sfn "$src/$cloud/$part" "$dst/$cloud/$part"
  done
  for file in "$src/$cloud/crls"/*.crl; do
    if [ -f "$file" ] && [ ! -e "$dst/$cloud/crls/${file##*/}" ]; then
      cp "$file" "$dst/$cloud/crls/"
    fi
  done
done
if [ -e "$src/manifest.json" ]; then
  ln -sfn "$src/manifest.json" "$dst/manifest.json"
fi
{{- end }}

{{/*
The Secret holding the result-signing keys: the operator's, or the one the chart generates once.
*/}}
{{- define "attest-service.resultKeysSecret" -}}
{{- .Values.results.existingSecret | default (printf "%s-result-keys" (include "attest-service.fullname" .)) }}
{{- end }}
