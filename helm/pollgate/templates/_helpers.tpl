{{/*
Chart name, truncated to 63 characters (the limit of a DNS label).
*/}}
{{- define "pollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, plus the chart name unless the
release name already contains it.
*/}}
{{- define "pollgate.fullname" -}}
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
Name of the admin Service.
*/}}
{{- define "pollgate.adminName" -}}
{{- printf "%s-admin" (include "pollgate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
Name of the Secret holding the publish token: publishToken.existingSecret
when given, else the Secret this chart creates (secret.yaml).
*/}}
{{- define "pollgate.publishSecretName" -}}
{{- if .Values.publishToken.existingSecret }}
{{- .Values.publishToken.existingSecret }}
{{- else }}
{{- printf "%s-publish" (include "pollgate.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/*
Key of the publish token inside that Secret.
*/}}
{{- define "pollgate.publishSecretKey" -}}
{{- .Values.publishToken.key | default "token" }}
{{- end }}

{{/*
Name of the kubernetes.io/tls Secret of the HTTPS listener: tls.secretName,
else <fullname>-tls, which the chart's cert-manager Certificate writes.
With tls.enabled, one of the two is required.
*/}}
{{- define "pollgate.tlsSecretName" -}}
{{- if .Values.tls.secretName }}
{{- .Values.tls.secretName }}
{{- else if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "pollgate.fullname" . | trunc 59 | trimSuffix "-") }}
{{- else }}
{{- fail "tls.enabled needs a certificate: tls.secretName (an existing kubernetes.io/tls Secret) or tls.certManager.enabled" }}
{{- end }}
{{- end }}

{{- define "pollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "pollgate.labels" -}}
helm.sh/chart: {{ include "pollgate.chart" . }}
{{ include "pollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "pollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
gracePeriod in whole seconds: "10s", "1m" or a plain number of seconds.
*/}}
{{- define "pollgate.gracePeriodSeconds" -}}
{{- $g := toString .Values.gracePeriod | trim }}
{{- if regexMatch "^[0-9]+$" $g }}
{{- $g }}
{{- else if regexMatch "^[0-9]+s$" $g }}
{{- trimSuffix "s" $g }}
{{- else if regexMatch "^[0-9]+m$" $g }}
{{- mul (trimSuffix "m" $g | atoi) 60 }}
{{- else }}
{{- fail (printf "gracePeriod %q: write whole seconds or minutes, e.g. 10s or 1m" $g) }}
{{- end }}
{{- end }}

{{/*
The pod's terminationGracePeriodSeconds: the preStop pause, pollgate's
grace_period, and 5 s for the process to exit.
*/}}
{{- define "pollgate.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (include "pollgate.gracePeriodSeconds" . | atoi) 5 }}
{{- end }}

{{/*
The ServiceAccount of the pods.
*/}}
{{- define "pollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pollgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Seconds an ingress or gateway must let a request last: the longest hold of
the routes (longestHoldSeconds) plus a margin.
*/}}
{{- define "pollgate.proxyTimeoutSeconds" -}}
{{- add (int .Values.longestHoldSeconds) 30 }}
{{- end }}

{{/*
The broker URL of the config: broker.url, with the password of
broker.existingSecret put in (or replaced by the URL it holds); pollgate
expands the variable at start, and `check` prints it redacted.
*/}}
{{- define "pollgate.brokerUrl" -}}
{{- $b := .Values.broker }}
{{- if not $b.existingSecret }}
{{- $b.url }}
{{- else if eq $b.existingSecretHolds "url" }}
{{- "${POLLGATE_BROKER_URL}" }}
{{- else if eq $b.existingSecretHolds "password" }}
{{- if not (regexMatch "^rediss?(\\+cluster)?://[^@/]*$|^rediss?(\\+cluster)?://[^@]*/" $b.url) }}
{{- fail "broker.url already holds credentials: with broker.existingSecret, give it without them" }}
{{- end }}
{{- regexReplaceAll "^(rediss?(\\+cluster)?)://" $b.url "${1}://:$${POLLGATE_REDIS_PASSWORD}@" }}
{{- else }}
{{- fail "broker.existingSecretHolds must be password or url" }}
{{- end }}
{{- end }}
