"""The node agent, `cni-redirect install`: the DaemonSet's process on every node.

- `bundle`: puts the plugin bundle into the CNI bin dir, and takes it away;
- `conflists`: pure edits of CNI config documents;
- `chain`: keeps our entry chained into the node's primary CNI config;
- `daemon`: the process: options, the loop, signals, readiness and health,
  and the CNI server it starts for the fast path;
- `survey` and `repair`: every sandbox on the node (through CRI) against what
  ADD would give it now, and programming the ones that are missing or drifted.
"""

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRIO_SOCKET = "/var/run/crio/crio.sock"
