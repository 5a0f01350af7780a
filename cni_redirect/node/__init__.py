"""The node agent, `cni-redirect install`: the DaemonSet's process on every node.

In wings by concern. Data flows one way: chaining, then pods, then agent and admin (tests/test_imports.py).

- `options`: the agent's settings, each with its one default; `files`: a dir bound at open, atomic writes;
- `chaining`: our entry in the node's CNI conf dir (the one read, drop-in or edit, the entry check) and our
  bundle in its bin dir;
- `pods`: every sandbox on the node (through CRI) against what ADD would give it now, and repair of the ones
  missing or drifted; the node's processes;
- `agent`: the process: the loop, signals, ownership of the node, the HTTP port, probes, metrics, the new-node
  guard and the inotify watch;
- `admin`: the admin's commands beside the agent: `inspect`, `doctor`, `uninstall`.
"""

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRIO_SOCKET = "/var/run/crio/crio.sock"
#: What repair does with a missing or drifted table: program it, only log it, or nothing. Listed once.
REPAIR_MODES = ("in-place", "report", "off")
#: How our entry reaches the runtime: libcni's drop-in, an edit of the primary's file, or chosen per node
#: (chaining/dropin.py).
CHAIN_MODES = ("auto", "dropin", "edit")
