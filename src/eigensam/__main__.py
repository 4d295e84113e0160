"""``python -m eigensam`` (and ``torchrun ... -m eigensam``): the ``eigensam`` command."""

import sys

from eigensam.cli import main

if __name__ == "__main__":
    sys.exit(main())
