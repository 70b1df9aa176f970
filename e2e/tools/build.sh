#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl, etcd, helm and a PromQL checker from source through the Go
# module proxy and caches them outside the repository. Prints one NAME=PATH
# line per binary. Quick (a few stat calls) when the cache is warm.
#
#   e2e/tools/build.sh            # build what is missing, print the paths
#   MOECLUSTER_K8S_CACHE=DIR ...  # cache somewhere else (default ~/.cache/moecluster/k8s)
#
# Kubernetes is not `go install`-able at a version: k8s.io/kubernetes replaces
# its staging modules (k8s.io/api, k8s.io/apimachinery, ...) with local paths.
# A small wrapper module requires it and replaces each staging module with its
# published v0.X.Y of the same release instead.
set -euo pipefail

KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
PROMETHEUS_VERSION=v0.316.0  # e2e/tools/promql_check/go.mod's: Prometheus 3's module version
HELM_KUBE_MINOR=34  # the k8s.io/* v0.34 libraries helm v3.19 is built on
CACHE="${MOECLUSTER_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moecluster/k8s}"

command -v go >/dev/null || { echo "build.sh: Go is not installed (https://go.dev/dl/)" >&2; exit 3; }

bin="$CACHE/bin"
mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"
export CGO_ENABLED=0

log() { echo "build.sh: $*" >&2; }

# build NAME VERSION MODULE_DIR PACKAGE [LDFLAGS]: go build PACKAGE inside MODULE_DIR to bin/NAME-VERSION.
build() {
  local name=$1 version=$2 dir=$3 package=$4 ldflags=${5:-} out="$bin/$1-$2"
  if [[ ! -x "$out" ]]; then
    log "building $name $version (first time only; several minutes on 2 cores)"
    (cd "$dir" && go build -ldflags="-s -w $ldflags" -o "$out.tmp" "$package") || { log "building $name failed"; exit 1; }
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

kubernetes_module() {
  local dir="$CACHE/src/kubernetes-$KUBERNETES_VERSION"
  if [[ ! -f "$dir/go.sum" ]]; then
    rm -rf "$dir" && mkdir -p "$dir"
    local staging="v0.${KUBERNETES_VERSION#v1.}"
    log "resolving k8s.io/kubernetes $KUBERNETES_VERSION with staging modules at $staging"
    local gomod
    gomod=$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module moecluster.io/e2e/kubernetes"
      echo
      echo "go $(go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/')"
      echo
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      echo
      # Every `k8s.io/X => ./staging/src/k8s.io/X` becomes `k8s.io/X => k8s.io/X v0.Y.Z`.
      sed -nE "s#^[[:space:]]*(replace[[:space:]]+)?(k8s.io/[^[:space:]]+)[[:space:]]+=>[[:space:]]+\./staging/.*#replace \2 => \2 $staging#p" "$gomod"
    } > "$dir/go.mod"
    printf 'package tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"\n\t_ "k8s.io/kubectl/pkg/cmd"\n)\n' > "$dir/tools.go"
    (cd "$dir" && go mod tidy >&2)
  fi
  echo "$dir"
}

plain_module() {  # plain_module NAME MODULE VERSION PACKAGE: a wrapper module requiring MODULE@VERSION.
  local dir="$CACHE/src/$1-$3"
  if [[ ! -f "$dir/go.sum" ]]; then
    rm -rf "$dir" && mkdir -p "$dir"
    printf 'module moecluster.io/e2e/%s\n\ngo %s\n' "$1" "$(go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/')" > "$dir/go.mod"
    (cd "$dir" && go get "$4@$3" >&2)  # the main package at that version, with every go.sum entry it needs
  fi
  echo "$dir"
}

# What `make` stamps into Kubernetes binaries: without it they report v0.0.0, and helm refuses
# charts with a kubeVersion constraint.
kube_version_flags() {
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local pkg flags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

want() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }

if want kube-apiserver || want kube-controller-manager || want kubectl; then
  k8s=$(kubernetes_module)
  stamp=$(kube_version_flags)
  if want kube-apiserver; then
    path=$(build kube-apiserver "$KUBERNETES_VERSION" "$k8s" k8s.io/kubernetes/cmd/kube-apiserver "$stamp")
    echo "KUBE_APISERVER=$path"
  fi
  if want kube-controller-manager; then
    path=$(build kube-controller-manager "$KUBERNETES_VERSION" "$k8s" k8s.io/kubernetes/cmd/kube-controller-manager "$stamp")
    echo "KUBE_CONTROLLER_MANAGER=$path"
  fi
  if want kubectl; then
    path=$(build kubectl "$KUBERNETES_VERSION" "$k8s" k8s.io/kubernetes/cmd/kubectl "$stamp")
    echo "KUBECTL=$path"
  fi
fi
if want etcd; then
  etcd=$(plain_module etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3)
  path=$(build etcd "$ETCD_VERSION" "$etcd" go.etcd.io/etcd/server/v3)
  echo "ETCD=$path"
fi
if want promql-check; then
  # The PromQL parser of Prometheus itself, checking the chart's alerts and dashboard (e2e/tools/promql_check).
  src="$(cd "$(dirname "$0")" && pwd)/promql_check"
  path=$(build promql-check "$PROMETHEUS_VERSION-$(cat "$src/main.go" "$src/go.mod" | sha256sum | cut -c1-8)" "$src" .)
  echo "PROMQL_CHECK=$path"
fi
if want helm; then
  helm=$(plain_module helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm)
  # As helm's Makefile does: its version, and the Kubernetes version `helm template` and `lint` assume.
  flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$HELM_KUBE_MINOR"
  done
  path=$(build helm "$HELM_VERSION" "$helm" helm.sh/helm/v3/cmd/helm "$flags")
  echo "HELM=$path"
fi
