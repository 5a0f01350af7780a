{{/*
The node's paths per platform: the kustomize components of the same names (install/kubernetes/components).
hostPath type: DirectoryOrCreate where the default layout may not exist yet, Directory where the platform has it.
*/}}
{{- define "cni-redirect.platforms" -}}
"":
  binDir: /opt/cni/bin
  confDir: /etc/cni/net.d
  dirType: DirectoryOrCreate
  criSocket: /run/containerd/containerd.sock
gke:
  binDir: /home/kubernetes/bin
  binType: Directory
  confDir: /etc/cni/net.d
  dirType: DirectoryOrCreate
  criSocket: /run/containerd/containerd.sock
k3s:
  binDir: /var/lib/rancher/k3s/data/current/bin
  confDir: /var/lib/rancher/k3s/agent/etc/cni/net.d
  dirType: Directory
  criSocket: /run/containerd/containerd.sock
microk8s:
  binDir: /var/snap/microk8s/current/opt/cni/bin
  confDir: /var/snap/microk8s/current/args/cni-network
  dirType: Directory
  criSocket: /var/snap/microk8s/common/run/containerd.sock
openshift:
  binDir: /var/lib/cni/bin
  confDir: /etc/kubernetes/cni/net.d
  dirType: Directory
  criSocket: /run/containerd/containerd.sock
crio:
  binDir: /opt/cni/bin
  confDir: /etc/cni/net.d
  dirType: DirectoryOrCreate
  criSocket: /var/run/crio/crio.sock
  criInContainer: /var/run/crio/crio.sock
{{- end -}}

{{/* This release's node: the platform's paths with the admin's overrides. */}}
{{- define "cni-redirect.node" -}}
{{- $platform := get (include "cni-redirect.platforms" . | fromYaml) .Values.platform -}}
binDir: {{ .Values.cni.binDir | default $platform.binDir | quote }}
binType: {{ ternary "Directory" ($platform.binType | default $platform.dirType) (ne .Values.cni.binDir "") }}
confDir: {{ .Values.cni.confDir | default $platform.confDir | quote }}
confType: {{ ternary "Directory" $platform.dirType (ne .Values.cni.confDir "") }}
criSocket: {{ .Values.cri.socket | default $platform.criSocket | quote }}
criInContainer: {{ $platform.criInContainer | default "/run/containerd/containerd.sock" | quote }}
{{- end -}}

{{- define "cni-redirect.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "cni-redirect.labels" -}}
app.kubernetes.io/name: cni-redirect
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
{{- end -}}

{{- define "cni-redirect.bundle" -}}/opt/cni-redirect/bundle/cni-redirect/cni-redirect{{- end -}}
