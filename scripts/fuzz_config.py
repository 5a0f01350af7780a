"""Coverage-guided fuzzing of everything a runtime or a pod can hand the plugin: stdin, annotations, env.

    ./scripts/fuzz.sh                  # 60 s
    ./scripts/fuzz.sh -max_total_time=600 -jobs=2

Not part of CI. Any input that ends in a traceback, in code 999 from a parser,
or in a table after an error, is a crash that atheris saves as a reproducer;
so is any input on which the front's top-level scanner (agent_socket,
cniVersion) raises or disagrees with json.loads, or STATUS ends unclean.
"""

from __future__ import annotations

import io
import json
import sys

import atheris

with atheris.instrument_imports():
    from cni_redirect.fake import MemoryBackend
    from cni_redirect.logs import EventLog
    from cni_redirect.plugin import RedirectPlugin
    from cni_redirect.skel import dispatch
    from cni_redirect.spec import ANNOTATION_PREFIX, CATALOGUE
    from cni_redirect.status import answer
    from cni_redirect.wire import config_agent_socket, top_level_string

KEYS = sorted(CATALOGUE)
CLEAN = {1, 4, 6, 7, 11}


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # raw stdin
        stdin = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    else:  # a valid envelope with fuzzed annotations or defaults
        settings = {}
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            settings[KEYS[fdp.ConsumeIntInRange(0, len(KEYS) - 1)]] = fdp.ConsumeUnicodeNoSurrogates(200)
        conf = {"cniVersion": "1.0.0", "name": "f", "type": "cni-redirect", "prevResult": {"ips": []}}
        if mode == 1:
            annotations = {ANNOTATION_PREFIX + k: v for k, v in settings.items()}
            conf["runtimeConfig"] = {
                "io.kubernetes.cri.pod-annotations": {f"{ANNOTATION_PREFIX}enabled": "true", **annotations}
            }
        else:
            conf["defaults"] = {"enabled": "true", **settings}
        stdin = json.dumps(conf).encode()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}
    backend = MemoryBackend()
    out, err = io.StringIO(), io.StringIO()
    rc = dispatch(RedirectPlugin(backend, EventLog(err)), env, stdin, out, err)
    if "Traceback" in err.getvalue():
        raise RuntimeError(err.getvalue())
    if rc != 0:
        result = json.loads(out.getvalue())
        if result["code"] not in CLEAN:
            raise RuntimeError(f"unclean error {result}")
        if backend.tables:
            raise RuntimeError("error left a table")
    scanner(stdin)


def scanner(stdin: bytes) -> None:
    """The front's top-level scanner and its STATUS answer: never an exception, and agreeing with json.loads
    wherever that parses the document."""
    socket, version = config_agent_socket(stdin), top_level_string(stdin, b"cniVersion")
    try:
        document = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict):
        declared = document.get("cniVersion")
        if version is not None and version != declared:
            raise RuntimeError(f"the scanner read cniVersion {version!r}, json.loads {declared!r}")
        if socket is not None and socket != document.get("agent_socket"):
            raise RuntimeError(f"the scanner read agent_socket {socket!r}")
    rc, out = answer({"CNI_COMMAND": "STATUS"}, stdin)
    if rc != 0 and json.loads(out)["code"] not in CLEAN | {50}:
        raise RuntimeError(f"unclean STATUS error {out!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
