"""A fake libnftables that runs each transaction the way the kernel would, for logic tests.

Like knftables' Fake: the whole batch is applied to a copy of the netns's
ruleset and committed only if every command succeeds, and what the kernel
would refuse is refused here too, with the kernel's words:

- a table created twice (`create`), a table deleted or listed that is absent;
- a set, chain or rule in a table or chain that does not exist;
- a rule that references a set that does not exist, or one whose type does
  not fit the selector (`ip daddr @ports`);
- a set element of the wrong type or out of range, a prefix or range in a set
  without `flags interval`, overlapping intervals, a host name where an
  address belongs (the kernel would resolve it);
- `redirect` outside a nat chain, a base chain on a hook its type does not
  allow, a rule comment of 254 bytes or more (libnftables 1.0.6 aborts the
  whole process on one: "netlink_linearize.c: Memory allocation failure");
- `tproxy` outside a base chain on the prerouting hook, or with a family
  other than ip/ip6; `socket` matches outside prerouting/input/output.

`FakeRoutes` does the same for TPROXY's policy routing, at the level of
`routing.KernelRoutes`: an object already there is left alone and not reported
as added (the kernel's EEXIST), an IPv6 object in a netns without IPv6 fails
with EAFNOSUPPORT and takes back what the call added. `MemoryBackend` is the
`Backend` over both, one of each per netns path: its sessions are the same
`TableOps` the kernel backend runs, and `dump()` gives nft syntax for assertions.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .backend import Observed, TableOps
from .bounds import Bound, counts
from .errors import KernelError, NetnsGone
from .nfttext import TCP_MSS_TO_PATH, nft_text
from .ruleset import FAMILY, TABLE, TPROXY_MARK, PolicyRouting, Ruleset, describe

ENOENT = "No such file or directory"
EEXIST = "File exists"
EOPNOTSUPP = "Operation not supported"
EINVAL = "Invalid argument"

#: Which selector takes which element type, and what a value of that type looks like.
SELECTOR_TYPES = {
    ("meta", "oifname"): "ifname",
    ("meta", "iifname"): "ifname",
    ("meta", "skuid"): "uid",
    ("meta", "skgid"): "gid",
    ("meta", "l4proto"): "inet_proto",
    ("meta", "nfproto"): "nfproto",
    ("meta", "mark"): "mark",
    ("socket", "transparent"): "bit",
    ("ip", "saddr"): "ipv4_addr",
    ("ip", "daddr"): "ipv4_addr",
    ("ip6", "saddr"): "ipv6_addr",
    ("ip6", "daddr"): "ipv6_addr",
    ("tcp", "dport"): "inet_service",
    ("tcp", "sport"): "inet_service",
    ("udp", "dport"): "inet_service",
    ("udp", "sport"): "inet_service",
    ("tcp", "flags"): "tcp_flag",
}
TCP_FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr")
#: The hooks where `rt mtu` (the route's MSS) can be read: the kernel's nft_rt refuses it before routing.
RT_MTU_HOOKS = {"forward", "output", "postrouting"}
SET_TYPES = {"ipv4_addr", "ipv6_addr", "inet_service", "uid", "gid", "ifname", "mark"}
CHAIN_HOOKS = {
    "nat": {"prerouting", "input", "output", "postrouting"},
    "filter": {"prerouting", "input", "forward", "output", "postrouting"},
    "route": {"output"},
}
MAX_COMMENT = 253


class Rejected(Exception):
    """What libnftables would print for a command the kernel refuses."""


def _check_scalar(kind: str, value: object) -> None:
    """One value of an element type, or raise Rejected as the kernel (or nft's parser) would."""
    if kind in ("ipv4_addr", "ipv6_addr"):
        if not isinstance(value, str):
            raise Rejected(f"{value!r} is not an address")
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise Rejected(f"Could not resolve hostname: {value}") from None  # the real one would try DNS
        if "%" in value or address.version != (4 if kind == "ipv4_addr" else 6):
            raise Rejected(f"datatype mismatch, expected {kind}, got {value!r}")
    elif kind == "inet_service":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise Rejected(f"{value!r} is not a port (0-65535)")
    elif kind in ("uid", "gid", "mark"):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
            raise Rejected(f"{value!r} is not a 32-bit {kind}")
    elif kind == "ifname":
        if not isinstance(value, str) or not 0 < len(value.encode()) < 16:
            raise Rejected(f"{value!r} is not an interface name")
    elif kind == "bit":
        if value not in (0, 1) or isinstance(value, bool):
            raise Rejected(f"{value!r} is not 0 or 1")
    elif kind == "nfproto":
        if value not in ("ipv4", "ipv6"):
            raise Rejected(f"{value!r} is not a family (ipv4 or ipv6)")
    elif kind == "inet_proto":
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise Rejected(f"{value!r} is not a protocol number")
    elif kind == "tcp_flag":
        flags = value if isinstance(value, list) else [value]
        if not flags or any(flag not in TCP_FLAGS for flag in flags):
            raise Rejected(f"{value!r} is not a TCP flag")
    else:
        raise Rejected(f"unknown datatype {kind}")


def _interval(kind: str, element: object) -> tuple[int, int] | None:
    """The numeric interval an element covers (prefix or range), None for a single value."""
    if isinstance(element, dict) and "prefix" in element:
        prefix = element["prefix"]
        _check_scalar(kind, prefix.get("addr"))
        try:
            network = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=True)
        except (ValueError, TypeError):
            raise Rejected(f"{prefix!r} is not a valid prefix") from None
        return int(network.network_address), int(network.broadcast_address)
    if isinstance(element, dict) and "range" in element:
        low, high = element["range"]
        _check_scalar(kind, low)
        _check_scalar(kind, high)
        low_n, high_n = (int(ipaddress.ip_address(v)) if isinstance(v, str) else v for v in (low, high))
        if low_n > high_n:
            raise Rejected(f"range {low}-{high} is empty")
        return low_n, high_n
    _check_scalar(kind, element)
    return None


