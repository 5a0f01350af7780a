"""The only module that talks to the kernel: apply, read and remove our table.

`Backend` is the interface the plugin logic uses; `KernelBackend` is the real
thing (pyroute2 setns + libnftables JSON in the pod netns), `MemoryBackend` a
fake for logic tests. Every kernel change is one libnftables transaction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from .errors import InternalError, NotAvailable, TryAgainLater
from .netns import NetnsGone, NotANetns, entered, open_netns
from .ruleset import FAMILY, TABLE, Ruleset

_TRANSIENT = ("Device or resource busy", "Resource temporarily unavailable", "Interrupted system call")


class Backend(Protocol):
    def apply(self, netns: str, ruleset: Ruleset) -> None:
        """Create or atomically replace our table in the netns."""

    def remove(self, netns: str) -> bool:
        """Delete our table if present; True if something was deleted. A vanished netns is fine."""

    def read(self, netns: str) -> list[dict] | None:
        """Our table's objects in `Ruleset.objects()` form, or None if absent."""

    def status(self) -> None:
        """Raise NotAvailable if the backend cannot work on this node."""


def normalize(objects: list[dict]) -> list[dict]:
    """Make a listing comparable: no handles, counters zeroed, hash-set elements sorted."""
    out = []
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "metainfo":
            continue
        body = {key: value for key, value in body.items() if key != "handle"}
        if "elem" in body:
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        if "expr" in body:
            body["expr"] = [{"counter": {"packets": 0, "bytes": 0}} if "counter" in e else e for e in body["expr"]]
        out.append({kind: body})
    return out


class Nft:
    """A libnftables context. Construct it only inside the target netns."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError as exc:
            raise NotAvailable(f"the nftables Python bindings cannot be imported: {exc}") from None
        try:
            self._nft = nftables.Nftables()
        except OSError as exc:
            raise NotAvailable(f"libnftables cannot be loaded: {exc}") from None
        self._nft.set_handle_output(False)
        # Listings must not depend on the node's /etc (protocols, services, passwd): CHECK compares them.
        self._nft.set_numeric_proto_output(True)
        self._nft.set_service_output(False)
        self._nft.set_guid_output(False)

    def run(self, batch: dict, what: str) -> list[dict]:
        rc, output, error = self._nft.json_cmd(batch)
        if rc != 0:
            error = (error or "").strip()
            kind = TryAgainLater if any(marker in error for marker in _TRANSIENT) else InternalError
            raise kind(f"nftables rejected the {what} transaction", error[:2000])
        return output.get("nftables", []) if isinstance(output, dict) else []

    def table_exists(self) -> bool:
        tables = self.run({"nftables": [{"list": {"tables": None}}]}, "list tables")
        return any(
            t.get("table", {}).get("family") == FAMILY and t.get("table", {}).get("name") == TABLE for t in tables
        )

    def apply(self, ruleset: Ruleset) -> None:
        batch = ruleset.replace_batch() if self.table_exists() else ruleset.add_batch()
        self.run(batch, "apply")

    def remove(self) -> bool:
        if not self.table_exists():
            return False
        self.run({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]}, "delete")
        return True

    def read(self) -> list[dict] | None:
        if not self.table_exists():
            return None
        listing = self.run({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}, "list")
        return normalize(listing)


class KernelBackend:
    """Real kernel access: vet the netns, enter it, then create the nft context."""

    def _open(self, netns: str) -> int:
        """A vetted fd for the pod netns; raises before any nft call if it is wrong."""
        return open_netns(netns)

    @contextmanager
    def _inside(self, netns: str) -> Iterator[Nft]:
        fd = self._open(netns)
        try:
            with entered(fd):
                yield Nft()  # created after setns, so its socket lives in the pod netns
        finally:
            os.close(fd)

    def apply(self, netns: str, ruleset: Ruleset) -> None:
        with self._inside(netns) as nft:
            nft.apply(ruleset)

    def remove(self, netns: str) -> bool:
        try:
            with self._inside(netns) as nft:
                return nft.remove()
        except (NetnsGone, NotANetns):
            return False  # the sandbox is gone, and our table with it

    def read(self, netns: str) -> list[dict] | None:
        with self._inside(netns) as nft:
            return nft.read()

    def status(self) -> None:
        Nft()  # loads the bindings and libnftables; runs no command


class MemoryBackend:
    """An in-memory kernel for logic tests: netns path -> table objects."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict]] = {}
        self.calls: list[tuple[str, str]] = []

    def apply(self, netns: str, ruleset: Ruleset) -> None:
        self.calls.append(("apply", netns))
        self.tables[netns] = normalize(ruleset.objects())

    def remove(self, netns: str) -> bool:
        self.calls.append(("remove", netns))
        return self.tables.pop(netns, None) is not None

    def read(self, netns: str) -> list[dict] | None:
        self.calls.append(("read", netns))
        return self.tables.get(netns)

    def status(self) -> None:
        return None
