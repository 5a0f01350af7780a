#!/bin/sh
# Build the compiled front (this directory) into OUT: static (no cgo), no VCS stamp (the image builds
# it without .git), with the toolchain found here, never a downloaded one. Go >= 1.19: GO=path/to/go
# to choose one (default: go on PATH, else /usr/local/go/bin/go).
# Usage: install/front/build.sh OUT
set -eu
out=$(realpath -m "$1")
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[ -x "$GO" ] || { echo "front/build.sh: go not found (Go >= 1.19 builds the compiled front; set GO=)" >&2; exit 1; }
cd "$(dirname "$0")"
CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false "$GO" build -trimpath -ldflags=-s -o "$out" .
