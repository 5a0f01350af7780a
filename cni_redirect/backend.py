"""Programming our table: a session bound to one pod netns, the one way our code reaches a pod's kernel state.

A `Backend` opens a `Session` on one netns (`backend.session(netns)`, a
context manager): the netns is reached and entered once, and apply, remove,
read and the routing checks all run inside it. Both implementations run the
same table operations (`TableOps`) over one `NetnsEdge`, everything that
reaches a netns, bound to it when made (knftables' Interface and Fake):

- `KernelEdge`, made by `KernelBackend` inside the vetted, entered pod netns:
  libnftables (made on first use), the netlink counts and generation, the
  policy routing. How the backend reaches the netns (a CNI_NETNS path, or an
  fd the front handed over) is a constructor argument;
- `fake.FakeEdge`, made by `fake.MemoryBackend`: a fake that runs each
  transaction the way the kernel would, for logic tests.

Every change to the table is one libnftables transaction, except its removal:
one netlink `NFT_MSG_DELTABLE` by handle (`nftsize.delete_table`), which never
lists what a pod may have filled the table with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from .bounds import DEFAULT_BOUND, Bound, bound_for
from .errors import KernelError, NotAvailable
from .netns import NetnsOpener, entered, open_netns
from .nftsize import delete_table, over, table_exists
from .routing import KernelRoutes, Routes
from .ruleset import FAMILY, TABLE, Observed, RouteMss, Ruleset, normalize

__all__ = ["Backend", "KernelBackend", "KernelEdge", "NetnsEdge", "Observed", "Session", "TableOps", "normalize"]


class Session(Protocol):
    """One pod netns, entered: everything we do there."""

    def apply(self, ruleset: Ruleset) -> None:
        """Create or atomically replace our table (and TPROXY's routing, when the ruleset has it)."""

    def remove(self) -> bool:
        """Delete our table and our routing if present; True if something was deleted."""

    def read(self, raw: bool = False, bound: Bound | None = None) -> list[dict] | None:
        """Our table's objects in `Ruleset.objects()` form, or None if absent; `raw` keeps counters."""

    def observe(self, routing_wanted: bool, bound: Bound | None = None, tuning: Ruleset | None = None) -> Observed:
        """The table and our routing, for the one comparison (evaluation.compare). The routing is read
        in full only when wanted or present (one rule dump otherwise). A table over `bound` is not
        listed: `Observed.oversized` says why (a pod's process filled it; it is drift). `tuning`: the
        ruleset whose route MSS and sysctls are read too (only when it sets any)."""

    def clear_routing(self) -> bool:
        """Delete our policy routing, whatever the table says; True if there was any."""

    def generation(self) -> int:
        """The netns's nftables generation: it changes with every committed transaction, of anyone's."""

    def routing(self) -> tuple[dict, ...]:
        """Our policy routing objects present (rules with our mark and table, routes in our table)."""


class Backend(Protocol):
    def session(self, netns: str) -> AbstractContextManager[Session]:
        """Enter the netns; raises (before any nft call) if it is gone, not a netns, or the host's."""

    def status(self) -> None:
        """Raise NotAvailable if the backend cannot work on this node."""


class Nft(Protocol):
    """The one call of libnftables we use: run a JSON batch, get (rc, output, error)."""

    def json_cmd(self, batch: dict) -> tuple[int, object, str]: ...


class NetnsEdge(Protocol):
    """Everything our table operations reach in one netns, bound to it when made."""

    @property
    def routes(self) -> Routes:
        """Our policy routing in the netns (TPROXY's rule and route)."""

    def transaction(self, batch: dict) -> tuple[int, object, str]:
        """One libnftables JSON batch (a transaction, or a listing): (rc, output, error)."""

    def table_exists(self) -> bool:
        """Whether our table is there, without listing anything else of the netns."""

    def delete_table(self) -> bool:
        """Our table out, whatever is in it, without listing it (one message); False if it was not there."""

    def oversized(self, bound: Bound) -> str:
        """Why our table is over `bound` ("" when it is not): counted from a stream, never listed."""

    def generation(self) -> int:
        """The netns's nftables generation: it changes with every committed transaction, of anyone's."""

    def sysctl(self, name: str, value: str | None = None) -> str:
        """A sysctl of the netns (`net/ipv4/tcp_rmem`), written first when `value` is given; its value."""


class KernelEdge:
    """The kernel's side of the netns the calling thread is in: make it inside the entered netns."""

    def __init__(self, context: Callable[[], Nft], routes: Routes) -> None:
        self.context = context
        self.nft: Nft | None = None  # made on first use: a session that only reads the generation makes none
        self.routes = routes

    def transaction(self, batch: dict) -> tuple[int, object, str]:
        if self.nft is None:
            self.nft = self.context()
        return self.nft.json_cmd(batch)

    def table_exists(self) -> bool:
        """A dump of the inet tables' names: libnftables' own listing loads every set's elements first."""
        return table_exists()

    def delete_table(self) -> bool:
        """One NFT_MSG_DELTABLE by handle: libnftables' `delete table` would load the table whole first."""
        return delete_table()

    def oversized(self, bound: Bound) -> str:
        return over(bound)

    def generation(self) -> int:
        from .nftgen import ruleset_generation

        return ruleset_generation()

    def sysctl(self, name: str, value: str | None = None) -> str:
        """Through /proc/sys, opened in this thread: net sysctls answer for the opener's netns."""
        path = f"/proc/sys/{name}"
        try:
            if value is not None:
                with open(path, "w") as file:
                    file.write(value)
            with open(path) as file:
                return " ".join(file.read().split())
        except OSError as exc:
            raise KernelError(f"the sysctl {name} in the pod netns", exc.strerror or str(exc), exc.errno) from None


class TableOps:
    """Our table's operations in one netns, over that netns's edge: a `Session`."""

    def __init__(self, edge: NetnsEdge) -> None:
        self.edge = edge
        self.routes = edge.routes

    def oversized(self, bound: Bound | None) -> str:
        """Why our table is too large to list ("" when it is not): counted from a stream, never listed."""
        return self.edge.oversized(bound or DEFAULT_BOUND)

    def routing(self) -> tuple[dict, ...]:
        return tuple(self.routes.read())

    def generation(self) -> int:
        return self.edge.generation()

    def run(self, batch: dict, what: str) -> list[dict]:
        rc, output, error = self.edge.transaction(batch)
        if rc != 0:
            raise KernelError.from_text(f"nftables rejected the {what} transaction", (error or "").strip()[:2000])
        if isinstance(output, dict):
            return list(output.get("nftables", []))
        return []

    def exists(self) -> bool:
        return self.edge.table_exists()

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
            want = ruleset.routing.objects(ipv6=self.routes.ipv6())
            added = self.routes.add([obj for obj in want if obj not in present])
        try:
            self._write(ruleset, existed)
        except BaseException:
            if added:
                self.routes.delete(added)
            raise
        if ruleset.routing is None and existed and self.routes.any_rule():
            self.clear_routing()
        self._tune(ruleset, existed)

    def _tune(self, ruleset: Ruleset, existed: bool) -> None:
        """`loopback-mss`'s advmss on the pod's routes (ours off again when a replaced table had it and this one
        has not), and the ruleset's sysctls."""
        if ruleset.route_mss is not None:
            self.routes.set_mss(dict(ruleset.route_mss.advmss))
        elif existed:
            self.routes.clear_mss(dict(RouteMss().advmss))
        for name, value in ruleset.sysctls:
            if self.edge.sysctl(name) != value:
                self.edge.sysctl(name, value)

    def _write(self, ruleset: Ruleset, existed: bool) -> None:
        if existed and self.oversized(bound_for(ruleset.objects())):
            # A table a pod filled: libnftables would load it whole to replace it. Out by one message first;
            # the pod is without capture for the instant until the create below (it broke its own table).
            self.edge.delete_table()
            existed = False
        if existed:
            self.run(ruleset.replace_batch(), "apply")
            return
        try:
            self.run(ruleset.create_batch(), "apply")
        except KernelError as error:
            if not error.exists:
                raise
            self.run(ruleset.replace_batch(), "apply")

    def clear_routing(self) -> bool:
        present = self.routes.read()
        self.routes.delete(present)
        return bool(present)

    def remove(self) -> bool:
        """Delete the table (one message, never listed: a pod may have filled it), then any TPROXY routing of
        ours; True if anything was there."""
        removed = self.edge.delete_table()
        removed = self.routes.clear_mss(dict(RouteMss().advmss)) > 0 or removed  # the sysctls go with the netns
        if self.routes.any_rule():  # one rule dump: DEL of a pod without TPROXY stays cheap
            removed = self.clear_routing() or removed
        return removed

    def observe(self, routing_wanted: bool, bound: Bound | None = None, tuning: Ruleset | None = None) -> Observed:
        listing: list[dict] | None = None
        oversized = ""
        if self.exists():
            oversized = self.oversized(bound)
            if not oversized:
                listing = self._list(raw=True)
        without_mss = tuple(self.routes.without_mss()) if tuning is not None and tuning.route_mss else ()
        sysctls = tuple((name, self.edge.sysctl(name)) for name, _ in tuning.sysctls) if tuning is not None else ()
        if not routing_wanted and not self.routes.any_rule():  # the common case, one rule dump: no TPROXY, none there
            return Observed(listing, oversized=oversized, without_mss=without_mss, sysctls=sysctls)
        return Observed(listing, tuple(self.routes.read()), self.routes.ipv6(), oversized, without_mss, sysctls)

    def read(self, raw: bool = False, bound: Bound | None = None) -> list[dict] | None:
        if not self.exists():
            return None
        oversized = self.oversized(bound)
        if oversized:
            raise KernelError(
                f"our table in this netns is too large to read: {oversized}", "a process in the pod added to it"
            )
        return self._list(raw)

    def _list(self, raw: bool) -> list[dict]:
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


_WORKED: set[Callable[[], Nft]] = set()  # the contexts status() has made once in this process


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
    def session(self, netns: str) -> Iterator[TableOps]:
        fd = self.reach(netns)  # raises before any nft call if the netns is wrong
        try:
            with entered(fd):  # from here on, every socket opens in the pod netns
                yield TableOps(KernelEdge(self.context, self.routes()))
        finally:
            os.close(fd)

    def status(self) -> None:
        """Loads the bindings and libnftables (runs no command), once per process: in the CNI server, where
        STATUS comes every few seconds, the answer is then its own state."""
        if self.context not in _WORKED:
            self.context()
            _WORKED.add(self.context)
