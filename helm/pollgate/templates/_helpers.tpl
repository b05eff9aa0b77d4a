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
Name of the Secret holding the webhooks' signing secret (with
webhooks.upstream): webhooks.existingSecret when given, else the Secret this
chart creates (webhook-secret.yaml).
*/}}
{{- define "pollgate.webhookSecretName" -}}
{{- if .Values.webhooks.existingSecret }}
{{- .Values.webhooks.existingSecret }}
{{- else }}
{{- printf "%s-webhook" (include "pollgate.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/*
Key of the signing secret inside that Secret.
*/}}
{{- define "pollgate.webhookSecretKey" -}}
{{- .Values.webhooks.existingSecretKey | default "secret" }}
{{- end }}

{{/*
Whether events are sent, and so signed: webhooks.enabled with an upstream
("true" or nothing).
*/}}
{{- define "pollgate.webhooksSigned" -}}
{{- if and .Values.webhooks.enabled .Values.webhooks.upstream }}true{{ end }}
{{- end }}

{{/*
The events of webhooks.events (all four when it is left out). Fails on a
name that is not an event, or one listed twice.
*/}}
{{- define "pollgate.webhookEvents" -}}
{{- $all := list "channel_occupied" "channel_vacated" "subscriber_joined" "subscriber_left" }}
{{- $events := .Values.webhooks.events }}
{{- if kindIs "invalid" $events }}
{{- $events = $all }}
{{- end }}
{{- $seen := list }}
{{- range $events }}
{{- if not (has . $all) }}
{{- fail (printf "webhooks.events: %q is not an event; the events are %s" (toString .) (join ", " $all)) }}
{{- end }}
{{- if has . $seen }}
{{- fail (printf "webhooks.events: %q is listed twice" .) }}
{{- end }}
{{- $seen = append $seen . }}
{{- end }}
{{- toJson $seen }}
{{- end }}

{{/*
Fails on webhooks values that contradict each other or the rest of the
values, naming them. Nothing when webhooks.enabled is false.
*/}}
{{- define "pollgate.webhooksCheck" -}}
{{- $w := .Values.webhooks }}
{{- if $w.enabled }}
{{- $events := include "pollgate.webhookEvents" . | fromJsonArray }}
{{- if not (hasPrefix "/" ($w.path | default "/pollgate/events")) }}
{{- fail (printf "webhooks.path %q is not a path like /pollgate/events" $w.path) }}
{{- end }}
{{- if $w.upstream }}
{{- if not (hasKey (.Values.upstreams | default dict) $w.upstream) }}
{{- fail (printf "webhooks.upstream is %q, which is not in upstreams (%s): name one of them, or leave webhooks.upstream empty to track presence without sending events" $w.upstream (keys (.Values.upstreams | default dict) | sortAlpha | join ", " | default "none")) }}
{{- end }}
{{- if not $events }}
{{- fail "webhooks.events is empty while webhooks.upstream is set: no event would be sent; list some, or leave webhooks.upstream empty to track presence only" }}
{{- end }}
{{- else if $w.existingSecret }}
{{- fail "webhooks.existingSecret is set but webhooks.upstream is empty: the secret signs the events, which are only sent to an upstream; set webhooks.upstream or leave webhooks.existingSecret empty" }}
{{- end }}
{{- end }}
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
Which broker values build the URL: "sentinel" (broker.sentinel.hosts),
"cluster" (broker.cluster.nodes) or "url" (broker.url). Fails on values
that contradict each other, naming them.
*/}}
{{- define "pollgate.brokerMode" -}}
{{- $b := .Values.broker }}
{{- $sentinel := $b.sentinel | default dict }}
{{- $cluster := $b.cluster | default dict }}
{{- $hosts := $sentinel.hosts | default list }}
{{- $nodes := $cluster.nodes | default list }}
{{- if and $hosts $nodes }}
{{- fail "broker.sentinel.hosts and broker.cluster.nodes are both set: a Redis is either Sentinel-managed or a Cluster, set one of them" }}
{{- end }}
{{- if or $hosts $nodes }}
{{- $key := ternary "broker.sentinel.hosts" "broker.cluster.nodes" (not (empty $hosts)) }}
{{- if $b.url }}
{{- fail (printf "broker.url and %s are both set: %s builds the URL, so leave broker.url empty (or set only broker.url)" $key $key) }}
{{- end }}
{{- if and $b.existingSecret (eq $b.existingSecretHolds "url") }}
{{- fail (printf "broker.existingSecretHolds is url, which replaces the whole URL, and %s is set: with %s the Secret holds the password (existingSecretHolds: password)" $key $key) }}
{{- end }}
{{- end }}
{{- if $hosts }}
{{- "sentinel" }}
{{- else if $nodes }}
{{- if $b.sentinelPasswordSecret }}
{{- fail "broker.sentinelPasswordSecret is set with broker.cluster.nodes: a sentinel password is only for a Sentinel-managed Redis (broker.sentinel.hosts)" }}
{{- end }}
{{- "cluster" }}
{{- else }}
{{- if and $b.sentinelPasswordSecret (not (and $b.existingSecret (eq $b.existingSecretHolds "url"))) (not (regexMatch "^rediss?\\+sentinel://" $b.url)) }}
{{- fail "broker.sentinelPasswordSecret is set but the broker is not a Sentinel one: set broker.sentinel.hosts (or a redis+sentinel:// broker.url)" }}
{{- end }}
{{- "url" }}
{{- end }}
{{- end }}

