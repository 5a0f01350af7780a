#!/usr/bin/env bash
# The fast loop: lint, the formatter check, mypy over the package, the tests, the benchmarks and the scripts, and the root-free unit tier.
# Needs no root and no apt (scripts/venv.sh makes .venv if it is missing); under a minute here.
# The heavy unit tests (marked slow) and every root tier run in scripts/test.sh, which calls this first.
# Extra arguments go to pytest (e.g. scripts/check.sh -k render).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
if [ ! -w . ]; then  # a tree this user cannot write (a read-only checkout): caches go elsewhere
  cache=$(mktemp -d)
  trap 'rm -rf "$cache"' EXIT
  export RUFF_CACHE_DIR="$cache/ruff" MYPY_CACHE_DIR="$cache/mypy" PYTHONDONTWRITEBYTECODE=1
fi
.venv/bin/ruff check cni_redirect tests scripts bench
.venv/bin/ruff format --check cni_redirect tests scripts bench
.venv/bin/mypy
.venv/bin/python -m pytest -p no:cacheprovider -m "not root and not slow" "$@" tests
