"""``python -m bench [--quick] [--output PATH] [--profile DIR]``."""

from __future__ import annotations

import sys

from bench.run import main

sys.exit(main())
