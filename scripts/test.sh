#!/usr/bin/env bash
# The whole test suite: lint, unit, real-netns and end-to-end tiers. Needs root; never skips.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/e2e -k concurrent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test: must run as root (network namespaces, nftables, containerd)" >&2
  exit 1
fi
scripts/setup.sh
.venv/bin/ruff check cni_redirect tests scripts bench
.venv/bin/ruff format --check cni_redirect tests scripts bench
exec .venv/bin/python -m pytest "${@:-tests}"
