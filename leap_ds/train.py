"""``python -m leap_ds.train``: the same as ``leap-ds train``."""
from leap_ds.apps.train import main

if __name__ == "__main__":
    main()
