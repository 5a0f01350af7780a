#!/usr/bin/env bash
# The fast loop: lint, the formatter check, mypy over the package, the tests, the benchmarks and the scripts,
# gofmt and go vet over the compiled front (install/front), and the root-free unit tier.
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
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[ -x "$GO" ] || { echo "check: go not found (Go >= 1.19 builds the compiled front; set GO=)" >&2; exit 1; }
unformatted=$("$(dirname "$GO")/gofmt" -l install/front)
[ -z "$unformatted" ] || { echo "check: gofmt would change: $unformatted" >&2; exit 1; }
(cd install/front && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false "$GO" vet .)
.venv/bin/python -m pytest -p no:cacheprovider -m "not root and not slow" "$@" tests
