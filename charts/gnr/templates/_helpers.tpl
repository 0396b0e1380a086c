{{/*
Names, labels and the pieces of the pod that the PyTorchJob, the TrainJob and the eval Job share.
Fixed paths are a contract with gnr: the config at /etc/gnr/config.yaml, checkpoints at /checkpoints
(the config's checkpoint.dir), HOME and GNR_HOME under /home/gnr.
*/}}

{{- define "gnr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name (gnr submit names releases gnr-<task>-<run id>). */}}
{{- define "gnr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "gnr.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "gnr.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "gnr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gnr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.task }}
gnr/run-id: {{ .Values.runId | quote }}
{{- end }}

{{- define "gnr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gnr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: gnr
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Pod template metadata. */}}
{{- define "gnr.podMetadata" -}}
labels:
  {{- include "gnr.selectorLabels" . | nindent 2 }}
  {{- with .Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "gnr.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Processes per node: one per GPU, or one CPU process. */}}
{{- define "gnr.procsPerNode" -}}
{{- $gpus := ternary .Values.train.gpusPerNode .Values.eval.gpus (eq .Values.task "train") }}
{{- max 1 (int $gpus) }}
{{- end }}

{{/* The container command; torchrun takes nodes, node rank and master address from the PET_*
variables that both Kubeflow operators set, and runs the real `gnr` CLI module. */}}
{{- define "gnr.command" -}}
- torchrun
{{- if eq .Values.task "train" }}
- -m
- gnr.cli.app
- train
- --config
- /etc/gnr/config.yaml
{{- else }}
- --standalone
- --nproc-per-node={{ include "gnr.procsPerNode" . }}
- -m
- gnr.cli.app
- eval
- --run-id
- {{ .Values.runId | quote }}
{{- range .Values.eval.args }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gnr.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret | quote }}
      key: {{ .key | quote }}
{{- end }}

{{/* Environment: the run id, writable homes, MLflow and S3 endpoints; credentials only from Secrets. */}}
{{- define "gnr.env" -}}
- name: GNR_RUN_ID
  value: {{ .Values.runId | quote }}
- name: HOME
  value: /home/gnr
- name: GNR_HOME
  value: /home/gnr/.gnr
{{- if eq .Values.task "eval" }}
- name: GNR_EVAL_CACHE
  value: /checkpoints/eval-cache
{{- end }}
{{- with .Values.mlflow.trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- with .Values.mlflow.auth }}
{{- if .secretName }}
{{ include "gnr.secretEnv" (dict "name" "MLFLOW_TRACKING_USERNAME" "secret" .secretName "key" .usernameKey) }}
{{ include "gnr.secretEnv" (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" .secretName "key" .passwordKey) }}
{{- end }}
{{- end }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.credentials }}
{{- if .secretName }}
{{ include "gnr.secretEnv" (dict "name" "AWS_ACCESS_KEY_ID" "secret" .secretName "key" .accessKeyIdKey) }}
{{ include "gnr.secretEnv" (dict "name" "AWS_SECRET_ACCESS_KEY" "secret" .secretName "key" .secretAccessKeyKey) }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* CPU/memory from values plus the GPU limit. */}}
{{- define "gnr.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- $gpus := ternary .Values.train.gpusPerNode .Values.eval.gpus (eq .Values.task "train") | int }}
{{- if gt $gpus 0 }}
{{- $_ := set $res "limits" (merge (dict .Values.gpuResource $gpus) ($res.limits | default dict)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "gnr.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: home
  mountPath: /home/gnr
- name: tmp
  mountPath: /tmp
- name: checkpoints
  mountPath: /checkpoints
{{- if eq .Values.task "train" }}
- name: config
  mountPath: /etc/gnr
  readOnly: true
{{- end }}
{{- with .Values.data.pvc }}
{{- if .claimName }}
- name: data
  mountPath: {{ .mountPath }}
  readOnly: {{ .readOnly }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gnr.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratch.homeSize }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSize }}
- name: checkpoints
{{- if .Values.checkpoints.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.checkpoints.claimName }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if eq .Values.task "train" }}
- name: config
  configMap:
    name: {{ include "gnr.fullname" . }}-config
{{- end }}
{{- with .Values.data.pvc }}
{{- if .claimName }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .claimName }}
    readOnly: {{ .readOnly }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod spec fields that every job kind accepts (a TrainJob's runtime patch included). */}}
{{- define "gnr.podCommon" -}}
serviceAccountName: {{ .Values.serviceAccountName }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "gnr.volumes" . | nindent 2 }}
{{- end }}

{{/* The gnr container of a PyTorchJob replica or the eval Job. Call with (dict "root" $ "name" NAME). */}}
{{- define "gnr.container" -}}
{{- $ := .root -}}
- name: {{ .name }}
  image: {{ include "gnr.image" $ | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  command:
    {{- include "gnr.command" $ | nindent 4 }}
  env:
    {{- include "gnr.env" $ | nindent 4 }}
  resources:
    {{- include "gnr.resources" $ | nindent 4 }}
  volumeMounts:
    {{- include "gnr.volumeMounts" $ | nindent 4 }}
  securityContext:
    {{- toYaml $.Values.containerSecurityContext | nindent 4 }}
{{- end }}

{{/* Fail early, at render time, when the config and the release disagree. */}}
{{- define "gnr.checkTrainConfig" -}}
{{- $cfg := fromYaml (required "train.config is required: the resolved RunConfig that gnr submit writes" .Values.train.config) }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "train.config is not valid YAML: %s" $cfg.Error) }}
{{- end }}
{{- $runId := (($cfg.tracking | default dict).run_id) | default "" | toString }}
{{- if ne $runId (toString .Values.runId) }}
{{- fail (printf "train.config has tracking.run_id %q but runId is %q" $runId .Values.runId) }}
{{- end }}
{{- $ckpt := (($cfg.checkpoint | default dict).dir) | default "" | toString }}
{{- if ne $ckpt "/checkpoints" }}
{{- fail (printf "train.config has checkpoint.dir %q; the checkpoint volume is mounted at /checkpoints" $ckpt) }}
{{- end }}
{{- end }}
