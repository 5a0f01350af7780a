#!/usr/bin/env bash
# Build the node agent's image with podman. The Containerfile starts FROM debian:12: when the
# registry has it, podman uses it; when no registry is reachable, a minimal Debian 12 is made
# from Debian's archive (mmdebstrap, ~20 s) and imported under the same name, and kept in
# podman's storage, so later builds reuse it. Says which base it used.
# Usage: install/build-image.sh [TAG]   (default localhost/cni-redirect:0.1.0)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/cni-redirect:0.1.0}
BASE=docker.io/library/debian:12
if podman image exists "$BASE"; then
  echo "build-image: base $BASE: already in podman's storage (registry or an earlier local build)" >&2
elif timeout 30 podman pull -q "$BASE" >/dev/null 2>&1; then
  echo "build-image: base $BASE: pulled from the registry" >&2
else
  command -v mmdebstrap >/dev/null || { echo "build-image: no registry and no mmdebstrap (apt package mmdebstrap)" >&2; exit 1; }
  tar=$(mktemp --suffix=.tar)
  trap 'rm -f "$tar"' EXIT
  mmdebstrap --quiet --variant=minbase bookworm "$tar"
  podman import --quiet "$tar" "$BASE" >/dev/null
  echo "build-image: base $BASE: no registry reachable, built from Debian's archive with mmdebstrap" >&2
fi
cert=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then  # a machine whose HTTPS goes through a CA of its own
  cert=(--volume "$PIP_CERT:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
podman build --quiet --network host "${cert[@]}" -f install/Containerfile -t "$TAG" . >/dev/null
echo "build-image: $TAG ($(podman image inspect --format '{{.Size}}' "$TAG") bytes)" >&2
