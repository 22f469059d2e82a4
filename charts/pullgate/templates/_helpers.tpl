{{/* Names ------------------------------------------------------------------------------- */}}
{{- define "pullgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pullgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pullgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pullgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pullgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pullgate.labels" -}}
helm.sh/chart: {{ include "pullgate.chart" . }}
{{ include "pullgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pullgate
{{- end -}}

{{- define "pullgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pullgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pullgate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "pullgate.mirrorScheme" -}}
{{- if .Values.mirrorTLS.existingSecret -}}HTTPS{{- else -}}HTTP{{- end -}}
{{- end -}}

{{- define "pullgate.workloadKind" -}}
{{- if .Values.persistence.enabled -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}

{{- define "pullgate.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "pullgate.fullname" .)) .Values.policies.existingConfigMap -}}
{{- end -}}

{{- define "pullgate.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "pullgate.fullname" .) -}}
{{- end -}}

{{/* The DNS names the API server uses to reach the webhook Service. */}}
{{- define "pullgate.serviceDNSNames" -}}
{{- $svc := include "pullgate.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson -}}
{{- end -}}

{{/* Environment variable carrying upstream N's password (not PULLGATE_*: those are config overrides). */}}
{{- define "pullgate.passwordEnv" -}}
{{- printf "UPSTREAM_%d_PASSWORD" . -}}
{{- end -}}

{{/* Where containerd looks an upstream up: its registry host (docker.io for Docker Hub). */}}
{{- define "pullgate.registryHost" -}}
{{- $host := (urlParse .url).host -}}
{{- if or (has .name (list "docker.io" "index.docker.io" "registry-1.docker.io")) (has $host (list "docker.io" "index.docker.io" "registry-1.docker.io")) -}}
docker.io
{{- else if regexMatch "^[a-z0-9.-]+\\.[a-z]+(:[0-9]+)?$" .name -}}
{{- .name -}}
{{- else -}}
{{- $host -}}
{{- end -}}
{{- end -}}

{{/* pullgate's config.yaml: the user's `config` plus what the chart owns. */}}
{{- define "pullgate.config" -}}
{{- $cfg := deepCopy (default (dict) .Values.config) -}}
{{- $_ := set $cfg "listen" "0.0.0.0:5000" -}}
{{- $cache := deepCopy (default (dict) (get $cfg "cache")) -}}
{{- $_ := set $cache "dir" "/var/cache/pullgate" -}}
{{- $_ := set $cfg "cache" $cache -}}
{{- $upstreams := list -}}
{{- range $i, $u := .Values.upstreams -}}
{{- $o := dict "name" $u.name "url" $u.url -}}
{{- with $u.username }}{{ $_ := set $o "username" . }}{{ end -}}
{{- if $u.passwordSecret }}{{ $_ := set $o "password_env" (include "pullgate.passwordEnv" $i) }}{{ end -}}
{{- with $u.auth_hosts }}{{ $_ := set $o "auth_hosts" . }}{{ end -}}
{{- $upstreams = append $upstreams $o -}}
{{- end -}}
{{- $_ := set $cfg "upstreams" $upstreams -}}
{{- $_ := set $cfg "policies" "/etc/pullgate/policies" -}}
{{- if .Values.mirrorTLS.existingSecret -}}
{{- $_ := set $cfg "tls_cert" "/etc/pullgate/mirror-tls/tls.crt" -}}
{{- $_ := set $cfg "tls_key" "/etc/pullgate/mirror-tls/tls.key" -}}
{{- end -}}
{{- if .Values.accessSecret.name -}}
{{- $access := deepCopy (default (dict) (get $cfg "access")) -}}
{{- with .Values.accessSecret.htpasswdKey }}{{ $_ := set $access "htpasswd" (printf "/etc/pullgate/access/%s" .) }}{{ end -}}
{{- with .Values.accessSecret.tokensKey }}{{ $_ := set $access "tokens" (printf "/etc/pullgate/access/%s" .) }}{{ end -}}
{{- if .Values.accessSecret.tokenSecretKey }}{{ $_ := set $access "token_secret_env" "ACCESS_TOKEN_SECRET" }}{{ end -}}
{{- $_ := set $cfg "access" $access -}}
{{- end -}}
{{- with (include "pullgate.storageConfig" . | fromYaml) }}{{ $_ := set $cfg "storage" . }}{{ end -}}
{{- with (include "pullgate.coordinationConfig" . | fromYaml) }}{{ $_ := set $cfg "coordination" . }}{{ end -}}
{{- $_ := set $cfg "shutdown_grace" (printf "%ds" (int .Values.shutdownGraceSeconds)) -}}
{{- $_ := set $cfg "shutdown_delay" (printf "%ds" (int .Values.shutdownDelaySeconds)) -}}
{{- $admission := deepCopy (default (dict) (get $cfg "admission")) -}}
{{- $_ := set $admission "enabled" (.Values.webhook.enabled | default false) -}}
{{- if .Values.webhook.enabled -}}
{{- $_ := set $admission "listen" (printf "0.0.0.0:%d" (int .Values.webhook.port)) -}}
{{- $_ := set $admission "tls_cert" "/etc/pullgate/tls/tls.crt" -}}
{{- $_ := set $admission "tls_key" "/etc/pullgate/tls/tls.key" -}}
{{- if or .Values.webhook.clientCA.configMap .Values.webhook.clientCA.secret -}}
{{- $_ := set $admission "client_ca" (printf "/etc/pullgate/admission-client-ca/%s" .Values.webhook.clientCA.key) -}}
{{- end -}}
{{- if not (hasKey $admission "deadline") -}}
{{- $_ := set $admission "deadline" (printf "%ds" (max 1 (sub (int .Values.webhook.timeoutSeconds) 2))) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "admission" $admission -}}
{{- toYaml $cfg -}}
{{- end -}}


{{/* More than one replica, now or through the HPA: the shared tier (storage s3, coordination redis) is required. */}}
{{- define "pullgate.severalReplicas" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/* Environment variables carrying the object store's keys and the Redis password (not PULLGATE_*: those are config overrides). */}}
{{- define "pullgate.storageAccessKeyEnv" -}}STORAGE_ACCESS_KEY{{- end -}}
{{- define "pullgate.storageSecretKeyEnv" -}}STORAGE_SECRET_KEY{{- end -}}
{{- define "pullgate.coordinationPasswordEnv" -}}COORDINATION_PASSWORD{{- end -}}

{{/* pullgate's storage block from .Values.storage ({} for filesystem: nothing to configure). */}}
{{- define "pullgate.storageConfig" -}}
{{- $s := .Values.storage | default dict -}}
{{- if eq ($s.type | default "filesystem") "s3" -}}
{{- $o := dict "type" "s3" -}}
{{- range $key := list "endpoint" "bucket" "region" "prefix" "redirect_ttl" "part_size" "timeout" "max_size" -}}
{{- with (get $s $key) }}{{ $_ := set $o $key . }}{{ end -}}
{{- end -}}
{{- $_ := set $o "redirect" ($s.redirect | default false) -}}
{{- if ($s.credentialsSecret | default dict).name -}}
{{- $_ := set $o "access_key_env" (include "pullgate.storageAccessKeyEnv" .) -}}
{{- $_ := set $o "secret_key_env" (include "pullgate.storageSecretKeyEnv" .) -}}
{{- end -}}
{{- toYaml $o -}}
{{- end -}}
{{- end -}}

{{/* pullgate's coordination block from .Values.coordination ({} for local). advertise_url is
per pod: set in the environment (pullgate.coordinationEnv), not here. */}}
{{- define "pullgate.coordinationConfig" -}}
{{- $c := .Values.coordination | default dict -}}
{{- if eq ($c.type | default "local") "redis" -}}
{{- $o := dict "type" "redis" -}}
{{- range $key := list "url" "username" "key_prefix" "timeout" "lease_ttl" -}}
{{- with (get $c $key) }}{{ $_ := set $o $key . }}{{ end -}}
{{- end -}}
{{- if ($c.passwordSecret | default dict).name -}}
{{- $_ := set $o "password_env" (include "pullgate.coordinationPasswordEnv" .) -}}
{{- end -}}
{{- toYaml $o -}}
{{- end -}}
{{- end -}}

{{/* Container env for the shared tier: Secret references for the keys and the Redis
password, and this pod's peer endpoint (downward API) for the other replicas. */}}
{{- define "pullgate.sharedTierEnv" -}}
{{- $s := .Values.storage | default dict -}}
{{- $c := .Values.coordination | default dict -}}
{{- if eq ($s.type | default "filesystem") "s3" -}}
{{- with $s.credentialsSecret -}}
{{- if .name }}
- name: {{ include "pullgate.storageAccessKeyEnv" $ }}
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .accessKeyKey | default "access-key" }}
- name: {{ include "pullgate.storageSecretKeyEnv" $ }}
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .secretKeyKey | default "secret-key" }}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq ($c.type | default "local") "redis" -}}
{{- with $c.passwordSecret -}}
{{- if .name }}
- name: {{ include "pullgate.coordinationPasswordEnv" $ }}
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key | default "password" }}
{{- end -}}
{{- end }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
# Where the other replicas stream a blob from while this pod downloads it (peer endpoint).
- name: PULLGATE_COORDINATION__ADVERTISE_URL
  value: {{ $c.advertise_url | default (printf "%s://$(POD_IP):5000" (include "pullgate.mirrorScheme" $ | lower)) | quote }}
{{- end -}}
{{- end -}}
