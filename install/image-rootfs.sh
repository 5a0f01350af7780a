#!/bin/sh
# The final image's whole root filesystem: the bundle at /opt/cni-redirect/bundle/cni-redirect and,
# at their own paths, exactly the system libraries that `ldd` says an ELF file in it needs (glibc
# and zlib on Debian 12), with the dynamic loader. POSIX sh: runs in the build stage of the image.
# Usage: install/image-rootfs.sh BUNDLE_DIR ROOTFS
set -eu
bundle=$1
rootfs=$2
mkdir -p "$rootfs/opt/cni-redirect/bundle"
cp -a "$bundle" "$rootfs/opt/cni-redirect/bundle/"
libs=$(
  find "$bundle" -type f | while read -r file; do
    [ "$(head -c 4 "$file" | od -An -c | tr -d ' \n')" = "177ELF" ] || continue
    # The bootloader starts before it points the loader at _internal: its own needs come from the system.
    if [ "$(dirname "$file")" = "$bundle" ]; then ldd "$file" 2>/dev/null || true
    else LD_LIBRARY_PATH="$bundle/_internal" ldd "$file" 2>/dev/null || true; fi
  done | awk '/=> \// {print $3} /^\t\/[^ ]*ld-linux/ {print $1}' | grep -v "^$bundle" | sort -u
)
for lib in $libs; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
echo "image-rootfs: bundle plus $(echo "$libs" | wc -w) system libraries: $(echo $libs)" >&2
