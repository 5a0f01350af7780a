#!/usr/bin/env bash
# Builds the real peers and the current runtime from the Go module proxy, once per machine, into a cache outside
# the repo (PEERS_DIR, default /var/cache/cni-redirect/peers). Each pinned module has its own folder named by its
# version, so changing a pin below rebuilds only that one; a finished folder has a .done stamp.
# Prints the peers' bin dir on stdout; build times go to stderr and to <dir>/build-times.tsv.
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-/var/cache/cni-redirect/peers}"

# module  version  build-tags  commands...
PINS=(
  "github.com/containerd/containerd/v2|v2.4.2|no_btrfs|cmd/containerd cmd/containerd-shim-runc-v2"
  "sigs.k8s.io/cri-tools|v1.37.0||cmd/crictl"
  "github.com/containernetworking/plugins|v1.10.0||plugins/main/bridge plugins/ipam/host-local plugins/main/loopback plugins/meta/portmap"
  "istio.io/istio|v0.0.0-20260827124520-eed52ebb66ad||cni/cmd/istio-cni pilot/cmd/pilot-agent"
)

command -v go >/dev/null || { echo "peers: go is not installed (this machine kind ships Go 1.26)" >&2; exit 1; }
mkdir -p "$PEERS_DIR/bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED="${CGO_ENABLED:-1}"

for pin in "${PINS[@]}"; do
  IFS='|' read -r module version tags cmds <<<"$pin"
  dest="$PEERS_DIR/$(echo "$module" | tr '/' '_')@$version"
  if [ ! -f "$dest/.done" ]; then
    rm -rf "$dest"; mkdir -p "$dest"
    start=$(date +%s)
    for cmd in $cmds; do
      echo "peers: building $module/$cmd@$version" >&2
      GOBIN="$dest" go install ${tags:+-tags "$tags"} -trimpath "$module/$cmd@$version" >&2
    done
    took=$(( $(date +%s) - start ))
    printf '%s\t%s\t%ss\t%s\n' "$module" "$version" "$took" "$(date -u +%FT%TZ)" >>"$PEERS_DIR/build-times.tsv"
    echo "peers: $module@$version built in ${took}s" >&2
    touch "$dest/.done"
  fi
  for bin in "$dest"/*; do ln -sfn "$bin" "$PEERS_DIR/bin/$(basename "$bin")"; done
done
echo "$PEERS_DIR/bin"
