#!/usr/bin/env bash
# Build the self-contained plugin bundle (PyInstaller one-folder, never one-file: one-file
# unpacks itself to /tmp on every run). Output: <out>/cni-redirect/ with the executable
# `cni-redirect` (the compiled front, install/front: a static Go binary that forwards CNI requests
# to the CNI server and execs the Python front for everything else), the frozen Python front
# `cni-redirect-py`, its `_internal/` (interpreter, our code, pyroute2, pydantic, the nftables
# bindings, libnftables.so.1 and the libraries it links) and `LICENSES/`.
# The node needs only the kernel and glibc >= the build machine's (2.36 on Debian 12).
# Needs Go >= 1.19 (GO=path/to/go to choose one; Debian 12's golang-go will do).
# Usage: install/build-bundle.sh [out-dir]   (default build/bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(realpath -m "${1:-build/bundle}")
WORK=$(realpath -m build/pyinstaller)

# No early exit in awk: with pipefail, ldconfig's SIGPIPE would fail the build.
lib=$(/sbin/ldconfig -p | awk '/libnftables\.so\.1 / && !found {print $NF; found = 1}')
[ -f "$lib" ] || { echo "build-bundle: libnftables.so.1 not found (apt package libnftables1)" >&2; exit 1; }
# Copy under its soname: ctypes asks for libnftables.so.1, not the versioned file it points to.
mkdir -p "$WORK/libs" && cp -L "$lib" "$WORK/libs/libnftables.so.1"

"$PY" -m PyInstaller --version >/dev/null 2>&1 || "$PY" -m pip install -q --disable-pip-version-check "pyinstaller>=6,<7"

install/front/build.sh "$WORK/front/cni-redirect"  # first: a missing Go fails the build before PyInstaller runs
rm -rf "$OUT/cni-redirect"
CNIR_LIBNFTABLES="$WORK/libs/libnftables.so.1" "$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath "$OUT" --workpath "$WORK" install/cni-redirect.spec
cp "$WORK/front/cni-redirect" "$OUT/cni-redirect/cni-redirect"

# libnftables is GPL-2.0: ship its license and where its source is, with those of every
# shared library the bundle carries from the build machine's packages.
licenses="$OUT/cni-redirect/LICENSES"
mkdir -p "$licenses"
find "$OUT/cni-redirect/_internal" -maxdepth 1 -name 'lib*.so*' -printf '%f\n' | while read -r so; do
  pkg=$(dpkg -S "*/$so" 2>/dev/null | awk -F: 'NR == 1 {print $1}') || true
  if [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ]; then
    cp "/usr/share/doc/$pkg/copyright" "$licenses/$pkg.copyright"
  fi
done
cat > "$licenses/README" <<TXT
This bundle contains libnftables.so.1 from Debian package libnftables1 $(dpkg-query -W -f='${Version}' libnftables1),
licensed GPL-2.0 (see libnftables1.copyright). Its complete source is the Debian source package
"nftables" of that version (apt-get source nftables), and upstream at https://netfilter.org/projects/nftables/.
The other *.copyright files cover the shared libraries shipped next to it. The executable cni-redirect
is compiled Go: the Go runtime and standard library it contains are BSD-3-Clause (go.LICENSE). The Python interpreter
is covered by the Python Software Foundation License; pyroute2 (Apache-2.0/GPL-2.0+ dual), pydantic
(MIT) and the nftables Python bindings (GPL-2.0) are included as Python modules.
TXT
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
goroot=$("$GO" env GOROOT)  # an upstream toolchain has LICENSE there; Debian's golang-go ships its copyright file
for license in "$goroot/LICENSE" "$goroot/../LICENSE" /usr/share/doc/golang-*-go/copyright /usr/share/doc/golang-go/copyright; do
  [ -f "$license" ] && { cp "$license" "$licenses/go.LICENSE"; break; }
done
[ -f "$licenses/go.LICENSE" ] || { echo "build-bundle: the Go toolchain's license was not found (GOROOT $goroot)" >&2; exit 1; }
echo "build-bundle: $OUT/cni-redirect ($(du -sh "$OUT/cni-redirect" | cut -f1))" >&2