{{/*
The password part of a URL built from broker.sentinel.hosts or
broker.cluster.nodes: ":${POLLGATE_REDIS_PASSWORD}@" with broker.existingSecret
(existingSecretHolds: password), else nothing.
*/}}
{{- define "pollgate.brokerUserinfo" -}}
{{- if .Values.broker.existingSecret }}
{{- if ne .Values.broker.existingSecretHolds "password" }}
{{- fail "broker.existingSecretHolds must be password or url" }}
{{- end }}
{{- ":${POLLGATE_REDIS_PASSWORD}@" }}
{{- end }}
{{- end }}

{{/*
The broker URL of the config. With broker.sentinel.hosts:
redis+sentinel://[:<password>@]h1,h2,.../<masterName>/<db> (rediss+sentinel
with sentinel.tls). With broker.cluster.nodes: redis+cluster://[:<password>@]n1,n2,...
Else broker.url (empty: redis://redis:6379/0), with the password of
broker.existingSecret put in (or replaced by the URL it holds). pollgate
expands the variables at start, and `check` prints the password redacted.
*/}}
{{- define "pollgate.brokerUrl" -}}
{{- $b := .Values.broker }}
{{- $mode := include "pollgate.brokerMode" . }}
{{- if eq $mode "sentinel" }}
{{- $s := $b.sentinel }}
{{- printf "%s://%s%s/%s/%d" (ternary "rediss+sentinel" "redis+sentinel" (eq ($s.tls | toString) "true")) (include "pollgate.brokerUserinfo" .) (join "," $s.hosts) ($s.masterName | default "mymaster") (int ($s.db | default 0)) }}
{{- else if eq $mode "cluster" }}
{{- printf "redis+cluster://%s%s" (include "pollgate.brokerUserinfo" .) (join "," $b.cluster.nodes) }}
{{- else }}
{{- $url := $b.url | default "redis://redis:6379/0" }}
{{- if not $b.existingSecret }}
{{- $url }}
{{- else if eq $b.existingSecretHolds "url" }}
{{- "${POLLGATE_BROKER_URL}" }}
{{- else if eq $b.existingSecretHolds "password" }}
{{- if not (regexMatch "^rediss?(\\+cluster|\\+sentinel)?://[^@/]*$|^rediss?(\\+cluster|\\+sentinel)?://[^@]*/" $url) }}
{{- fail "broker.url already holds credentials: with broker.existingSecret, give it without them" }}
{{- end }}
{{- regexReplaceAll "^(rediss?(\\+cluster|\\+sentinel)?)://" $url "${1}://:$${POLLGATE_REDIS_PASSWORD}@" }}
{{- else }}
{{- fail "broker.existingSecretHolds must be password or url" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The broker URL as NOTES.txt shows it: the password as ***, or the Secret
that holds the whole URL.
*/}}
{{- define "pollgate.brokerUrlShown" -}}
{{- if and .Values.broker.existingSecret (eq .Values.broker.existingSecretHolds "url") (eq (include "pollgate.brokerMode" .) "url") }}
{{- printf "from Secret %s" .Values.broker.existingSecret }}
{{- else }}
{{- include "pollgate.brokerUrl" . | replace "${POLLGATE_REDIS_PASSWORD}" "***" }}
{{- end }}
{{- end }}
