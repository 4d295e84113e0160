"""``python -m eigensam`` (and ``torchrun ... -m eigensam``): the ``eigensam`` command."""

import sys

from eigensam.console import main

if __name__ == "__main__":
    sys.exit(main())
