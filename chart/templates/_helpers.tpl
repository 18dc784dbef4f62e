{{/*
Naming follows the usual Helm conventions so objects stay within the 63
character DNS label limit.
*/}}
{{- define "redis-ws-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "redis-ws-gateway.fullname" -}}
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

{{- define "redis-ws-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "redis-ws-gateway.labels" -}}
helm.sh/chart: {{ include "redis-ws-gateway.chart" . }}
{{ include "redis-ws-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels never change across upgrades: selectors are immutable. */}}
{{- define "redis-ws-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "redis-ws-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "redis-ws-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "redis-ws-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "redis-ws-gateway.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "redis-ws-gateway.configPath" -}}
/etc/redis-ws-gateway/config.yaml
{{- end }}

{{/* ---------------------------------------------------------------- auth */}}

{{- define "redis-ws-gateway.authSecretName" -}}
{{- default (include "redis-ws-gateway.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/* ---------------------------------------------------------------- redis */}}

{{- define "redis-ws-gateway.redis.fullname" -}}
{{- printf "%s-redis" (include "redis-ws-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "redis-ws-gateway.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "redis-ws-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "redis-ws-gateway.redis.labels" -}}
helm.sh/chart: {{ include "redis-ws-gateway.chart" . }}
{{ include "redis-ws-gateway.redis.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "redis-ws-gateway.redis.image" -}}
{{- printf "%s:%s" .Values.redis.image.repository .Values.redis.image.tag }}
{{- end }}

{{/*
The one place that decides which Redis the gateway talks to. Both at once is
refused: silently preferring one would point production at a dev Redis (or
the reverse) because of a leftover value.
*/}}
{{- define "redis-ws-gateway.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.externalRedis.url }}
{{- fail "externalRedis.url is set while redis.enabled=true: set redis.enabled=false to use the external Redis" }}
{{- end }}
{{- printf "redis://%s:%d" (include "redis-ws-gateway.redis.fullname" .) (int .Values.redis.port) }}
{{- else }}
{{- required "externalRedis.url is required when redis.enabled=false" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the Redis password, or "" when there is none. */}}
{{- define "redis-ws-gateway.redisPasswordSecretName" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
{{- default (include "redis-ws-gateway.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "redis-ws-gateway.redisPasswordSecretKey" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{- define "redis-ws-gateway.redisPasswordEnv" -}}
{{- $secret := include "redis-ws-gateway.redisPasswordSecretName" . }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "redis-ws-gateway.redisPasswordSecretKey" . }}
{{- end }}
{{- end }}

{{/*
A generated secret must survive upgrades, or every `helm upgrade` would
rotate credentials under running clients. lookup returns nothing under
`helm template`, which then just shows a fresh value.
*/}}
{{- define "redis-ws-gateway.secretValue" -}}
{{- $ctx := index . 0 }}
{{- $secretName := index . 1 }}
{{- $key := index . 2 }}
{{- $given := index . 3 }}
{{- if $given }}
{{- $given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace $secretName }}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------- settings */}}

{{- define "redis-ws-gateway.gracePeriod" -}}
{{- $s := .Values.shutdown }}
{{- $bound := max (int $s.drainWindowSeconds) (int $s.shutdownTimeoutSeconds) }}
{{- add (int $s.preStopSleepSeconds) $bound (int $s.graceMarginSeconds) }}
{{- end }}

{{/*
Exposed (Ingress or HTTPRoute) with no authentication and an anonymous role
that may read every channel: refused unless acknowledged, because the
defaults would otherwise publish every channel to the internet.
*/}}
{{- define "redis-ws-gateway.checkExposure" -}}
{{- $v := .Values }}
{{- if and (or $v.ingress.enabled $v.httpRoute.enabled) (not $v.gateway.requireAuth) (not $v.gateway.acknowledgeAnonymousFullAccess) }}
{{- $roles := $v.config.roles | default (dict "admin" (dict "allow" (list "*")) "user" (dict "allow" (list "*"))) }}
{{- $role := index $roles $v.gateway.defaultRole | default dict }}
{{- if has "*" ($role.allow | default list) }}
{{- fail (printf "exposed through ingress/httpRoute with gateway.requireAuth=false, and anonymous clients get role %q, which allows \"*\": anyone could read every channel. Set gateway.requireAuth=true, or a gateway.defaultRole whose config.roles allow list is narrower, or gateway.acknowledgeAnonymousFullAccess=true if this is intended (docs/OPERATIONS.md, \"Exposing the gateway\")" $v.gateway.defaultRole) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment settings as a flat map, rendered into the ConfigMap and referenced
key by key from the pod, so the two cannot drift apart.
*/}}
{{- define "redis-ws-gateway.envSettings" -}}
{{- $v := .Values }}
{{- if lt (int $v.shutdown.shutdownTimeoutSeconds) (int $v.shutdown.drainWindowSeconds) }}
{{- fail "shutdown.shutdownTimeoutSeconds must not be shorter than shutdown.drainWindowSeconds" }}
{{- end }}
{{- include "redis-ws-gateway.checkExposure" . }}
{{- if and $v.config.roles (not (hasKey $v.config.roles $v.gateway.defaultRole)) }}
{{- fail (printf "gateway.defaultRole %q is not one of config.roles (%s)" $v.gateway.defaultRole (keys $v.config.roles | sortAlpha | join ", ")) }}
{{- end }}
REDIS_WS_GATEWAY_HOST: "0.0.0.0"
REDIS_WS_GATEWAY_PORT: {{ $v.containerPort | int | toString | quote }}
{{- if eq (int $v.internalPort) (int $v.containerPort) }}
{{- fail "internalPort must differ from containerPort" }}
{{- end }}
REDIS_WS_GATEWAY_INTERNAL_PORT: {{ $v.internalPort | int | toString | quote }}
REDIS_WS_GATEWAY_CONFIG: {{ include "redis-ws-gateway.configPath" . | quote }}
REDIS_URL: {{ include "redis-ws-gateway.redisUrl" . | quote }}
REQUIRE_AUTH: {{ $v.gateway.requireAuth | quote }}
DEFAULT_ROLE: {{ $v.gateway.defaultRole | quote }}
MAX_CHANNELS_PER_CLIENT: {{ $v.gateway.maxChannelsPerClient | int | toString | quote }}
MAX_WILDCARD_SUBSCRIPTIONS: {{ $v.gateway.maxWildcardSubscriptions | int | toString | quote }}
MAX_CONNECTION_AGE_SECONDS: {{ $v.gateway.maxConnectionAgeSeconds | int | toString | quote }}
{{- with $v.gateway.allowedOrigins }}
ALLOWED_ORIGINS: {{ join "," . | quote }}
{{- end }}
{{- with $v.externalRedis }}
{{- if and .shardedChannels (or $v.redis.enabled (not .clusterNodes)) }}
{{- fail "externalRedis.shardedChannels needs externalRedis.clusterNodes (and redis.enabled=false)" }}
{{- end }}
{{- if and (not $v.redis.enabled) .username }}
REDIS_USERNAME: {{ .username | quote }}
{{- end }}
{{- if and (not $v.redis.enabled) .clusterNodes }}
REDIS_CLUSTER_NODES: {{ join "," .clusterNodes | quote }}
{{- if .shardedChannels }}
REDIS_SHARDED_CHANNELS: {{ join "," .shardedChannels | quote }}
{{- end }}
{{- end }}
{{- if and (not $v.redis.enabled) .sentinels }}
REDIS_SENTINELS: {{ join "," .sentinels | quote }}
REDIS_SENTINEL_MASTER: {{ .sentinelMaster | quote }}
{{- end }}
{{- if and (not $v.redis.enabled) .tls.caSecret }}
REDIS_TLS_CA_FILE: "/etc/redis-ws-gateway/redis-ca/ca.crt"
{{- end }}
{{- if and (not $v.redis.enabled) .tls.clientCertSecret }}
REDIS_TLS_CERT_FILE: "/etc/redis-ws-gateway/redis-client/tls.crt"
REDIS_TLS_KEY_FILE: "/etc/redis-ws-gateway/redis-client/tls.key"
{{- end }}
{{- if and (not $v.redis.enabled) (not .tls.verify) }}
REDIS_TLS_VERIFY: "false"
{{- end }}
{{- end }}
LOG_LEVEL: {{ $v.logLevel | quote }}
LOG_FORMAT: {{ $v.logFormat | quote }}
DRAIN_WINDOW_SECONDS: {{ $v.shutdown.drainWindowSeconds | int | toString | quote }}
SHUTDOWN_TIMEOUT_SECONDS: {{ $v.shutdown.shutdownTimeoutSeconds | int | toString | quote }}
{{- if $v.tracing.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $v.tracing.otlpEndpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ $v.tracing.otlpProtocol | quote }}
OTEL_SERVICE_NAME: {{ $v.tracing.serviceName | quote }}
OTEL_TRACES_SAMPLER: "parentbased_traceidratio"
OTEL_TRACES_SAMPLER_ARG: {{ $v.tracing.sampleRatio | toString | quote }}
{{- end }}
{{- end }}

{{/* The config file: only the sections that were given. */}}
{{- define "redis-ws-gateway.configFile" -}}
{{- $file := dict }}
{{- range $section := list "roles" "channel_policies" "durable" "streams" "snapshots" }}
{{- $value := index $.Values.config $section }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $file $section $value }}
{{- end }}
{{- end }}
{{- if $file }}
{{- toYaml $file }}
{{- else }}
{{- "{}" }}
{{- end }}
{{- end }}