def _check_elements(body: dict) -> None:
    kind, interval = body["type"], "interval" in body.get("flags", ())
    spans = []
    for element in body.get("elem", ()):
        span = _interval(kind, element)
        if span is not None and not interval:
            raise Rejected(f"set {body['name']}: a range or prefix needs flags interval")
        if interval:
            if span is None:
                number = element if isinstance(element, int) else int(ipaddress.ip_address(element))
                span = (number, number)
            spans.append(span)
    spans.sort()
    for (_, high), (low, _) in itertools.pairwise(spans):
        if low <= high:
            raise Rejected(f"set {body['name']}: conflicting intervals specified")


@dataclass
class _Table:
    sets: dict[str, dict] = field(default_factory=dict)
    chains: dict[str, dict] = field(default_factory=dict)
    rules: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class FakeNft:
    """One network namespace's nftables, in memory. Speaks `json_cmd` like the bindings."""

    tables: dict[tuple[str, str], _Table] = field(default_factory=dict)
    transactions: int = 0

    def json_cmd(self, batch: dict) -> tuple[int, object, str]:
        work = copy.deepcopy(self.tables)
        output: list[dict] = [{"metainfo": {"json_schema_version": 1}}]
        try:
            commands = batch["nftables"]
            for command in commands:
                ((verb, spec),) = command.items()
                ((kind, body),) = spec.items()
                output += getattr(self, f"_{verb}_{kind}")(work, body) or []
        except Rejected as exc:
            return 1, "", f"Error: Could not process rule: {exc}\n"
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            return 1, "", f"Error: syntax error in JSON input: {exc!r}\n"
        if any(next(iter(c)) != "list" for c in commands):
            self.tables = work
            self.transactions += 1
        return 0, {"nftables": output}, ""

    # --- tables ---

    @staticmethod
    def _key(body: dict, name: str = "name") -> tuple[str, str]:
        return body["family"], body[name]

    def _table(self, work: dict, body: dict) -> _Table:
        table = work.get(self._key(body, "table"))
        if table is None:
            raise Rejected(f"{ENOENT}: table {body['family']} {body['table']}")
        return table

    def _add_table(self, work: dict, body: dict) -> None:
        work.setdefault(self._key(body), _Table())

    def _create_table(self, work: dict, body: dict) -> None:
        if self._key(body) in work:
            raise Rejected(f"{EEXIST}: table {body['family']} {body['name']}")
        work[self._key(body)] = _Table()

    def _delete_table(self, work: dict, body: dict) -> None:
        if work.pop(self._key(body), None) is None:
            raise Rejected(f"{ENOENT}: table {body['family']} {body['name']}")

    def _list_tables(self, work: dict, body: object) -> list[dict]:
        return [{"table": {"family": f, "name": n, "handle": i + 1}} for i, (f, n) in enumerate(work)]

    def _list_table(self, work: dict, body: dict) -> list[dict]:
        table = work.get(self._key(body))
        if table is None:
            raise Rejected(f"{ENOENT}: table {body['family']} {body['name']}")
        ident = {"family": body["family"], "table": body["name"]}
        objects: list[dict] = [{"table": {"family": body["family"], "name": body["name"], "handle": 1}}]
        objects += [{"set": {**ident, **s, "handle": 2 + i}} for i, s in enumerate(table.sets.values())]
        objects += [{"chain": {**ident, **c}} for c in table.chains.values()]
        for chain, rules in table.rules.items():
            objects += [{"rule": {**ident, "chain": chain, **r}} for r in rules]
        return objects

    # --- sets, chains, rules ---

    def _add_set(self, work: dict, body: dict) -> None:
        table = self._table(work, body)
        if body["type"] not in SET_TYPES:
            raise Rejected(f"unknown set type {body['type']!r}")
        _check_elements(body)
        shape = {k: v for k, v in body.items() if k not in ("family", "table", "elem", "handle")}
        existing = table.sets.get(body["name"])
        if existing is not None:
            if {k: v for k, v in existing.items() if k != "elem"} != shape:
                raise Rejected(f"{EEXIST}: set {body['name']} exists with another type")
            merged = {**existing, "elem": [*existing.get("elem", []), *body.get("elem", [])]}
            _check_elements(merged)
            table.sets[body["name"]] = merged
            return
        table.sets[body["name"]] = {**shape, **({"elem": list(body["elem"])} if body.get("elem") else {})}

    def _add_chain(self, work: dict, body: dict) -> None:
        table = self._table(work, body)
        chain = {k: v for k, v in body.items() if k not in ("family", "table", "handle")}
        if "hook" in chain:
            hooks = CHAIN_HOOKS.get(chain.get("type", ""))
            if hooks is None or chain["hook"] not in hooks:
                raise Rejected(f"{EOPNOTSUPP}: chain type {chain.get('type')!r} cannot use hook {chain['hook']!r}")
            if not isinstance(chain.get("prio"), int):
                raise Rejected(f"{EINVAL}: base chain {chain['name']} needs an integer priority")
        existing = table.chains.get(chain["name"])
        if existing is not None and existing != chain:
            raise Rejected(f"{EEXIST}: chain {chain['name']} exists with another definition")
        table.chains[chain["name"]] = chain
        table.rules.setdefault(chain["name"], [])

    def _add_rule(self, work: dict, body: dict) -> None:
        table = self._table(work, body)
        chain = table.chains.get(body["chain"])
        if chain is None:
            raise Rejected(f"{ENOENT}: chain {body['chain']} in table {body['family']} {body['table']}")
        if len(body.get("comment", "").encode()) > MAX_COMMENT:
            raise Rejected(f"{EINVAL}: comment longer than {MAX_COMMENT} bytes")
        for expr in body["expr"]:
            ((kind, spec),) = expr.items()
            if kind == "match":
                self._check_match(table, spec, chain)
            elif kind == "redirect":
                if chain.get("type") != "nat":
                    raise Rejected(f"{EOPNOTSUPP}: redirect is only valid in a nat chain")
                _check_scalar("inet_service", spec.get("port"))
            elif kind == "tproxy":
                if chain.get("hook") != "prerouting":
                    raise Rejected(f"{EOPNOTSUPP}: tproxy is only valid in a chain on the prerouting hook")
                if spec.get("family") not in ("ip", "ip6"):
                    raise Rejected(f"{EINVAL}: tproxy family {spec.get('family')!r}")
                _check_scalar("inet_service", spec.get("port"))
            elif kind == "mangle" and spec == TCP_MSS_TO_PATH:
                if chain.get("hook") not in RT_MTU_HOOKS:
                    raise Rejected(f"{EOPNOTSUPP}: rt mtu on hook {chain.get('hook')!r}")
            elif kind == "mangle":
                if spec.get("key") != {"meta": {"key": "mark"}}:
                    raise Rejected(f"{EOPNOTSUPP}: mangle of {spec.get('key')!r}")
                _check_scalar("mark", spec.get("value"))
            elif kind not in ("counter", "return", "accept", "drop"):
                raise Rejected(f"{EOPNOTSUPP}: statement {kind!r}")
        rule = {k: v for k, v in body.items() if k not in ("family", "table", "chain", "handle")}
        table.rules[body["chain"]].append(rule)

    @staticmethod
    def _check_match(table: _Table, spec: dict, chain: dict | None = None) -> None:
        if spec.get("op") not in ("==", "!="):
            raise Rejected(f"{EOPNOTSUPP}: operator {spec.get('op')!r}")
        left = spec["left"]
        mask = None
        if "&" in left:  # `meta mark & MASK`, `tcp flags & (syn | rst)`: the mask is of the selector's type
            left, mask = left["&"]
        if "socket" in left:
            if chain is not None and chain.get("hook") not in ("prerouting", "input", "output"):
                raise Rejected(f"{EOPNOTSUPP}: socket expression on hook {chain.get('hook')!r}")
            selector: tuple = ("socket", left["socket"]["key"])
        else:
            selector = ("meta", left["meta"]["key"]) if "meta" in left else tuple(left["payload"].values())
        kind = SELECTOR_TYPES.get(selector)
        if kind is None:
            raise Rejected(f"{EOPNOTSUPP}: selector {left!r}")
        if mask is not None:
            if kind not in ("mark", "tcp_flag"):
                raise Rejected(f"{EOPNOTSUPP}: a mask on {left!r}")
            _check_scalar(kind, mask)
        elif kind == "tcp_flag":
            raise Rejected(f"{EOPNOTSUPP}: tcp flags compared without a mask")  # not a shape we write
        right = spec["right"]
        if isinstance(right, str) and right.startswith("@"):
            named = table.sets.get(right[1:])
            if named is None:
                raise Rejected(f"{ENOENT}: set {right[1:]}")
            if named["type"] != kind:
                raise Rejected(f"datatype mismatch: expected {kind}, set {right[1:]} has type {named['type']}")
        elif isinstance(right, dict) and "set" in right:
            for item in right["set"]:
                _interval(kind, item)
        else:
            _interval(kind, right)


