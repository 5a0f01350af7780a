#!/usr/bin/env bash
# Regenerate the committed CRI stubs from cni_redirect/cri/runtime.proto (our own subset of
# k8s.io/cri-api runtime.v1, field numbers as upstream), with type stubs (.pyi) for mypy.
# tests/test_cri.py fails when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. cni_redirect/cri/runtime.proto
