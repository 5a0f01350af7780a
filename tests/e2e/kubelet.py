"""What kubelet does with the DaemonSet's pod template, done through CRI by test code.

`translate` turns the rendered pod template into a sandbox and a container
config and fails loudly on any field it does not translate: a manifest
change can never be silently ignored here. Host paths are mapped onto the
test node (the private containerd's CNI dirs and socket); everything else
keeps its real path, as on a node.
"""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_redirect.cri import pb


class Untranslated(AssertionError):
    """The template holds something this kubelet stand-in does not do: teach it, do not ignore it."""


def _take(obj: dict, key: str, where: str, default=None):
    return obj.pop(key) if key in obj else default


def _done(obj: dict, where: str) -> None:
    if obj:
        raise Untranslated(f"{where}: not translated: {sorted(obj)}")


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


@dataclass
class Probe:
    """An httpGet probe (path, port) or an exec probe (command, run in the container through CRI ExecSync)."""

    path: str
    port: int
    period: float
    failure_threshold: int = 3
    command: list[str] = field(default_factory=list)
    timeout: float = 1.0


@dataclass
class PodRun:
    """A translated pod: the configs to send, the probes to poll, and what the node had to prepare."""

    sandbox: Any  # runtime_pb2.PodSandboxConfig
    container: Any  # runtime_pb2.ContainerConfig
    readiness: Probe
    liveness: Probe | None
    grace_seconds: int
    prepared: list[Path] = field(default_factory=list)


