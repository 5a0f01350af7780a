"""Build the sandbox (pause) image from source as an OCI image-layout tar, with the standard library only."""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: The agent's image, as the README builds it; the DaemonSet tier, the cluster tier and the pod-start bench use it.
AGENT_IMAGE = "localhost/cni-redirect:0.1.0"
IMAGE_STORE = REPO / "build" / "image-store"  # podman's storage for the image: cached between runs here
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _blob(tar: tarfile.TarFile, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest[7:]}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"digest": digest, "size": len(data)}


def _file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_pause_image(workdir: Path, name: str) -> Path:
    """Compile pause.c statically and pack it as image `name`; return the tar's path."""
    binary = workdir / "pause"
    subprocess.run(["gcc", "-static", "-Os", "-o", str(binary), str(HERE / "pause.c")], check=True)

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        info = layer.gettarinfo(str(binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        with binary.open("rb") as handle:
            layer.addfile(info, handle)
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()

    out = workdir / "pause-image.tar"
    with tarfile.open(out, mode="w") as tar:
        layer_desc = _blob(tar, layer_bytes)
        config = {
            "architecture": ARCH,
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        config_desc = _blob(tar, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
        }
        manifest_desc = _blob(tar, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    **manifest_desc,
                    "platform": {"architecture": ARCH, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                    },
                }
            ],
        }
        _file(tar, "index.json", json.dumps(index).encode())
        _file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    return out


def storage_env() -> dict[str, str]:
    """podman's environment with the image store of the repo's build dir."""
    import os

    IMAGE_STORE.mkdir(parents=True, exist_ok=True)
    conf = IMAGE_STORE / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{IMAGE_STORE}/graph"\nrunroot = "{IMAGE_STORE}/run"\n'
    )
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}
