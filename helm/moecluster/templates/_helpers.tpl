{{/*
Names, labels and shared strings of the moecluster chart.
*/}}

{{/* The chart name, "moecluster" unless overridden. */}}
{{- define "moecluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator's resource name: the release name when it already contains the
chart name (`helm install moecluster ...` gives "moecluster", not
"moecluster-moecluster"), else RELEASE-moecluster. 63 characters: a DNS label,
since it is also the Service's name.
*/}}
{{- define "moecluster.fullname" -}}
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

{{/* "moecluster-0.1.0", for the helm.sh/chart label. */}}
{{- define "moecluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object the chart creates. */}}
{{- define "moecluster.labels" -}}
helm.sh/chart: {{ include "moecluster.chart" . }}
{{ include "moecluster.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moecluster
{{- end }}

{{/*
Selector labels. app.kubernetes.io/name stays "moecluster" whatever nameOverride
says: the NetworkPolicy and the Prometheus monitor select the operator's pods
and the workers and frontends it creates by it.
*/}}
{{- define "moecluster.selectorLabels" -}}
app.kubernetes.io/name: moecluster
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the operator pod (component keeps them apart from workers and frontends). */}}
{{- define "moecluster.operatorSelectorLabels" -}}
{{ include "moecluster.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "moecluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moecluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "moecluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* The default image of workers and frontends: operator.defaultImage, else the operator's own. */}}
{{- define "moecluster.defaultImage" -}}
{{- .Values.operator.defaultImage | default (include "moecluster.image" .) }}
{{- end }}

{{/* Where frontends dial the controller: the chart's Service, fully qualified within the cluster domain. */}}
{{- define "moecluster.controllerAddress" -}}
{{- printf "%s.%s.svc:%d" (include "moecluster.fullname" .) .Release.Namespace (int .Values.operator.controllerPort) }}
{{- end }}