def translate(template: dict, configmaps: dict[str, dict], node_paths: dict[str, Path], workdir: Path) -> PodRun:
    template = copy.deepcopy(template)
    metadata = _take(template, "metadata", "template", {})
    labels = _take(metadata, "labels", "metadata", {})
    annotations = _take(metadata, "annotations", "metadata", {})  # the kubelet hands them to the sandbox
    _done(metadata, "template.metadata")
    spec = _take(template, "spec", "template")
    _done(template, "template")

    # Scheduling and API concerns have no node-side effect here, and are named so, not ignored.
    _take(spec, "priorityClassName", "spec")  # scheduling priority: no effect on a node's runtime
    _take(spec, "tolerations", "spec")  # scheduling: the pod runs on this node by construction
    _take(spec, "serviceAccountName", "spec")  # only matters through a token, and there is none:
    if _take(spec, "automountServiceAccountToken", "spec") is not False:
        raise Untranslated("spec.automountServiceAccountToken must be false: this tier mounts no API token")
    host_network = _take(spec, "hostNetwork", "spec", False)
    grace = int(_take(spec, "terminationGracePeriodSeconds", "spec", 30))
    (container,) = _take(spec, "containers", "spec")
    volumes = {v["name"]: v for v in _take(spec, "volumes", "spec", [])}
    _done(spec, "template.spec")

    name = f"cni-redirect-node-{uuid.uuid4().hex[:6]}"
    sandbox = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace="cni-redirect"),
        hostname="" if host_network else name,
        log_directory=str(workdir / "pod-logs"),
        labels=labels,
        annotations=annotations,
        linux=pb.LinuxPodSandboxConfig(cgroup_parent="/cnir-e2e"),
    )
    if host_network:
        sandbox.linux.security_context.namespace_options.network = pb.NODE

    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=_take(container, "name", "container")))
    config.image.image = _take(container, "image", "container")
    if _take(container, "imagePullPolicy", "container") not in ("IfNotPresent", "Never"):
        raise Untranslated("imagePullPolicy: this tier has no registry; the image is imported beforehand")
    config.command.extend(_take(container, "command", "container", []))
    config.args.extend(_take(container, "args", "container", []))
    for variable in _take(container, "env", "container", []):
        value = variable.pop("value")
        key = variable.pop("name")
        _done(variable, f"env {key}")
        config.envs.add(key=key, value=value)
    config.log_path = "install.log"

    resources = _take(container, "resources", "container", {})
    linux_resources = config.linux.resources
    limits, requests = resources.pop("limits", {}), resources.pop("requests", {})
    if "memory" in limits:
        linux_resources.memory_limit_in_bytes = _quantity_bytes(limits.pop("memory"))
    if "cpu" in requests:
        milli = int(str(requests.pop("cpu")).removesuffix("m"))
        linux_resources.cpu_shares = max(2, milli * 1024 // 1000)
    requests.pop("memory", None)  # a scheduling request: no cgroup setting for it
    _done(limits, "resources.limits")
    _done(requests, "resources.requests")
    _done(resources, "resources")

    security = _take(container, "securityContext", "container", {})
    context = config.linux.security_context
    run_as = security.pop("runAsUser", None)
    if run_as is not None:
        context.run_as_user.value = run_as
    if security.pop("runAsNonRoot", False) and run_as == 0:
        raise Untranslated("runAsNonRoot with runAsUser 0: kubelet would refuse to start it")
    context.privileged = security.pop("privileged", False)
    context.no_new_privs = not security.pop("allowPrivilegeEscalation", True)
    context.readonly_rootfs = security.pop("readOnlyRootFilesystem", False)
    capabilities = security.pop("capabilities", {})
    context.capabilities.drop_capabilities.extend(capabilities.pop("drop", []))
    context.capabilities.add_capabilities.extend(capabilities.pop("add", []))
    _done(capabilities, "securityContext.capabilities")
    seccomp = security.pop("seccompProfile", {})
    if seccomp.pop("type", None) != "RuntimeDefault":
        raise Untranslated("seccompProfile: only RuntimeDefault (containerd's default profile) is translated")
    context.seccomp.profile_type = pb.SecurityProfile.RuntimeDefault
    _done(seccomp, "securityContext.seccompProfile")
    _done(security, "securityContext")
    if host_network:
        context.namespace_options.network = pb.NODE

    readiness = _probe(_take(container, "readinessProbe", "container"), "readinessProbe")
    live = _take(container, "livenessProbe", "container")
    liveness = _probe(live, "livenessProbe") if live is not None else None

    run = PodRun(sandbox, config, readiness, liveness, grace)
    for mount in _take(container, "volumeMounts", "container", []):
        volume = volumes.pop(mount.pop("name"))
        host = _volume_source(volume, configmaps, node_paths, workdir, run)
        propagation = {
            None: pb.PROPAGATION_PRIVATE,
            "None": pb.PROPAGATION_PRIVATE,
            "HostToContainer": pb.PROPAGATION_HOST_TO_CONTAINER,
            "Bidirectional": pb.PROPAGATION_BIDIRECTIONAL,
        }[mount.pop("mountPropagation", None)]
        config.mounts.add(
            container_path=mount.pop("mountPath"),
            host_path=str(host),
            readonly=mount.pop("readOnly", False),
            propagation=propagation,
        )
        _done(mount, "volumeMount")
    if volumes:
        raise Untranslated(f"volumes never mounted: {sorted(volumes)}")
    _done(container, "container")
    return run


def _probe(probe: dict, where: str) -> Probe:
    period = float(probe.pop("periodSeconds", 10))
    if "exec" in probe:
        exec_ = probe.pop("exec")
        result = Probe("", 0, period, command=list(exec_.pop("command")))
        _done(exec_, f"{where}.exec")
    else:
        http = probe.pop("httpGet")
        result = Probe(http.pop("path"), int(http.pop("port")), period)
        _done(http, f"{where}.httpGet")
    result.failure_threshold = int(probe.pop("failureThreshold", 3))
    result.timeout = float(probe.pop("timeoutSeconds", 1))
    _done(probe, where)
    return result


def _volume_source(volume: dict, configmaps: dict, node_paths: dict[str, Path], workdir: Path, run: PodRun) -> Path:
    volume = dict(volume)
    name = volume.pop("name")
    if "hostPath" in volume:
        spec = dict(volume.pop("hostPath"))
        path = spec.pop("path")
        kind = spec.pop("type", "")
        _done(spec, f"volume {name}.hostPath")
        _done(volume, f"volume {name}")
        host = node_paths.get(path, Path(path))
        if kind == "DirectoryOrCreate":
            if not host.exists():
                host.mkdir(mode=0o755, parents=True)
                run.prepared.append(host)
        elif kind == "Directory":
            if not host.is_dir():
                raise Untranslated(f"hostPath {path} ({host}) must be an existing directory")
        elif kind == "Socket":
            if not stat.S_ISSOCK(host.stat().st_mode):
                raise Untranslated(f"hostPath {path} ({host}) must be a socket")
        else:
            raise Untranslated(f"hostPath type {kind!r} of volume {name}")
        return host
    if "configMap" in volume:
        spec = dict(volume.pop("configMap"))
        data = configmaps[spec.pop("name")]["data"]
        _done(spec, f"volume {name}.configMap")
        _done(volume, f"volume {name}")
        target = workdir / f"configmap-{name}"
        target.mkdir()
        for key, value in data.items():
            (target / key).write_text(value)
        return target
    if "emptyDir" in volume:
        spec = dict(volume.pop("emptyDir"))
        target = workdir / f"emptydir-{name}"
        target.mkdir()
        if spec.pop("medium", "") == "Memory":
            size = _quantity_bytes(spec.pop("sizeLimit", "64Mi"))
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], check=True)
            run.prepared.append(target)
        spec.pop("sizeLimit", None)
        _done(spec, f"volume {name}.emptyDir")
        _done(volume, f"volume {name}")
        return target
    raise Untranslated(f"volume {name}: {sorted(volume)}")


def check(probe: Probe, client=None, container_id: str = "") -> bool:
    """One probe, as kubelet runs it: an exec probe through CRI ExecSync in the container, else HTTP."""
    if probe.command:
        request = pb.ExecSyncRequest(container_id=container_id, cmd=probe.command, timeout=int(probe.timeout))
        try:
            return client.stub.ExecSync(request, timeout=probe.timeout + 10).exit_code == 0
        except Exception:  # the container is gone or not running: a failed probe, as for kubelet
            return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{probe.port}{probe.path}", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def poll(probe: Probe, timeout: float, client=None, container_id: str = "") -> int:
    """Poll as kubelet polls, every period: 200 once the probe passes, 0 on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.command:
            if check(probe, client, container_id):
                return 200
            time.sleep(min(probe.period, 1.0))
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{probe.port}{probe.path}", timeout=1) as response:
                if response.status == 200:
                    return 200
        except urllib.error.HTTPError:
            pass
        except OSError:
            pass
        time.sleep(min(probe.period, 1.0))  # kubelet waits the period; the test need not
    return 0


def unmount_prepared(run: PodRun) -> None:
    for path in run.prepared:
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)
