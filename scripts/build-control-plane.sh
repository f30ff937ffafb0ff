#!/usr/bin/env bash
# Build the test control plane (controlplane/, docs/control-plane.md) if it is not built yet, and
# print the folder that holds it:
#   bin/        controlplane (the driver), kube-apiserver, kube-controller-manager, etcd
#   crds/       KServe's CRDs, the Gateway API's, Knative Serving's, Istio's VirtualService
#   webhooks/   KServe's webhook configurations
#   config/     KServe's inferenceservice-config ConfigMap
# Everything comes from the Go module proxy, at the versions controlplane/go.sum pins. The folder
# is a cache entry outside the repository, keyed by a hash of the Go version, controlplane/'s
# sources and this script: a fresh clone on the same machine reuses it, a changed go.sum builds a
# new one. Entries unused for 14 days are removed.
#
# Environment: FINESERVE_CONTROLPLANE_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/fineserve/controlplane).
# Exit status 3: Go is not installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/controlplane

command -v go >/dev/null 2>&1 || {
  echo "build-control-plane: no 'go' command; the control plane is built from Go modules" >&2
  exit 3
}
key=$(cd "$src" && { go version; cat go.mod go.sum ./*.go "$root/scripts/build-control-plane.sh"; } \
  | sha256sum | cut -c1-16)
cache=${FINESERVE_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fineserve/controlplane}
dest=$cache/$key
mkdir -p "$cache"
find "$cache" -mindepth 1 -maxdepth 1 -type d -mtime +14 ! -name "$key" -exec rm -rf {} + 2>/dev/null || true
if [ -x "$dest/bin/controlplane" ]; then
  touch "$dest"
  echo "$dest"
  exit 0
fi

echo "build-control-plane: building into $dest (the first build takes a while)" >&2
started=$SECONDS
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$src"
# The API server reports its release as a release build does (k8s.io/component-base/version).
k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
nice -n 10 go build -trimpath -buildvcs=false -ldflags "$ldflags" -o "$work/bin/" . \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  go.etcd.io/etcd/server/v3
mv "$work/bin/server" "$work/bin/etcd" # go.etcd.io/etcd/server/v3 is etcd's own main package

dir() { go list -m -f '{{.Dir}}' "$1"; }
kserve=$(dir github.com/kserve/kserve)
mkdir -p "$work/crds" "$work/webhooks" "$work/config"
# The CRDs of KServe's default install (config/crd/full/kustomization.yaml: the InferenceService
# family and ClusterStorageContainer; not the LLMInferenceService or LocalModel ones).
cp "$kserve"/config/crd/full/serving.kserve.io_*.yaml \
  "$kserve"/config/crd/full/clusterstoragecontainer/serving.kserve.io_*.yaml "$work/crds/"
# The Istio VirtualService CRD KServe's own controller tests install (Serverless mode writes one).
cp "$kserve/test/crds/istio_virtualservice.yaml" "$work/crds/"
cp "$(dir sigs.k8s.io/gateway-api)"/config/crd/standard/gateway.networking.k8s.io_*.yaml "$work/crds/"
rm -f "$work/crds/gateway.networking.k8s.io_vap_safeupgrades.yaml" # a policy, not a CRD
for f in "$(dir knative.dev/serving)"/config/core/300-resources/*.yaml; do
  cp "$f" "$work/crds/knative-serving_$(basename "$f")"
done
cp "$kserve/config/webhook/manifests.yaml" "$work/webhooks/kserve.yaml"
cp "$kserve/config/configmap/inferenceservice.yaml" "$work/config/"
chmod -R u+w "$work" # the module cache is read-only
mv -T "$work" "$dest" 2>/dev/null || rm -rf "$work" # another build may have finished first
trap - EXIT
echo "build-control-plane: built in $((SECONDS - started)) s" >&2
echo "$dest"
