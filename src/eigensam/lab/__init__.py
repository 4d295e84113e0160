"""Training, data, models, experiments, reports and plots: the ``[lab]`` extra.

Every module of this package may import numpy, matplotlib, PyYAML and tqdm, so the package
checks for them first (``pip install "eigensam[lab]"``).
"""

from eigensam._extras import require_lab

require_lab("eigensam.lab")
