{{/* Labels of a component's objects: component, and the pool for workers. */}}
{{- define "noodle.labels" -}}
app.kubernetes.io/name: noodle
{{ include "noodle.selector" . }}
{{- end }}

{{/* What selects a component's pods: instance + component (+ pool). Call with (dict "root" $ "component" C "pool" P). */}}
{{- define "noodle.selector" -}}
app.kubernetes.io/instance: {{ .root.Values.name | default "noodle" }}
app.kubernetes.io/component: {{ .component }}
{{- if .pool }}
noodle/pool: {{ .pool }}
{{- end }}
{{- end }}

{{- define "noodle.name" -}}
{{ .Values.name | default "noodle" }}
{{- end }}

{{- define "noodle.namespace" -}}
{{- if .Values.namespace }}
namespace: {{ .Values.namespace }}
{{- end }}
{{- end }}

{{- define "noodle.modelPath" -}}
{{ trimSuffix "/" (.Values.model.mount_path | default "/models") }}/{{ .Values.model.folder }}
{{- end }}

{{- define "noodle.coordinatorPort" -}}
{{ .Values.coordinator.port | default 8000 }}
{{- end }}

{{- define "noodle.workerPort" -}}
{{ .Values.worker_port | default 50051 }}
{{- end }}

{{/* The pod's security context: the image's non-root user. */}}
{{- define "noodle.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{- define "noodle.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end }}

{{/* Volumes: model (read-only), token file, /tmp (+ cache for workers). Call with (dict "root" $ "cache" bool). */}}
{{- define "noodle.volumes" -}}
volumes:
  - name: model
    {{- if .root.Values.model.claim }}
    persistentVolumeClaim:
      claimName: {{ .root.Values.model.claim }}
      readOnly: true
    {{- else }}
    hostPath:
      path: {{ .root.Values.model.host_path }}
      type: Directory
    {{- end }}
  - name: token
    secret:
      secretName: {{ .root.Values.secrets.token }}
      items:
        - key: token
          path: token
      defaultMode: 288
  - name: tmp
    emptyDir: {}
  {{- if .cache }}
  - name: cache
    emptyDir: {}
  {{- end }}
{{- end }}

{{- define "noodle.mounts" -}}
volumeMounts:
  - name: model
    mountPath: {{ .root.Values.model.mount_path | default "/models" }}
    readOnly: true
  - name: token
    mountPath: /var/run/secrets/noodle
    readOnly: true
  - name: tmp
    mountPath: /tmp
  {{- if .cache }}
  - name: cache
    mountPath: /var/cache/noodle
  {{- end }}
{{- end }}

{{/* requests/limits from a resources block; gpu: add nvidia.com/gpu to the limits. Call with (dict "res" R "gpu" bool). */}}
{{- define "noodle.resources" -}}
{{- $out := dict }}
{{- range $part := list "requests" "limits" }}
{{- $amounts := dict }}
{{- $given := (get ($.res | default dict) $part) | default dict }}
{{- range $k := list "cpu" "memory" }}
{{- if get $given $k }}{{ $_ := set $amounts $k (get $given $k) }}{{ end }}
{{- end }}
{{- if and $.gpu (eq $part "limits") }}{{ $_ := set $amounts "nvidia.com/gpu" "1" }}{{ end }}
{{- if $amounts }}{{ $_ := set $out $part $amounts }}{{ end }}
{{- end }}
{{- if $out }}
resources:
{{- toYaml $out | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling: nodeSelector and tolerations (snake_case in values, camelCase here). */}}
{{- define "noodle.scheduling" -}}
{{- if .node_selector }}
nodeSelector:
{{- toYaml .node_selector | nindent 2 }}
{{- end }}
{{- if .tolerations }}
tolerations:
{{- range .tolerations }}
  - operator: {{ .operator | default "Equal" }}
    {{- if .key }}
    key: {{ .key | quote }}
    {{- end }}
    {{- if .value }}
    value: {{ .value | quote }}
    {{- end }}
    {{- if .effect }}
    effect: {{ .effect }}
    {{- end }}
    {{- if and (hasKey . "toleration_seconds") (not (kindIs "invalid" .toleration_seconds)) }}
    tolerationSeconds: {{ .toleration_seconds }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
