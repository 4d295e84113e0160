"""The ``[lab]`` extra: which packages the lab layer and the CLI need beyond torch.

The core (:mod:`eigensam`, :mod:`eigensam.optim`, :mod:`eigensam.hessian`) needs only torch.
Every module under :mod:`eigensam.lab`, and :mod:`eigensam.cli`, may import the packages in
:data:`LAB_PACKAGES`; :mod:`eigensam.lab`'s ``__init__`` calls :func:`require_lab` first, so a
missing one gives one message naming the extra instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> distribution name on the package index
LAB_PACKAGES = {"numpy": "numpy", "matplotlib": "matplotlib", "yaml": "pyyaml", "tqdm": "tqdm"}
INSTALL_HINT = 'pip install "eigensam[lab]"'


class MissingExtraError(ImportError):
    """A feature of the ``[lab]`` extra was used without the extra installed."""


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_lab_packages() -> list[str]:
    """Distribution names of the ``[lab]`` packages that cannot be imported here."""
    return [dist for module, dist in LAB_PACKAGES.items() if not _importable(module)]


def require_lab(feature: str) -> None:
    """Raise :class:`MissingExtraError` naming ``feature`` and the extra if a ``[lab]`` package
    is missing."""
    missing = missing_lab_packages()
    if missing:
        raise MissingExtraError(
            f"{feature} needs the [lab] extra (missing: {', '.join(missing)}); "
            f"install it with: {INSTALL_HINT}"
        )
