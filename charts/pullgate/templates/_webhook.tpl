{{/* One webhook entry: the parts the mutating and validating configurations share.
     Arguments: (list $root path caBundle excludedNamespaces includeWorkloads). */}}
{{- define "pullgate.webhookCommon" -}}
{{- $root := index . 0 -}}
{{- $path := index . 1 -}}
{{- $caBundle := index . 2 -}}
{{- $excluded := index . 3 -}}
{{- $workloads := index . 4 -}}
admissionReviewVersions: ["v1"]
sideEffects: None
failurePolicy: {{ $root.Values.webhook.failurePolicy }}
timeoutSeconds: {{ $root.Values.webhook.timeoutSeconds }}
matchPolicy: Equivalent
clientConfig:
  service:
    name: {{ include "pullgate.fullname" $root }}
    namespace: {{ $root.Release.Namespace }}
    path: {{ $path }}
    port: {{ $root.Values.webhook.servicePort }}
  {{- with $caBundle }}
  caBundle: {{ . }}
  {{- end }}
# Never kube-system or pullgate's own namespace: a webhook that is down must not be able to
# block the pods that would bring it back.
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values:
        {{- toYaml $excluded | nindent 8 }}
    - key: {{ $root.Values.webhook.optOutLabel }}
      operator: NotIn
      values: ["disabled"]
{{- with $root.Values.webhook.objectSelector }}
objectSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
rules:
  - apiGroups: [""]
    apiVersions: ["v1"]
    operations: ["CREATE", "UPDATE"]
    resources: ["pods", "pods/ephemeralcontainers"{{ if $workloads }}, "replicationcontrollers", "podtemplates"{{ end }}]
    scope: Namespaced
  {{- if $workloads }}
  - apiGroups: ["apps"]
    apiVersions: ["v1"]
    operations: ["CREATE", "UPDATE"]
    resources: ["deployments", "replicasets", "statefulsets", "daemonsets"]
    scope: Namespaced
  - apiGroups: ["batch"]
    apiVersions: ["v1"]
    operations: ["CREATE", "UPDATE"]
    resources: ["jobs", "cronjobs"]
    scope: Namespaced
  {{- end }}
matchConditions:
  # Updates that leave the spec alone (labels, annotations, finalizers) cannot change images.
  - name: spec-changed
    expression: "request.operation != 'UPDATE' || object.spec != oldObject.spec"
  # A ReplicaSet or Job stamped out by its controller was checked as its Deployment or
  # CronJob; the pods it creates are checked again anyway.
  - name: not-controller-owned-template
    expression: >-
      request.resource.resource == 'pods' || !has(object.metadata.ownerReferences) ||
      !object.metadata.ownerReferences.exists(r, has(r.controller) && r.controller)
  {{- with $root.Values.webhook.matchConditions }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
