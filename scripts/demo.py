"""The demo: one pod's traffic captured by a stand-in sidecar proxy, through the real plugin.

1. a pod netns and a "remote" peer netns joined by veth (10.77.0.2 <-> 10.77.0.1);
2. a stand-in proxy in the pod, running as UID 1337, listening on 15001, that
   reports the original destination of what it receives (SO_ORIGINAL_DST);
3. the app (UID 1000) calls the peer directly: answered by the peer;
4. the plugin runs ADD exactly as containerd runs it (CNI_* env, config on stdin);
5. the same call is now answered by the proxy, with the original destination intact;
6. CHECK, then DEL; everything we made is removed.
"""

from __future__ import annotations

import json
import os
import sys

from cni_redirect.testing.netlab import (
    PEER_V4,
    PLUGIN,
    PodNetwork,
    Processes,
    connect,
    enabled,
    host_ruleset,
    plugin_conf,
    run_plugin,
)

# Bold headings on a terminal only (https://no-color.org: NO_COLOR set to anything turns it off).
BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() and not os.environ.get("NO_COLOR") else ("", "")


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{PLAIN}")


def show_call(command: str, run) -> None:
    timing = f"({run.seconds * 1000:.0f} ms, exit {run.rc})"
    print(f"$ CNI_COMMAND={command} CNI_NETNS=... {PLUGIN.name} < config   {timing}")
    if run.stdout:
        print(f"  stdout: {run.stdout}")


def main() -> int:
    host_before = host_ruleset()
    net = PodNetwork.create()
    procs = Processes()
    try:
        step(f"pod netns {net.pod.name}, peer netns {net.peer.name}")
        procs.listen(net.pod, "sidecar-proxy", 15001, uid=1337)
        procs.listen(net.peer, "remote-server", 80)
        print("stand-in proxy: UID 1337, port 15001 in the pod; remote server: port 80 on the peer")

        step(f"before: the app (UID 1000) calls {PEER_V4}:80")
        print(json.dumps(connect(net.pod, PEER_V4, 80, uid=1000)))

        annotations = enabled(exclude_outbound_ports="22")
        conf = plugin_conf(annotations)
        step("ADD: the runtime calls cni-redirect after the bridge plugin")
        print("pod annotations:", json.dumps(annotations))
        run = run_plugin("ADD", net.pod.path, conf)
        show_call("ADD", run)
        if run.rc != 0:
            print(run.stderr, file=sys.stderr)
            return 1

        step("the pod's netns now holds one table")
        print(net.pod.ruleset())

        step(f"after: the same call to {PEER_V4}:80")
        answer = connect(net.pod, PEER_V4, 80, uid=1000)
        print(json.dumps(answer))
        captured = answer.get("listener") == "sidecar-proxy" and answer.get("original_dst") == f"{PEER_V4}:80"
        print("captured by the proxy, original destination kept" if captured else "NOT captured")

        step("the proxy itself (UID 1337) reaches the real destination: no loop")
        print(json.dumps(connect(net.pod, PEER_V4, 80, uid=1337)))

        step("CHECK, then DEL")
        show_call("CHECK", run_plugin("CHECK", net.pod.path, conf))
        show_call("DEL", run_plugin("DEL", net.pod.path, conf))
        print("table left in the pod netns:", "none" if "cni_redirect" not in net.pod.ruleset() else "STILL THERE")
        return 0 if captured else 1
    finally:
        procs.stop()
        net.delete()
        unchanged = host_ruleset() == host_before
        step("host ruleset unchanged" if unchanged else "HOST RULESET CHANGED")


if __name__ == "__main__":
    sys.exit(main())
