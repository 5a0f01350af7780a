"""The real peers and the current runtime, built by `scripts/peers.sh` into a cache outside the repo.

Tests ask for them by name and fail loudly, naming the set-up step, when one is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

PEERS_BIN = Path(os.environ.get("PEERS_DIR", "/var/cache/cni-redirect/peers")) / "bin"
#: The CNI plugins a containerd 2.x tier chains (Go, containernetworking/plugins v1.10.0).
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


def peer(name: str) -> Path:
    path = PEERS_BIN / name
    assert path.exists(), f"{name} is missing from {PEERS_BIN}: run scripts/setup.sh (it builds the peers)"
    return path
