#!/usr/bin/env bash
# Benchmarks (not part of CI): builds the bundle, then writes docs/benchmarks.md, .svg and .json.
# Extra args go to bench/bench.py (e.g. --runs 50 for a quick look). Takes about 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: must run as root" >&2; exit 1; }
scripts/setup.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check matplotlib
# /usr/bin/time for peak RSS; haproxy, nginx and wrk for the datapath side by side (bench/datapath.py)
for tool in /usr/bin/time:time /usr/sbin/haproxy:haproxy /usr/sbin/nginx:nginx-light /usr/bin/wrk:wrk; do
  [ -x "${tool%%:*}" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null
done
install/build-bundle.sh build/bundle
exec .venv/bin/python bench/bench.py "$@"
