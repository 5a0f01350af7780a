"""Programming our table: the `Backend` protocol, and the only code that talks to the kernel.

`Backend` is what the plugin logic uses. Both implementations run the same
table operations (`TableOps`) over a libnftables-like `Nft`:

- `KernelBackend`: vets and enters the pod netns, then opens a real
  libnftables context there. How it reaches the netns (a CNI_NETNS path, or
  an fd the front handed over) is a constructor argument;
- `fake.MemoryBackend`: the same operations over a fake that runs each
  transaction the way the kernel would, for logic tests.

Every change is one libnftables transaction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from .errors import InternalError, NetnsGone, NotANetns, NotAvailable, TryAgainLater
from .netns import NetnsOpener, entered, open_netns
from .routing import KernelRoutes, Routes, describe, wanted
from .ruleset import FAMILY, TABLE, PolicyRouting, Ruleset

_TRANSIENT = ("Device or resource busy", "Resource temporarily unavailable", "Interrupted system call")


class Backend(Protocol):
    def apply(self, netns: str, ruleset: Ruleset) -> None:
        """Create or atomically replace our table in the netns."""

    def remove(self, netns: str) -> bool:
        """Delete our table if present; True if something was deleted. A vanished netns is fine."""

    def read(self, netns: str, raw: bool = False) -> list[dict] | None:
        """Our table's objects in `Ruleset.objects()` form, or None if absent; `raw` keeps counters."""

    def routing_drift(self, netns: str, routing: PolicyRouting | None) -> str | None:
        """What is wrong with our TPROXY policy routing in the netns, or None if it is as `routing` needs."""

    def status(self) -> None:
        """Raise NotAvailable if the backend cannot work on this node."""


class Nft(Protocol):
    """The one call of libnftables we use: run a JSON batch, get (rc, output, error)."""

    def json_cmd(self, batch: dict) -> tuple[int, object, str]: ...


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


class TableOps:
    """Our table's operations, over a real or fake libnftables context."""

    def __init__(self, nft: Nft, routes: Routes) -> None:
        self.nft = nft
        self.routes = routes

    def run(self, batch: dict, what: str) -> list[dict]:
        rc, output, error = self.nft.json_cmd(batch)
        if rc != 0:
            error = (error or "").strip()
            kind = TryAgainLater if any(marker in error for marker in _TRANSIENT) else InternalError
            raise kind(f"nftables rejected the {what} transaction", error[:2000])
        return output.get("nftables", []) if isinstance(output, dict) else []

    def exists(self) -> bool:
        tables = self.run({"nftables": [{"list": {"tables": None}}]}, "list tables")
        return any(
            t.get("table", {}).get("family") == FAMILY and t.get("table", {}).get("name") == TABLE for t in tables
        )

    def apply(self, ruleset: Ruleset) -> None:
        """Create the table, or replace it, in one transaction; exactly one table whatever runs beside us.

        A fresh netns gets `create table` + content (no delete: the next socket close after a
        delete costs ~13 ms). If another ADD created the table in the meantime, `create` fails
        with EEXIST and we replace instead; the replace batch starts with `add table`, so it
        also holds if a DEL removed the table in the meantime.

        TPROXY's policy routing goes in first (harmless without the table's marks) and comes out
        again if the table fails; a table that no longer needs it has it removed after.
        """
        existed = self.exists()
        added: list[dict] = []
        if ruleset.routing is not None:
            # A fresh netns has none of it: skip the read (add tolerates an object already there).
            present = self.routes.read() if existed else []
            added = self.routes.add([obj for obj in wanted(self.routes, ruleset.routing) if obj not in present])
        try:
            self._write(ruleset, existed)
        except BaseException:
            if added:
                self.routes.delete(added)
            raise
        if ruleset.routing is None and existed and self.routes.any_rule():
            self._clear_routes()

    def _write(self, ruleset: Ruleset, existed: bool) -> None:
        if existed:
            self.run(ruleset.replace_batch(), "apply")
            return
        try:
            self.run(ruleset.create_batch(), "apply")
        except InternalError as error:
            if "File exists" not in error.details:
                raise
            self.run(ruleset.replace_batch(), "apply")

    def _clear_routes(self) -> bool:
        present = self.routes.read()
        self.routes.delete(present)
        return bool(present)

    def remove(self) -> bool:
        """Delete the table, then any TPROXY routing of ours; True if anything was there."""
        removed = False
        if self.exists():
            self.run({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]}, "delete")
            removed = True
        if self.routes.any_rule():  # one rule dump: DEL of a pod without TPROXY stays cheap
            removed = self._clear_routes() or removed
        return removed

    def routing_drift(self, routing: PolicyRouting | None) -> str | None:
        if routing is None and not self.routes.any_rule():
            return None  # the common case, one rule dump: no TPROXY wanted, none there
        want, have = wanted(self.routes, routing), self.routes.read()
        missing = [describe(obj) for obj in want if obj not in have]
        if missing:
            return "TPROXY policy routing is missing from the pod network namespace: " + "; ".join(missing)
        extra = [describe(obj) for obj in have if obj not in want]
        if extra:
            return "TPROXY policy routing is present but the pod's table does not use it: " + "; ".join(extra)
        return None

    def read(self, raw: bool = False) -> list[dict] | None:
        if not self.exists():
            return None
        listing = self.run({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}, "list")
        return [o for o in listing if "metainfo" not in o] if raw else normalize(listing)


def libnftables() -> Nft:
    """A libnftables context. Create it only inside the target netns: its socket opens here."""
    try:
        import nftables
    except ImportError as exc:
        raise NotAvailable(f"the nftables Python bindings cannot be imported: {exc}") from None
    try:
        nft = nftables.Nftables()
    except OSError as exc:
        raise NotAvailable(f"libnftables cannot be loaded: {exc}") from None
    nft.set_handle_output(False)
    # Listings must not depend on the node's /etc (protocols, services, passwd): CHECK compares them.
    nft.set_numeric_proto_output(True)
    nft.set_service_output(False)
    nft.set_guid_output(False)
    return nft


class KernelBackend:
    """Real kernel access: vet the netns, enter it, then create the nft context.

    `reach` turns CNI_NETNS into a vetted fd (a path opened here, or an fd the
    front handed over); `context` makes the libnftables context once inside.
    """

    def __init__(
        self,
        reach: NetnsOpener = open_netns,
        context: Callable[[], Nft] | None = None,
        routes: Callable[[], Routes] = KernelRoutes,
    ) -> None:
        self.reach = reach
        self.context = context or libnftables
        self.routes = routes

    @contextmanager
    def _inside(self, netns: str) -> Iterator[TableOps]:
        fd = self.reach(netns)  # raises before any nft call if the netns is wrong
        try:
            with entered(fd):
                yield TableOps(self.context(), self.routes())  # after setns: its sockets live in the pod netns
        finally:
            os.close(fd)

    def apply(self, netns: str, ruleset: Ruleset) -> None:
        with self._inside(netns) as table:
            table.apply(ruleset)

    def remove(self, netns: str) -> bool:
        try:
            with self._inside(netns) as table:
                return table.remove()
        except (NetnsGone, NotANetns):
            return False  # the sandbox is gone, and our table with it

    def read(self, netns: str, raw: bool = False) -> list[dict] | None:
        with self._inside(netns) as table:
            return table.read(raw)

    def routing_drift(self, netns: str, routing: PolicyRouting | None) -> str | None:
        with self._inside(netns) as table:
            return table.routing_drift(routing)

    def status(self) -> None:
        self.context()  # loads the bindings and libnftables; runs no command
