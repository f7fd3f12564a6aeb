"""``python -m leap_ds.train``: the same as ``leap-ds train``."""
import sys

from leap_ds.apps.train import main

if __name__ == "__main__":
    sys.exit(main())
