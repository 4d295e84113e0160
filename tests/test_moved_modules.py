"""Import paths that moved keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_hessian_distributed_is_parallel_with_a_deprecation_warning() -> None:
    sys.modules.pop("eigensam.hessian.distributed", None)
    with pytest.warns(DeprecationWarning, match="eigensam.parallel"):
        old = importlib.import_module("eigensam.hessian.distributed")
    import eigensam.parallel as parallel

    assert old is parallel
    assert old.ParamLayout is parallel.ParamLayout
