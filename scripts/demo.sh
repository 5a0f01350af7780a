#!/usr/bin/env bash
# Demo of the real job: a pod netns, the plugin invoked as a runtime invokes it, a request captured.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: must run as root (it creates network namespaces)" >&2
  exit 1
fi
scripts/setup.sh --demo   # apt + .venv only: the demo builds nothing
exec .venv/bin/python scripts/demo.py
