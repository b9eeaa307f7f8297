"""``python -m bundle <command>``: the command-line tool (see :mod:`bundle.cli`)."""

from bundle.cli import main

if __name__ == "__main__":
    main()
