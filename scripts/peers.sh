#!/usr/bin/env bash
# Builds the real peers and the current runtime from the Go module proxy, once per machine, into a cache outside
# the repo (PEERS_DIR, default /var/cache/cni-redirect/peers). Each pinned module has its own folder named by its
# version, so changing a pin below rebuilds only that one; a finished folder has a .done stamp.
# Prints the peers' bin dir on stdout; build times go to stderr and to <dir>/build-times.tsv.
#   scripts/peers.sh            the peers of the containerd, istio-cni and loader tiers
#   scripts/peers.sh --cluster  also a real single-node Kubernetes (kubelet, API server, controllers, scheduler),
#                               its store (kine) and helm
set -euo pipefail
cluster=0
[ "${1:-}" = "--cluster" ] && cluster=1

PEERS_DIR="${PEERS_DIR:-/var/cache/cni-redirect/peers}"

# module  version  build-tags  commands...  [cgo: 0 for a pure-Go build]
PINS=(
  "github.com/containerd/containerd/v2|v2.4.2|no_btrfs|cmd/containerd cmd/containerd-shim-runc-v2"
  "sigs.k8s.io/cri-tools|v1.37.0||cmd/crictl"
  "github.com/containernetworking/plugins|v1.10.0||plugins/main/bridge plugins/main/ptp plugins/ipam/host-local plugins/main/loopback plugins/meta/portmap"
  "istio.io/istio|v0.0.0-20260827124520-eed52ebb66ad||cni/cmd/istio-cni pilot/cmd/pilot-agent"
)

# Kubernetes itself: k8s.io/kubernetes replaces its staging modules with ./staging paths, which its module zip
# lacks, so `go install` refuses it. A wrapper module requires it and points each staging module at its
# published v0.<minor>.<patch> instead (the list is read from k8s.io/kubernetes's own go.mod).
KUBERNETES_VERSION=v1.37.2
KUBERNETES_CMDS="kubelet kube-apiserver kube-controller-manager kube-scheduler"
CLUSTER_PINS=(
  "github.com/k3s-io/kine|v0.17.5||.|0"   # pure-Go sqlite
  "helm.sh/helm/v4|v4.3.2||cmd/helm"
)

command -v go >/dev/null || { echo "peers: go is not installed (this machine kind ships Go 1.26)" >&2; exit 1; }
mkdir -p "$PEERS_DIR/bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED="${CGO_ENABLED:-1}"

build_kubernetes() {  # dest
  local dest=$1 work staging minor staged
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  minor=v0.${KUBERNETES_VERSION#v1.}
  ( cd "$work" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" ) >"$work/dl.json"
  gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' "$work/dl.json")
  staging=$(sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*|\1|p' "$gomod")
  {
    echo "module cni-redirect.local/kubernetes-peers"
    echo; echo "go 1.26.0"; echo; echo "godebug default=go1.26"; echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    for staged in $staging; do echo "replace $staged => $staged $minor"; done
  } >"$work/go.mod"
  printf 'package tools\n\nimport (\n' >"$work/tools.go"
  for cmd in $KUBERNETES_CMDS; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd" >>"$work/tools.go"; done
  printf ')\n' >>"$work/tools.go"
  sed -i '1i //go:build tools\n' "$work/tools.go"
  ( cd "$work" && go mod tidy -e >&2 )
  local k8s_minor=${KUBERNETES_VERSION#v1.}
  k8s_minor=${k8s_minor%%.*}
  local stamp="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
  stamp+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$k8s_minor"
  for cmd in $KUBERNETES_CMDS; do
    echo "peers: building k8s.io/kubernetes/cmd/$cmd@$KUBERNETES_VERSION" >&2
    ( cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$stamp" -o "$dest/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2 )
  done
}

if [ "$cluster" = 1 ]; then
  PINS+=("${CLUSTER_PINS[@]}" "k8s.io/kubernetes|$KUBERNETES_VERSION||(wrapper)")
fi

# The loader harnesses (tests/loaders): the runtimes' own CNI loaders as Go modules, built from this repo's
# sources (cached by their content): containerd's go-cni v1.1.14 over libcni v1.3.1 (containerd v2.4.2's pins)
# and CRI-O's ocicni v0.4.3 over libcni v1.3.0 (CRI-O v1.34.0's pins).
build_loaders() {
  local root hash dest start took loader
  root="$(cd "$(dirname "$0")/.." && pwd)/tests/loaders"
  [ -d "$root" ] || { echo "peers: $root is missing (run from the repo root)" >&2; exit 1; }
  hash=$(cd "$root" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) -print0 | sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)
  dest="$PEERS_DIR/cni-redirect-loaders@$hash"
  if [ ! -f "$dest/.done" ]; then
    rm -rf "$dest"; mkdir -p "$dest"
    start=$(date +%s)
    for loader in containerd crio; do
      echo "peers: building the $loader loader harness ($root/$loader)" >&2
      ( cd "$root/$loader" && GOFLAGS=-mod=readonly go build -trimpath -o "$dest/cnir-loader-$loader" . >&2 )
    done
    took=$(( $(date +%s) - start ))
    printf '%s\t%s\t%ss\t%s\n' "cni-redirect/tests/loaders" "$hash" "$took" "$(date -u +%FT%TZ)" >>"$PEERS_DIR/build-times.tsv"
    touch "$dest/.done"
  fi
  for bin in "$dest"/cnir-loader-*; do ln -sfn "$bin" "$PEERS_DIR/bin/$(basename "$bin")"; done
}
build_loaders

for pin in "${PINS[@]}"; do
  IFS='|' read -r module version tags cmds cgo <<<"$pin"
  dest="$PEERS_DIR/$(echo "$module" | tr '/' '_')@$version"
  complete=1
  if [ "$cmds" != "(wrapper)" ]; then  # a command added to a pin rebuilds its folder
    for cmd in $cmds; do
      name=$(basename "$cmd"); [ "$cmd" = "." ] && name=$(basename "$module")
      [ -e "$dest/$name" ] || complete=0
    done
  fi
  if [ ! -f "$dest/.done" ] || [ "$complete" = 0 ]; then
    rm -rf "$dest"; mkdir -p "$dest"
    start=$(date +%s)
    if [ "$cmds" = "(wrapper)" ]; then
      build_kubernetes "$dest"
    else
      for cmd in $cmds; do
        echo "peers: building $module/$cmd@$version" >&2
        target="$module/$cmd"; [ "$cmd" = "." ] && target=$module
        GOBIN="$dest" CGO_ENABLED="${cgo:-$CGO_ENABLED}" go install ${tags:+-tags "$tags"} -trimpath "$target@$version" >&2
      done
    fi
    took=$(( $(date +%s) - start ))
    printf '%s\t%s\t%ss\t%s\n' "$module" "$version" "$took" "$(date -u +%FT%TZ)" >>"$PEERS_DIR/build-times.tsv"
    echo "peers: $module@$version built in ${took}s" >&2
    touch "$dest/.done"
  fi
  for bin in "$dest"/*; do ln -sfn "$bin" "$PEERS_DIR/bin/$(basename "$bin")"; done
done
echo "$PEERS_DIR/bin"