#: A new netns's TCP buffer sysctls, as this kernel gives them.
NETNS_SYSCTLS = {"net/ipv4/tcp_rmem": "4096 131072 6291456", "net/ipv4/tcp_wmem": "4096 16384 4194304"}
EAFNOSUPPORT = "Address family not supported by protocol"
_STRERROR = {errno.EAFNOSUPPORT: EAFNOSUPPORT, errno.EINVAL: EINVAL}


@dataclass
class FakeRoutes:
    """One netns's policy rules and routes (only the shapes we use), refusing what the kernel refuses."""

    has_ipv6: bool = True
    objects: list[dict] = field(default_factory=list)
    changes: int = 0
    #: The pod's own main-table routes, `{"family", "dst", "advmss"}` (advmss None: none), as a primary made them.
    main: list[dict] = field(
        default_factory=lambda: [
            {"family": "inet", "dst": "default", "advmss": None},
            {"family": "inet6", "dst": "default", "advmss": None},
        ]
    )

    def ipv6(self) -> bool:
        return self.has_ipv6

    def read(self) -> list[dict]:
        return [obj for obj in self.objects if next(iter(obj.values()))["table"] == PolicyRouting().table]

    def any_rule(self) -> bool:
        return any(o == PolicyRouting().objects(ipv6=False)[0] for o in self.objects)

    def add(self, objects: list[dict]) -> list[dict]:
        done: list[dict] = []
        for obj in objects:
            body = next(iter(obj.values()))
            if obj in self.objects:
                continue  # EEXIST: KernelRoutes takes it as already there, not added by this call
            problem = None
            if body["family"] == "inet6" and not self.has_ipv6:
                problem = errno.EAFNOSUPPORT
            elif body.get("fwmark", TPROXY_MARK) > 0xFFFFFFFF:
                problem = errno.EINVAL
            if problem:
                for added in done:
                    self.objects.remove(added)
                raise KernelError(
                    "policy routing for TPROXY could not be added in the pod netns",
                    f"{describe(obj)}: {_STRERROR[problem]}",
                    problem,
                )
            self.objects.append(obj)
            done.append(obj)
            self.changes += 1
        return done

    def delete(self, objects: list[dict]) -> None:
        for obj in objects:
            if obj in self.objects:
                self.objects.remove(obj)
                self.changes += 1

    def _routes(self) -> list[dict]:
        return [r for r in self.main if r["family"] == "inet" or self.has_ipv6]

    def without_mss(self) -> list[str]:
        return [f"{r['dst']} ({r['family']})" for r in self._routes() if r["advmss"] is None]

    def set_mss(self, advmss: dict[str, int]) -> int:
        changed = [r for r in self._routes() if r["advmss"] is None]
        for route in changed:
            route["advmss"] = advmss[route["family"]]
        return len(changed)

    def clear_mss(self, advmss: dict[str, int]) -> int:
        changed = [r for r in self._routes() if r["advmss"] == advmss[r["family"]]]
        for route in changed:
            route["advmss"] = None
        return len(changed)


