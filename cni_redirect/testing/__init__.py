"""The lab: network namespaces, listeners, a private containerd, for the tests, the demo and the benchmarks.

Never imported by the plugin, the CNI server or the node agent (an import
rule test proves it), and left out of the bundle: it runs `ip`, `nsenter`
and containerd as subprocesses, which the plugin never does.

- `netlab`: pod and peer netns joined by veth, listeners that report which
  of them accepted a connection (`nettools`), the plugin run as a runtime
  runs it, conflist entries for it;
- `containerd`: a private containerd with every path under one temp dir;
- `images`: the pause image, built from `pause.c` with no registry;
- `host`: a snapshot of what a runtime may disturb on the host, to restore and compare.
"""
