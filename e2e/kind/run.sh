#!/usr/bin/env bash
# moecluster on a local kind cluster, end to end, in one command:
#   kind cluster (host folder MODELS_DIR = the node's /models)
#   -> docker build with the tiny model baked in -> kind load -> helm install
#   -> the tiny MoECluster (model from the image) -> wait Ready -> exit.
#
#   e2e/kind/run.sh              # create, check, delete the cluster
#   KEEP=1 e2e/kind/run.sh       # keep the cluster (and the MoECluster) to poke at
#
# Environment: CLUSTER (kind cluster name, default moecluster-e2e), IMAGE
# (default moecluster:e2e), SKIP_BUILD=1 (IMAGE exists already), NAMESPACE
# (default moecluster-system), MODELS_DIR (the node's /models, default
# ~/.cache/moecluster/kind-models), TIMEOUT (kubectl wait, default 10m), KEEP=1.
# On failure it prints every object, descriptions and the operator's and
# workers' logs before cleaning up.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CLUSTER="${CLUSTER:-moecluster-e2e}"
IMAGE="${IMAGE:-moecluster:e2e}"
NAMESPACE="${NAMESPACE:-moecluster-system}"
RELEASE="${RELEASE:-moecluster}"
TIMEOUT="${TIMEOUT:-10m}"
KEEP="${KEEP:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
context="kind-$CLUSTER"
models="${MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moecluster/kind-models}"
workdir="$(mktemp -d)"

log() { echo "run.sh: $*" >&2; }

for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null || { log "$tool is not installed"; exit 3; }
done
docker info >/dev/null 2>&1 || { log "no Docker engine (docker info failed)"; exit 3; }

k() { kubectl --context "$context" "$@"; }

dump() {
  log "FAILED; the cluster as it is:"
  set +e
  k get all,moeclusters,events -A -o wide
  k describe moeclusters -A
  k -n "$NAMESPACE" describe deployment,pods
  k -n default describe pods
  log "operator logs:"
  k -n "$NAMESPACE" logs -l app.kubernetes.io/component=operator --all-containers --tail=500 --prefix
  k -n "$NAMESPACE" logs -l app.kubernetes.io/component=operator --all-containers --tail=200 --prefix --previous
  log "worker and frontend logs:"
  for pod in $(k -n default get pods -l app.kubernetes.io/name=moecluster -o name); do
    k -n default logs "$pod" --all-containers --tail=200 --prefix
  done
  set -e
}

created=0
cleanup() {
  local rc=$?
  [[ $rc -ne 0 ]] && dump
  rm -rf "$workdir"
  if [[ "$KEEP" == "1" ]]; then
    log "KEEP=1: cluster $CLUSTER kept (kubectl --context $context ...; kind delete cluster --name $CLUSTER)"
  elif [[ $created == 1 ]]; then
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. The cluster, with the host's e2e/kind/models at the node's /models.
mkdir -p "$models"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing kind cluster $CLUSTER"
else
  log "creating kind cluster $CLUSTER"
  sed "s#MODELS_DIR#$models#" "$here/kind-config.yaml" > "$workdir/kind-config.yaml"
  created=1
  kind create cluster --name "$CLUSTER" --config "$workdir/kind-config.yaml" --wait 3m
fi

# 2. The image, with /models/tiny-mixtral baked in, loaded onto the node.
if [[ "$SKIP_BUILD" != "1" ]]; then
  log "building $IMAGE (TINY_MODEL=1)"
  docker build --build-arg TINY_MODEL=1 -t "$IMAGE" "$root"
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

# 3. The chart: the operator runs the loaded image and gives it to workers and frontends.
log "helm install $RELEASE"
helm upgrade --install "$RELEASE" "$root/helm/moecluster" --kube-context "$context" \
  --namespace "$NAMESPACE" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --wait --timeout "$TIMEOUT"

# 4. examples/moecluster-tiny.yaml with the model from the image: the same
# resource without spec.model.volume (model.path is then inside the image).
awk '/^    volume:/ {skip = 1; next} skip && /^      / {next} {skip = 0; print}' \
  "$root/examples/moecluster-tiny.yaml" > "$workdir/tiny.yaml"
grep -qE "^ +volume:" "$workdir/tiny.yaml" && { log "could not drop spec.model.volume"; exit 1; }
k -n default apply -f "$workdir/tiny.yaml"
log "waiting for moecluster/tiny to be Ready (up to $TIMEOUT)"
k -n default wait moecluster/tiny --for=condition=Ready --timeout "$TIMEOUT"
k -n default get moecluster tiny -o wide
k -n default get pods -l app.kubernetes.io/name=moecluster -o wide

if [[ "$KEEP" != "1" ]]; then
  # Delete the MoECluster while the operator runs, so it removes its finalizer.
  k -n default delete moecluster tiny --wait --timeout 3m
fi
log "OK: moecluster/tiny is Ready on kind cluster $CLUSTER"
