"""Entry point frozen into the bundle: the same thin front as the `cni-redirect` console script."""

import sys

from cni_redirect.front import main

sys.exit(main())
