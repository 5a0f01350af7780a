"""cni-redirect: a chained CNI plugin that captures a pod's traffic for its sidecar proxy with nftables.

Kept import-free on purpose: the CNI entry point imports only what a command needs.
"""

__version__ = "0.1.0"
