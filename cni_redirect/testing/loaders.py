"""The runtimes' own CNI loaders as the judge of what a node runs for a pod.

`tests/loaders/` holds two small Go programs built by `scripts/peers.sh` against the real loaders:
containerd's go-cni (v1.1.14 over libcni v1.3.1, as containerd v2.4.2 pins them) and CRI-O's ocicni
(v0.4.3 over libcni v1.3.0, as CRI-O v1.34.0 pins them). Each loads a conf dir as its runtime does and
prints the network it picked and that network's plugin chain; each can run ADD and DEL of that chain on a
netns. Nothing here reads the conf dir itself: what a runtime would run is what its loader says.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .peers import peer

LOADERS = ("containerd", "crio")
PLUGIN_TYPE = "cni-redirect"
ALL_VERSIONS = '{"cniVersion":"1.1.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}'


@dataclass(frozen=True)
class Load:
    """One load of a conf dir by one loader."""

    loader: str
    ok: bool
    error: str
    network: str
    cni_version: str
    plugins: tuple[dict, ...]  # {"type", "config"} in the order ADD runs them
    networks: tuple[str, ...]  # every network the loader kept
    dropped: tuple[str, ...]  # ocicni: why it skipped a file
    start: float
    end: float

    @classmethod
    def from_json(cls, line: str | bytes) -> Load:
        raw = json.loads(line)
        return cls(
            raw["loader"], raw["ok"], raw.get("error", ""), raw["network"], raw["cniVersion"],
            tuple(raw["plugins"]), tuple(raw["networks"]), tuple(raw.get("dropped") or ()), raw["start"], raw["end"],
        )  # fmt: skip

    @property
    def types(self) -> list[str]:
        return [plugin["type"] for plugin in self.plugins]

    def ours(self) -> list[dict]:
        """Our entry as the loader will hand it to ADD, once per time it is in the chain."""
        return [plugin["config"] for plugin in self.plugins if plugin["type"] == PLUGIN_TYPE]

    def problems(self, network: str, chained: bool | None, entry: Mapping[str, object] | None = None) -> list[str]:
        """What is wrong with this load for a node whose primary network is `network`.

        `chained`: True, our entry must be in the chain exactly once, last; False, not at all; None, at most
        once and last if there. `entry`: settings our entry must carry (an upgrade's new ones)."""
        where = f"{self.loader} at {self.start:.3f}"
        if not self.ok:
            return [f"{where}: no pod network ({self.error}; dropped: {list(self.dropped)})"]
        found = []
        if self.network != network:
            found.append(f"{where}: picked network {self.network!r}, not the primary's {network!r}")
        if network not in self.networks:
            found.append(f"{where}: dropped the primary network {network!r} ({list(self.dropped)})")
        count = self.types.count(PLUGIN_TYPE)
        last = bool(self.types) and self.types[-1] == PLUGIN_TYPE
        if chained is True and not (count == 1 and last):
            found.append(f"{where}: cni-redirect {count} times in {self.types}, not once and last")
        elif chained is False and count:
            found.append(f"{where}: cni-redirect still in {self.types}")
        elif chained is None and (count > 1 or (count == 1 and not last)):
            found.append(f"{where}: cni-redirect {count} times in {self.types}")
        if entry is not None and count:
            config = self.ours()[-1]
            differs = {k: config.get(k) for k, v in entry.items() if config.get(k) != v}
            if differs:
                found.append(f"{where}: our entry has {differs}, not {dict(entry)}")
        return found


@dataclass
class Samples:
    """Every load the loaders made while a sampler ran, by loader."""

    loads: dict[str, list[Load]] = field(default_factory=lambda: {name: [] for name in LOADERS})
    errors: list[str] = field(default_factory=list)

    def all(self) -> list[Load]:
        return [load for loads in self.loads.values() for load in loads]

    def within(self, start: float, end: float) -> list[Load]:
        """The loads made wholly inside [start, end] (wall clock)."""
        return [load for load in self.all() if load.start >= start and load.end <= end]

    def count(self) -> dict[str, int]:
        return {name: len(loads) for name, loads in self.loads.items()}


class Loaders:
    """Both loaders bound to one node's conf dir, bin dirs and libcni cache dir."""

    def __init__(
        self, conf_dir: Path, bin_dirs: Iterable[Path], cache_dir: Path | None = None, netns: str | None = None
    ) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = tuple(bin_dirs)
        self.cache_dir = cache_dir
        self.netns = netns  # the node's netns (a named one) where the loaders run their plugins: not the host's
        self.binaries = {name: peer(f"cnir-loader-{name}") for name in LOADERS}

    def _argv(self, loader: str, command: str, *extra: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        argv = [*prefix, str(self.binaries[loader]), command, f"--conf-dir={self.conf_dir}"]
        argv += [f"--bin-dir={d}" for d in self.bin_dirs]
        if self.cache_dir is not None:
            argv.append(f"--cache-dir={self.cache_dir}")
        return [*argv, *extra]

    def load(self) -> dict[str, Load]:
        """One load by each loader."""
        found = {}
        for loader in LOADERS:
            proc = subprocess.run(self._argv(loader, "load"), capture_output=True, timeout=60)
            assert proc.returncode == 0, f"{loader} loader failed: {proc.stderr.decode()[-2000:]}"
            found[loader] = Load.from_json(proc.stdout)
        return found

    def problems(self, network: str, chained: bool | None, entry: Mapping[str, object] | None = None) -> list[str]:
        return [p for load in self.load().values() for p in load.problems(network, chained, entry)]

    @contextmanager
    def sampling(self, interval: float = 0.005) -> Iterator[Samples]:
        """Both loaders load the conf dir again and again in the background while the block runs."""
        samples = Samples()
        procs = {
            loader: subprocess.Popen(
                self._argv(loader, "sample", f"--interval={int(interval * 1e6)}us"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for loader in LOADERS
        }

        def read(loader: str, proc: subprocess.Popen) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    samples.loads[loader].append(Load.from_json(line))
                except (ValueError, KeyError) as exc:
                    samples.errors.append(f"{loader}: {exc}: {line[:200]!r}")

        readers = [threading.Thread(target=read, args=item, daemon=True) for item in procs.items()]
        for reader in readers:
            reader.start()
        try:
            yield samples
        finally:
            for loader, proc in procs.items():
                assert proc.stdin is not None
                proc.stdin.close()  # the sampler ends when its stdin closes
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.returncode != 0:
                    assert proc.stderr is not None
                    samples.errors.append(f"{loader} sampler exited {proc.returncode}: {proc.stderr.read()[-500:]!r}")
            for reader in readers:
                reader.join(timeout=30)

    def add(self, loader: str, netns: str, sandbox: str, annotations: Mapping[str, str] | None = None) -> dict:
        """ADD of the chain the loader picks, as its runtime runs it for a sandbox; the runtime's result."""
        flags = [f"--annotation={k}={v}" for k, v in (annotations or {}).items()]
        proc = subprocess.run(
            self._argv(loader, "add", f"--netns={netns}", f"--id={sandbox}", *flags), capture_output=True, timeout=120
        )
        assert proc.returncode == 0, f"{loader} ADD failed: {proc.stderr.decode()[-2000:]}"
        return json.loads(proc.stdout)

    def check(self, loader: str, netns: str, sandbox: str) -> subprocess.CompletedProcess:
        """CHECK of the whole chain as the runtime runs it (CRI-O: from the config cached at ADD)."""
        return subprocess.run(
            self._argv(loader, "check", f"--netns={netns}", f"--id={sandbox}"), capture_output=True, timeout=120
        )

    def delete(self, loader: str, netns: str, sandbox: str) -> subprocess.CompletedProcess:
        """DEL as the runtime runs it (CRI-O: from the config cached at ADD); the process, for its exit code."""
        return subprocess.run(
            self._argv(loader, "del", f"--netns={netns}", f"--id={sandbox}"), capture_output=True, timeout=120
        )


def stub_plugins(bin_dir: Path, types: Iterable[str]) -> None:
    """Plugins the primaries name but no test runs (calico, cilium-cni, flannel...): each answers VERSION
    with every version, as the real ones do, so ocicni's check keeps their networks; anything else fails."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in types:
        path = bin_dir / name
        path.write_text(
            '#!/bin/sh\nif [ "$CNI_COMMAND" = VERSION ]; then\n'
            f"  echo '{ALL_VERSIONS}'\n  exit 0\nfi\n"
            f'echo \'{{"code": 4, "msg": "{name} is a stub: only VERSION"}}\'\nexit 1\n'
        )
        path.chmod(0o755)


def plugin_types(documents: Iterable[Mapping[str, object]]) -> set[str]:
    """The plugin types a set of primary configs names (conflists or single-plugin configs)."""
    found: set[str] = set()
    for document in documents:
        plugins = document.get("plugins", [document])
        if isinstance(plugins, list):
            found |= {p["type"] for p in plugins if isinstance(p, dict) and isinstance(p.get("type"), str)}
    return found
