#!/usr/bin/env bash
# The project's .venv: Debian's python with system site-packages (for python3-nftables, when
# installed), the package in editable mode and the pinned test tools. No root, no apt: idempotent,
# reinstalls only when pyproject.toml changes. scripts/setup.sh and scripts/check.sh call it.
#   scripts/venv.sh            the package and the test tools
#   scripts/venv.sh --runtime  the package alone (the demo): no linters, no test runner
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[test]"
[ "${1:-}" = "--runtime" ] && extras=""

# The nftables bindings exist only as Debian's python3-nftables (they must match the host's
# libnftables), so the venv is made from Debian's python with system site-packages visible.
want_nftables=0
/usr/bin/python3 -c "import nftables" 2>/dev/null && want_nftables=1
if [ ! -x .venv/bin/python ] || { [ "$want_nftables" = 1 ] && ! .venv/bin/python -c "import nftables" 2>/dev/null; }; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
hash=$(sha256sum pyproject.toml | cut -c1-16)
full=.venv/.installed-$hash-test
stamp=.venv/.installed-$hash-${extras:+test}${extras:-runtime}
if [ ! -f "$stamp" ] && [ ! -f "$full" ] || [ ! -x .venv/bin/cni-redirect ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
  [ -n "$extras" ] && rm -f .venv/.installed-*
  touch "$stamp"
fi
