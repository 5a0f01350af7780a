"""The node agent, `cni-redirect install`: the DaemonSet's process on every node.

- `bundle`: puts the plugin bundle into the CNI bin dir, and takes it away;
- `conflists`: pure edits of CNI config documents;
- `chain`: keeps our entry chained into the node's primary CNI config;
- `daemon`: the process: options, the loop, signals, readiness and health,
  and the CNI server it starts for the fast path.
"""
