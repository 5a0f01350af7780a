"""podman 4.3 with its CNI backend (libcni 1.1), all of its state under one temp dir.

podman is an independent CNI client: it calls VERSION with dummy env each
time it loads networks, sends no namespace and no annotations, and runs DEL
without prevResult after a failed ADD. Capture must come from conflist defaults.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from cni_redirect.testing.netlab import PLUGIN

IMAGE = "localhost/cnir-busybox:e2e"
BUSYBOX_APPLETS = ("sh", "sleep", "true", "cat", "ls", "echo")


@dataclass
class Podman:
    workdir: Path
    networks: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        d = self.workdir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CONTAINERS_CONF": str(d / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(d / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(d / "registries.conf"),
        }

    @property
    def conf_dir(self) -> Path:
        return self.workdir / "cni-conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "cni-redirect.log"

    def start(self) -> None:
        assert shutil.which("podman"), "podman is missing: run scripts/setup.sh (apt package podman)"
        assert Path("/bin/busybox").exists(), "busybox is missing: run scripts/setup.sh (apt package busybox-static)"
        d = self.workdir
        bin_dir = d / "cni-bin"
        for directory in (bin_dir, self.conf_dir, d / "tmp"):
            directory.mkdir(parents=True)
        for plugin in Path("/usr/lib/cni").iterdir():
            (bin_dir / plugin.name).symlink_to(plugin)
        (bin_dir / "cni-redirect").symlink_to(PLUGIN)
        (d / "containers.conf").write_text(
            f"""[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin_dir}"]
network_config_dir = "{self.conf_dir}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "{d}/tmp"
"""
        )
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{d}/graph"\nrunroot = "{d}/run"\n'
        )
        (d / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.podman("import", "--change", 'CMD ["/bin/sh"]', str(self._busybox_rootfs()), IMAGE)

    def _busybox_rootfs(self) -> Path:
        out = self.workdir / "busybox-rootfs.tar"
        with tarfile.open(out, "w") as tar:
            tar.add("/bin/busybox", arcname="bin/busybox")
            for applet in BUSYBOX_APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                tar.addfile(link)
            for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return out

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def create_network(self, name: str, subnet: str, cni_version: str | None = None, **entry: object) -> Path:
        """`podman network create`, then append our entry to the conflist podman wrote."""
        self.podman("network", "create", "--subnet", subnet, name)
        self.networks.append(name)
        path = self.conf_dir / f"{name}.conflist"
        document = json.loads(path.read_text())
        if cni_version:
            document["cniVersion"] = cni_version
        document["plugins"].append(
            {
                "type": "cni-redirect",
                "capabilities": {"io.kubernetes.cri.pod-annotations": True},
                "log_file": str(self.log_path),
                **entry,
            }
        )
        path.write_text(json.dumps(document, indent=2))
        return path

    def sandbox(self, container: str) -> str:
        return self.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", container).stdout.strip()

    def ip(self, container: str, network: str) -> str:
        fmt = f"{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"
        return self.podman("inspect", "--format", fmt, container).stdout.strip()

    def all_events(self) -> list[dict]:
        """Every command our plugin logged, oldest first."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def events(self, container_id: str) -> list[dict]:
        return [e for e in self.all_events() if container_id.startswith(e.get("container_id") or "-")]

    def stop(self) -> None:
        self.podman("rm", "--all", "--force", "--time", "0", check=False)
        for name in self.networks:
            self.podman("network", "rm", "--force", name, check=False)
        with open("/proc/self/mountinfo") as handle:
            points = [line.split()[4] for line in handle if line.split()[4].startswith(str(self.workdir))]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
