"""``leap-ds``: command-line entry point."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: leap-ds train [options]   (leap-ds train --help for the options)")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main
        return train_main(rest)
    print(f"leap-ds: unknown command {command!r}; the commands are: train", file=sys.stderr)
    sys.exit(2)
