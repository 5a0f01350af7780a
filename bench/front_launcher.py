"""Run the thin front from the source tree under `python3 -I -S` (no site, no env): its leanest start."""

import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from cni_redirect.front import main

sys.exit(main())
