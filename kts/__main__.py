"""``python -m kts``: the same as the ``kts`` command."""
import sys

from kts.cli import main

sys.exit(main())
