"""``python -m embedfast bench``: the benchmark report."""

import sys

from .bench import main

sys.exit(main())
