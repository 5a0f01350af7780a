#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: apt packages, .venv with the plugin installed, the peers.
# Run as root (the plugin and its tests program network namespaces).
#   scripts/setup.sh          everything the test suite uses (scripts/test.sh)
#   scripts/setup.sh --demo   only what the demo uses: the plugin's packages and the .venv, no Go builds
set -euo pipefail
cd "$(dirname "$0")/.."

demo=0
[ "${1:-}" = "--demo" ] && demo=1

APT_PACKAGES=(
  nftables python3-nftables python3-venv iproute2   # the plugin: libnftables + its official bindings
)
if [ "$demo" = 0 ]; then
  APT_PACKAGES+=(
    containerd runc containernetworking-plugins     # the end-to-end tier: a real CRI runtime and CNI chain
    podman busybox-static                           # the end-to-end tier: libcni through podman's CNI backend
    gcc libc6-dev                                   # the e2e tier builds its pause image from source
    mmdebstrap                                      # install/build-image.sh: a debian:12 base when no registry is reachable
    strace                                          # the crash-safety tier kills the agent at every file-changing syscall
    openssl                                         # the cluster tier makes its CA and the API server's cert
  )
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$demo" = 1 ]; then
  scripts/venv.sh --runtime
  echo "setup: ready for the demo (.venv/bin/cni-redirect)" >&2
  exit 0
fi
scripts/venv.sh
# The real peers and the current runtime (containerd 2.4, crictl, CNI plugins v1.10, istio-cni, pilot-agent) and a
# real Kubernetes for the cluster tier (kubelet, kube-apiserver, kube-controller-manager, kube-scheduler, kine,
# helm), built from the Go module proxy once per machine into a cache outside the repo (scripts/peers.sh).
peers_bin=$(scripts/peers.sh --cluster)
echo "setup: ready (.venv/bin/cni-redirect; peers in $peers_bin)" >&2
