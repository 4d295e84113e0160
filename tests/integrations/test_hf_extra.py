"""Without the [hf] extra, importing the integration names the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """
import sys
sys.modules["transformers"] = None  # looks uninstalled
try:
    import eigensam.integrations.transformers
except ImportError as error:
    print(error)
"""


def test_missing_transformers_names_the_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "eigensam[hf]"' in done.stdout
