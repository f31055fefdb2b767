"""``python -m asyncckpt``: the same command line as the ``asyncckpt`` script."""

from .cli import main

if __name__ == "__main__":
    main()