class MemoryBackend:
    """The `Backend` protocol over one `FakeNft` and one `FakeRoutes` per netns path.

    `calls` records each session's netns and what ran in it; `gone` holds netns paths that no
    longer exist (a session on one raises NetnsGone, as the kernel backend does)."""

    def __init__(self) -> None:
        self.kernels: dict[str, FakeNft] = {}
        self.routing: dict[str, FakeRoutes] = {}
        self.sysctls: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        self.gone: set[str] = set()

    @contextmanager
    def session(self, netns: str) -> Iterator[TableOps]:
        if netns in self.gone:
            raise NetnsGone(f'CNI_NETNS "{netns}" does not exist')
        yield _Recorded(self, netns)

    def status(self) -> None:
        return None

    def ops(self, netns: str) -> TableOps:
        """The netns's table operations, unrecorded: for setting a scene and for assertions."""
        return TableOps(self.edge(netns))

    def edge(self, netns: str) -> FakeEdge:
        kernel, routes = self.kernels.setdefault(netns, FakeNft()), self.routing.setdefault(netns, FakeRoutes())
        return FakeEdge(kernel, routes, self.sysctls.setdefault(netns, dict(NETNS_SYSCTLS)))

    @property
    def tables(self) -> dict[str, list[dict]]:
        """Every netns that holds our table, with its objects (normalized listing)."""
        found = {}
        for netns, kernel in self.kernels.items():
            listing = TableOps(FakeEdge(kernel)).read(bound=UNBOUNDED)
            if listing is not None:
                found[netns] = listing
        return found

    def dump(self, netns: str) -> str:
        """Our table in this netns, in nft syntax ("" when absent)."""
        kernel = self.kernels.get(netns, FakeNft())
        listing = TableOps(FakeEdge(kernel)).read(raw=True, bound=UNBOUNDED)
        return "" if listing is None else nft_text(listing)


