"""The node agent, `cni-redirect install`: the DaemonSet's process on every node.

- `options`: the agent's settings, each with its one default;
- `bundle`: puts the plugin bundle into the CNI bin dir, and takes it away;
- `conflists`: pure edits of CNI config documents;
- `confdir`: the one read of the conf dir every reader uses;
- `chain` and `dropin`: keep our entry chained into the node's primary CNI
  config (a libcni drop-in where the runtime loads one, else an edit), and
  check the admin's entry settings by evaluating them as ADD would;
- `daemon`: the process: the loop, signals, readiness and health, and the
  CNI server it starts for the fast path;
- `survey` and `repair`: every sandbox on the node (through CRI) against what
  ADD would give it now, and programming the ones that are missing or drifted;
- `inspect`, `doctor`, `procs`, `metrics`: what the admin reads.
"""

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRIO_SOCKET = "/var/run/crio/crio.sock"
#: What repair does with a missing or drifted table: program it, only log it, or nothing. Listed once.
REPAIR_MODES = ("in-place", "report", "off")
#: How our entry reaches the runtime: libcni's drop-in, an edit of the primary's file, or chosen per node (dropin.py).
CHAIN_MODES = ("auto", "dropin", "edit")
