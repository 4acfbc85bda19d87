import sys

from .cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C before a command took over its signals (imports)
    sys.exit(130)
