#!/usr/bin/env bash
# Fuzz the annotation and config parsers with atheris (not part of CI). Extra args go to libFuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -c "import atheris" 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check atheris
mkdir -p build/fuzz-corpus
exec .venv/bin/python scripts/fuzz_config.py build/fuzz-corpus -max_total_time=60 "$@"
