"""``leap-ds``: command-line entry point. Returns the exit status (0, or 2 for a usage error)."""
import sys

EXIT_USAGE = 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: leap-ds train [options]   (leap-ds train --help for the options)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main
        return train_main(rest)
    print(f"leap-ds: unknown command {command!r}; the commands are: train", file=sys.stderr)
    return EXIT_USAGE
