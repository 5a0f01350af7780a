"""The bundle runs with nothing but the kernel, glibc and zlib: a real ADD from a bare chroot.

The runtime execs the compiled front; with no CNI server named, it execs the frozen Python front beside it,
stdin handed over whole (a memfd: nothing else in the chroot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from cni_redirect.testing.netlab import Netns, enabled, plugin_conf

GLIBC_AND_ZLIB = re.compile(r"^(ld-linux.*|libc|libm|libdl|libpthread|librt|libz)\.so(\.\d+)*$")


def _system_libraries(bundle: Path) -> set[Path]:
    """Every shared library outside the bundle that an ELF file inside it needs."""
    needed: set[Path] = set()
    for path in bundle.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.read_bytes()[:4] != b"\x7fELF":
            continue
        # The bootloader itself starts with the system's loader path; it then points the loader
        # at _internal for everything else, and ldd needs the same hint for those.
        env = {} if path.parent == bundle else {"LD_LIBRARY_PATH": str(bundle / "_internal")}
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            match = re.search(r"(/\S+) \(0x", line)
            if match and not match.group(1).startswith(str(bundle)):
                needed.add(Path(match.group(1)))
    return needed


def test_bundle_needs_only_glibc_and_zlib_and_programs_rules_from_a_bare_chroot(bundle, tmp_path, host_unchanged):
    libraries = _system_libraries(bundle)
    assert libraries, "ldd found nothing: the check would prove nothing"
    foreign = sorted(str(p) for p in libraries if not GLIBC_AND_ZLIB.match(p.name))
    assert not foreign, f"the bundle depends on host libraries beyond glibc and zlib: {foreign}"
    assert (bundle / "LICENSES" / "libnftables1.copyright").exists()
    assert (bundle / "LICENSES" / "go.LICENSE").exists() and (bundle / "cni-redirect-py").is_file()
    static = subprocess.run(["ldd", str(bundle / "cni-redirect")], capture_output=True, text=True)
    assert "not a dynamic executable" in static.stdout + static.stderr, "the compiled front needs nothing from the node"
    assert "apt-get source nftables" in (bundle / "LICENSES" / "README").read_text()

    root = tmp_path / "node"
    bin_dir = root / "opt" / "cni" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copytree(bundle, bin_dir / "cni-redirect-bundle-test", symlinks=True)
    (bin_dir / "cni-redirect").symlink_to("cni-redirect-bundle-test/cni-redirect")
    for library in libraries:
        target = root / library.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library.resolve(), target)
    for mount_point in ("proc", "run/netns"):
        (root / mount_point).mkdir(parents=True)
    everything = [str(p.relative_to(root)) for p in root.rglob("*")]
    assert not [p for p in everything if "python" in p and "cni-redirect-bundle" not in p]
    assert not [p for p in everything if "libnftables" in p and "cni-redirect-bundle" not in p]
    assert not (root / "usr").exists() and not (root / "bin").exists()

    pod = Netns.create("pod")
    try:
        for command in ("ADD", "CHECK", "DEL"):
            env = {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": "chroot-test",
                "CNI_NETNS": pod.path,
                "CNI_IFNAME": "eth0",
                "CNI_PATH": "/opt/cni/bin",
            }
            # A private mount namespace: the /proc and /run/netns binds vanish with the process.
            script = (
                f"mount --bind /proc {root}/proc && mount --rbind /run/netns {root}/run/netns && "
                f"exec chroot {root} /opt/cni/bin/cni-redirect"
            )
            proc = subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                input=json.dumps(plugin_conf(enabled())).encode(),
                env=env,
                capture_output=True,
                timeout=60,
            )
            assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
            if command == "ADD":
                assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
                assert "table inet cni_redirect" in pod.ruleset()
        assert "cni_redirect" not in pod.ruleset()
    finally:
        pod.delete()
    assert str(root) not in Path("/proc/self/mountinfo").read_text()
