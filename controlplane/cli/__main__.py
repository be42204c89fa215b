"""``python -m controlplane.cli``, as ``controlplane``."""

import sys

from controlplane.cli import main

sys.exit(main())
