"""``python -m maskc ...``: the `maskc` command line (see `maskc.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