UNBOUNDED = Bound(rules=1 << 62, elements=1 << 62, objects=1 << 62)


class FakeEdge:
    """The fake's side of one netns (the `NetnsEdge` the kernel backend's `KernelEdge` is): its nftables runs each
    transaction as the kernel would (`FakeNft`), its routing is `FakeRoutes`, and the counts and the generation
    are read off their state as the kernel would give them."""

    def __init__(
        self, kernel: FakeNft | None = None, routes: FakeRoutes | None = None, sysctls: dict[str, str] | None = None
    ) -> None:
        self.kernel = kernel if kernel is not None else FakeNft()
        self.routes = routes if routes is not None else FakeRoutes()
        self.sysctls = sysctls if sysctls is not None else dict(NETNS_SYSCTLS)

    def sysctl(self, name: str, value: str | None = None) -> str:
        if name not in self.sysctls:
            raise KernelError(f"the sysctl {name} in the pod netns", "No such file or directory", errno.ENOENT)
        if value is not None:
            self.sysctls[name] = " ".join(value.split())
        return self.sysctls[name]

    def transaction(self, batch: dict) -> tuple[int, object, str]:
        return self.kernel.json_cmd(batch)

    def table_exists(self) -> bool:
        return (FAMILY, TABLE) in self.kernel.tables

    def delete_table(self) -> bool:
        if not self.table_exists():
            return False
        rc, _, error = self.kernel.json_cmd({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]})
        assert rc == 0, error
        return True

    def generation(self) -> int:
        return self.kernel.transactions

    def oversized(self, bound: Bound) -> str:
        """As `nftsize.over` counts: rules, then named things, then elements."""
        rc, output, _ = self.kernel.json_cmd({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})
        objects = output.get("nftables", []) if rc == 0 and isinstance(output, dict) else []
        rules, elements, named = counts([o for o in objects if "metainfo" not in o])
        if rules > bound.rules:
            return f"more than {bound.rules} rules"
        if named > bound.objects:
            return f"more than {bound.objects} chains, sets and objects"
        if elements > bound.elements:
            return f"more than {bound.elements} set elements"
        return ""


class _Recorded(TableOps):
    """A session of the MemoryBackend: TableOps over the netns's fakes, each operation recorded."""

    def __init__(self, backend: MemoryBackend, netns: str) -> None:
        super().__init__(backend.edge(netns))
        self.backend = backend
        self.netns = netns

    def apply(self, ruleset: Ruleset) -> None:
        self.backend.calls.append(("apply", self.netns))
        super().apply(ruleset)

    def remove(self) -> bool:
        self.backend.calls.append(("remove", self.netns))
        return super().remove()

    def observe(self, routing_wanted: bool, bound: Bound | None = None, tuning: Ruleset | None = None) -> Observed:
        self.backend.calls.append(("observe", self.netns))
        return super().observe(routing_wanted, bound, tuning)

    def clear_routing(self) -> bool:
        self.backend.calls.append(("clear_routing", self.netns))
        return super().clear_routing()

    def generation(self) -> int:
        self.backend.calls.append(("generation", self.netns))
        return super().generation()
