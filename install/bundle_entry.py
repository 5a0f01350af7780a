"""Entry point frozen into the bundle: the same `main` as the `cni-redirect` console script."""

import sys

from cni_redirect.cli import main

sys.exit(main())
