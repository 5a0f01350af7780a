#!/usr/bin/env bash
# The whole test suite: scripts/check.sh (lint, types, the unit tier), then the heavy unit tests and
# every root tier (real netns, the kernel's nftables, containerd). Needs root; never skips.
# Extra arguments go to the second pytest run only (e.g. scripts/test.sh tests/e2e -k concurrent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test: must run as root (network namespaces, nftables, containerd)" >&2
  exit 1
fi
scripts/setup.sh
scripts/check.sh
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -m "root or slow" tests
