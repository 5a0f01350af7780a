"""`cni-redirect install`: the node agent that puts the plugin on a node and keeps it chained.

It runs as the DaemonSet's main process with the host's CNI bin and conf dirs
mounted. It touches files only, never the network:

1. copies the plugin (a bundle folder or a single executable) into the bin dir
   under a temp name and renames it into place, so no runtime ever execs a
   half-written file;
2. finds the primary config (the configured file, else the lexically first
   `.conflist`/`.conf`/`.json`), waiting for one to appear;
3. appends our entry (replacing a stale one, never duplicating), turning a
   single-plugin `.conf` into a `.conflist`, by atomic rename;
4. watches and re-inserts when the primary CNI rewrites its file, writing
   only when something changed;
5. on SIGTERM removes only what it added, restoring the bytes the primary CNI
   wrote (and a converted `.conf`), then, after a grace period, the binary.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import conflists

BINARY = "cni-redirect"
BUNDLE_PREFIX = "cni-redirect-bundle-"
BACKUP_PREFIX = ".cni-redirect-original-"


@dataclass
class Options:
    cni_bin_dir: Path = Path("/host/opt/cni/bin")
    cni_conf_dir: Path = Path("/host/etc/cni/net.d")
    conf_file: str | None = None
    plugin_source: Path = Path("/opt/cni-redirect/bundle/cni-redirect")
    entry_file: Path | None = None
    readiness_port: int = 0  # 0: no readiness endpoint
    poll_interval: float = 0.2
    wait_log_interval: float = 5.0
    uninstall_on_exit: bool = True
    uninstall_grace: float = 2.0
    agent_socket: Path | None = None  # serve CNI requests here (the warm fast path)


class JsonLog:
    """Structured log lines on stdout: one JSON object per action."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, level: str, msg: str, **fields: object) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "level": level, "msg": msg, **fields}, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def write_atomic(path: Path, data: bytes, mode: int = 0o644, expect: bytes | None = None) -> bool:
    """Write beside the target, fsync, rename: readers see the old file or the new one, never half.

    With `expect`, the rename happens only if the target still holds those bytes, so an edit
    the primary CNI made since we read the file is not overwritten; returns whether it wrote.
    """
    tmp = path.with_name(f".{path.name}.cni-redirect-tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # not subject to umask
        if expect is not None and path.read_bytes() != expect:
            tmp.unlink()
            return False
        os.replace(tmp, path)
        return True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tree_digest(path: Path) -> str:
    """A content hash of a file or folder, naming a bundle version."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Managed:
    """What we wrote into one conf file, to undo exactly that."""

    name: str  # the file holding our entry now
    original_name: str  # the primary's file (differs when we converted a .conf)
    original: bytes  # the primary's bytes just before our latest write
    written: bytes  # our latest write


@dataclass
class Installer:
    options: Options
    log: Callable[..., None] = field(default_factory=JsonLog)
    entry: dict = field(default_factory=dict)
    managed: Managed | None = None
    ready_reason: str = "starting"
    _last_problem: str = ""
    _last_wait_log: float = 0.0
    _binary_target: str | None = None

    # --- binary ---

    def install_binary(self) -> None:
        source = self.options.plugin_source
        bin_dir = self.options.cni_bin_dir
        if not source.exists():
            raise FileNotFoundError(f"--plugin-source {source} does not exist")
        if not bin_dir.is_dir():
            raise FileNotFoundError(f"--cni-bin-dir {bin_dir} is not a directory")
        link = bin_dir / BINARY
        if source.is_dir():
            executable = source / BINARY
            if not executable.is_file():
                raise FileNotFoundError(f"--plugin-source {source} has no {BINARY} executable")
            version = f"{BUNDLE_PREFIX}{tree_digest(source)}"
            target = bin_dir / version
            if not target.exists():
                staging = bin_dir / f".{version}.tmp-{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(source, staging, symlinks=True)
                os.replace(staging, target)
                self.log("info", "copied plugin bundle", path=str(target))
            wanted = f"{version}/{BINARY}"
            if not (link.is_symlink() and os.readlink(link) == wanted):
                tmp_link = bin_dir / f".{BINARY}.link-{os.getpid()}"
                tmp_link.unlink(missing_ok=True)
                tmp_link.symlink_to(wanted)
                os.replace(tmp_link, link)
                self.log("info", "linked plugin", path=str(link), target=wanted)
            self._binary_target = wanted
            self._prune_bundles(keep={version, *self._previous_versions(version)})
        else:
            data = source.read_bytes()
            if not (link.is_file() and not link.is_symlink() and link.read_bytes() == data):
                write_atomic(link, data, mode=0o755)
                self.log("info", "installed plugin binary", path=str(link))
            self._binary_target = None

    def _previous_versions(self, current: str) -> list[str]:
        """Keep the newest older bundle: a pod setup already running from it must finish."""
        bundles = sorted(
            (p for p in self.options.cni_bin_dir.glob(f"{BUNDLE_PREFIX}*") if p.name != current),
            key=lambda p: p.stat().st_mtime,
        )
        return [bundles[-1].name] if bundles else []

    def _prune_bundles(self, keep: set[str]) -> None:
        for path in self.options.cni_bin_dir.glob(f"{BUNDLE_PREFIX}*"):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
                self.log("info", "removed old plugin bundle", path=str(path))

    def binary_present(self) -> bool:
        link = self.options.cni_bin_dir / BINARY
        return os.access(link, os.X_OK) and link.resolve().is_file()

    def remove_binary(self) -> None:
        link = self.options.cni_bin_dir / BINARY
        if link.is_symlink() or link.exists():
            link.unlink()
            self.log("info", "removed plugin", path=str(link))
        for path in self.options.cni_bin_dir.glob(f"{BUNDLE_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
            self.log("info", "removed plugin bundle", path=str(path))

    # --- conf ---

    def _backup(self, original_name: str) -> Path:
        # No CNI suffix at the end: libcni loads hidden files too, and would take a backup for a config.
        return self.options.cni_conf_dir / f"{BACKUP_PREFIX}{original_name}.bak"

    def _real(self, name: str) -> Path:
        """A config's real path. A symlink is followed only inside the conf dir: writing through a
        link to elsewhere (a mounted ConfigMap, another component's file) is not ours to do."""
        path = self.options.cni_conf_dir / name
        if not path.is_symlink():
            return path
        real = path.resolve()
        if not real.is_relative_to(self.options.cni_conf_dir.resolve()) or not real.is_file():
            raise conflists.ConfError(
                f"{name}: a symlink to {real}, outside --cni-conf-dir or not a file; left untouched "
                "(set --conf-file to a real file)"
            )
        return real

    def reconcile(self) -> bool:
        """One pass: make sure our binary and entry are in place. Returns readiness."""
        if not self.binary_present():
            self.log("warning", "plugin binary missing, reinstalling")
            self.install_binary()
        conf_dir = self.options.cni_conf_dir
        try:
            names = os.listdir(conf_dir)
        except OSError as exc:
            return self._not_ready(f"cannot list --cni-conf-dir {conf_dir}: {exc.strerror}")
        name = conflists.pick_primary(names, self.options.conf_file)
        if name is None:
            now = time.monotonic()
            if now - self._last_wait_log >= self.options.wait_log_interval:
                self._last_wait_log = now
                wanted = self.options.conf_file or "any .conflist/.conf"
                self.log("info", "waiting for the primary CNI config", conf_dir=str(conf_dir), wanted=wanted)
            return self._not_ready("no primary CNI config yet")
        try:
            path = self._real(name)
            data = path.read_bytes()
            document, single = conflists.parse(name, data)
        except OSError as exc:
            return self._not_ready(f"cannot read {conf_dir / name}: {exc.strerror}")
        except conflists.ConfError as exc:
            return self._not_ready(f"primary config left untouched: {exc}")
        desired = conflists.with_entry(document, self.entry)
        if not single and document == desired:
            if self.managed is None or self.managed.name != name:
                self._adopt(name, data, document)
            return self._ready(name)
        try:
            target = self._write(name, data, desired, single)
        except OSError as exc:
            return self._not_ready(f"cannot write into --cni-conf-dir {conf_dir}: {exc.strerror}")
        return self._ready(target) if target else False

    def _adopt(self, name: str, data: bytes, document: dict) -> None:
        """Our entry is already there (an agent restart): find the primary's bytes to restore later."""
        primary = conflists.without_entry(document)
        for original_name in (name, *(n for n in os.listdir(self.options.cni_conf_dir) if n != name)):
            if original_name != name and conflists.conflist_name(original_name) != name:
                continue
            backup = self._backup(original_name)
            try:
                original = backup.read_bytes()
                if conflists.without_entry(conflists.parse(original_name, original)[0]) == primary:
                    self.managed = Managed(name, original_name, original, data)
                    return
            except (OSError, conflists.ConfError):
                continue
        self.managed = Managed(name, name, conflists.render(primary), data)

    def _write(self, name: str, data: bytes, desired: dict, single: bool) -> str | None:
        """Write our entry in; returns the file that now holds it, or None if the primary changed it meanwhile."""
        conf_dir = self.options.cni_conf_dir
        rendered = conflists.render(desired)
        source = self._real(name)
        mode = source.stat().st_mode & 0o777
        target = conflists.conflist_name(name) if single else name
        ours_already = self.managed is not None and self.managed.name == name and data == self.managed.written
        # The primary's own bytes: what is there now, unless what is there is our earlier write.
        original = self.managed.original if ours_already else data
        original_name = self.managed.original_name if ours_already else name
        write_atomic(self._backup(original_name), original, mode=0o600)
        if single:
            write_atomic(conf_dir / target, rendered, mode=mode)
            (conf_dir / name).unlink()
            self.log("info", "converted single-plugin config and added our entry", source=name, path=target)
        elif write_atomic(source, rendered, mode=mode, expect=data):
            self.log("info", "added our entry to the primary CNI config", path=name)
        else:
            return None  # the primary rewrote its file since we read it: the next pass reads the new one
        self.managed = Managed(target, original_name, original, rendered)
        return target

    def uninstall(self) -> None:
        """Remove only what we added; the primary's file goes back to the bytes it wrote."""
        conf_dir = self.options.cni_conf_dir
        managed = self.managed
        if managed is not None:
            try:
                path = self._real(managed.name)
                current = path.read_bytes()
            except (FileNotFoundError, conflists.ConfError):
                path, current = conf_dir / managed.name, None
            if current is not None and current == managed.written:
                mode = path.stat().st_mode & 0o777
                restore_to = path if managed.original_name == managed.name else conf_dir / managed.original_name
                write_atomic(restore_to, managed.original, mode=mode)
                if managed.original_name != managed.name:
                    path.unlink()
                    self.log("info", "restored the original single-plugin config", path=managed.original_name)
                else:
                    self.log("info", "removed our entry; primary config restored byte for byte", path=managed.name)
            elif current is not None:
                try:
                    document, _ = conflists.parse(managed.name, current)
                except conflists.ConfError:
                    document = {"plugins": []}
                if any(conflists.is_ours(p) for p in document["plugins"]):
                    write_atomic(path, conflists.render(conflists.without_entry(document)))
                    self.log("info", "removed our entry from a config the primary changed", path=managed.name)
            self._backup(managed.original_name).unlink(missing_ok=True)
        self.managed = None
        self.ready_reason = "uninstalled"
        # A runtime that loaded the old conflist may still exec us for a moment.
        time.sleep(self.options.uninstall_grace)
        self.remove_binary()

    # --- readiness ---

    def _ready(self, name: str) -> bool:
        if self.ready_reason:
            self.log("info", "ready: plugin installed and chained", path=name)
        self.ready_reason = ""
        self._last_problem = ""
        return True

    def _not_ready(self, reason: str) -> bool:
        if reason != self._last_problem:
            level = "info" if reason.startswith("no primary") else "error"
            self.log(level, reason)
            self._last_problem = reason
        self.ready_reason = reason
        return False


def check_agent_socket(path: str) -> str:
    """The front only talks to sockets it can trust: root's directory, a plain path."""
    from .front import SOCKET_DIRS

    if not path.startswith(SOCKET_DIRS) or "/../" in path or not path.endswith(".sock") or '"' in path:
        raise ValueError(f"--agent-socket {path!r} must be a .sock path under {' or '.join(SOCKET_DIRS)}")
    return path


def load_entry(path: Path | None) -> dict:
    """The admin's entry settings (ConfigMap), validated as the plugin will validate them."""
    from .config import parse_conf
    from .spec import build_spec, merge_settings

    settings = {} if path is None else json.loads(path.read_text())
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    ours = conflists.entry(settings)
    conf = parse_conf({"cniVersion": "1.0.0", **ours})
    merged, _ = merge_settings(conf.defaults, {"cni-redirect.io/enabled": "true"})
    build_spec(merged, allow_root_proxy_uid=conf.allow_root_proxy_uid, max_set_elements=conf.max_set_elements)
    return ours


def serve_readiness(installer: Installer, port: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/readyz", "/healthz"):
                self.send_error(404)
                return
            ok = self.path == "/healthz" or not installer.ready_reason
            body = b"ok\n" if ok else installer.ready_reason.encode() + b"\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("", port), Handler)
    threading.Thread(target=server.serve_forever, name="readyz", daemon=True).start()
    return server


def run(options: Options, log: Callable[..., None] | None = None, stop: threading.Event | None = None) -> int:
    """The agent's main loop; returns the exit code."""
    log = log or JsonLog()
    stop = stop or threading.Event()
    try:
        ours = load_entry(options.entry_file)
        if options.agent_socket is not None:
            ours["agent_socket"] = check_agent_socket(str(options.agent_socket))
    except Exception as exc:
        message = getattr(exc, "msg", None) or str(exc)
        log("error", "invalid plugin settings; nothing installed", entry_file=str(options.entry_file), error=message)
        return 2
    installer = Installer(options, log, ours)
    agent = None
    if options.agent_socket is not None:
        from .agent import AgentServer

        agent = AgentServer(options.agent_socket, log)
        agent.start()  # before our entry names it: the first ADD must find it listening
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    server = serve_readiness(installer, options.readiness_port) if options.readiness_port else None
    try:
        installer.install_binary()
    except OSError as exc:
        log("error", "cannot install the plugin binary", error=str(exc))
        return 1
    log("info", "agent started", bin_dir=str(options.cni_bin_dir), conf_dir=str(options.cni_conf_dir))
    try:
        while not stop.is_set():
            installer.reconcile()
            stop.wait(options.poll_interval)
    finally:
        if options.uninstall_on_exit:
            log("info", "stopping: uninstalling")
            installer.uninstall()  # the agent keeps serving through the grace period
        if agent is not None:
            agent.stop()
        if server:
            server.shutdown()
        log("info", "agent stopped")
    return 0
