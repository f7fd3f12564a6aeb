"""``python -m leap_ds``: the same as the ``leap-ds`` command."""
import sys

from leap_ds.apps.cli import main

sys.exit(main())
