"""Optimizer state for ``torch.distributed.checkpoint`` (DCP): sharded under FSDP2, loadable on
another number of processes.

:func:`distributed_state_dict` gives the state of a :class:`~eigensam.optim.sam.SAM` family
optimizer as DCP expects it, keyed by parameter name, every tensor that is sharded over the ranks
a ``DTensor`` (each rank writes and reads its own rows only):

- ``base``: the base optimizer's state (momentum, Adam moments, param groups), from
  ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``;
- ``sam_steps``: the step count;
- ``tracker`` (Eigen-SAM, X-SAM): the eigenvector estimate ``v̂`` as one tensor per parameter,
  shaped and sharded like it (``has_vector`` says whether an estimate exists), the eigenvalue,
  residual, number of refreshes, the backend ``hvp="auto"`` chose and the state of the tracker's
  random generator.

Save with ``dcp.save({"optimizer": distributed_state_dict(opt), ...}, checkpoint_id=path)``.
Load by building the same dictionary for the new optimizer, ``dcp.load(state, checkpoint_id=
path)`` (which fills it in place, cutting every tensor to this run's shards: 2 → 1 and 1 → 2
processes work), then :func:`load_distributed_state_dict`. The model's weights go beside it
(``get_model_state_dict`` / ``set_model_state_dict``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn import Module

from eigensam.optim.sam import SAM
from eigensam.parallel import ParamLayout, reshard


def _model(optimizer: SAM) -> Module:
    if not isinstance(optimizer, SAM):
        raise TypeError(
            f"optimizer must be a SAM-family optimizer (SAM, EigenSAM, XSAM, ...), got "
            f"{type(optimizer).__name__}; for a torch optimizer use "
            "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict"
        )
    if optimizer.model is None:
        raise ValueError(
            "distributed checkpoints key the optimizer state by parameter name, which needs "
            "the optimizer's model: build it with the module (SAM(model, ...) or model=model)"
        )
    return optimizer.model


def distributed_state_dict(optimizer: SAM) -> dict[str, Any]:
    """The optimizer's state for ``torch.distributed.checkpoint`` (see the module docstring).
    On a fresh optimizer the base state is initialized first (zero buffers), so that the
    dictionary can receive a saved state."""
    model = _model(optimizer)
    reshard(model)  # parameters are keyed by name: the shards must be the registered ones
    state: dict[str, Any] = {
        "base": get_optimizer_state_dict(model, optimizer.base_optimizer),
        "sam_steps": optimizer.sam_steps,
    }
    tracker = getattr(optimizer, "tracker", None)
    if tracker is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        layout = ParamLayout(params)
        saved = tracker.state_dict()
        vector = saved["vector"]
        saved["has_vector"] = vector is not None
        if vector is None:
            dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
            vector = torch.zeros(layout.numel, dtype=dtype, device=params[0].device)
        saved["vector"] = layout.pieces(vector)
        state["tracker"] = saved
    return state


def load_distributed_state_dict(optimizer: SAM, state: dict[str, Any]) -> None:
    """Load a state that ``torch.distributed.checkpoint.load`` filled in (built by
    :func:`distributed_state_dict` on this optimizer)."""
    model = _model(optimizer)
    reshard(model)
    set_optimizer_state_dict(model, optimizer.base_optimizer, state["base"])
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    optimizer.sam_steps = int(state["sam_steps"])
    tracker = getattr(optimizer, "tracker", None)
    if tracker is None:
        return
    saved = dict(state["tracker"])
    layout = ParamLayout([p for group in optimizer.param_groups for p in group["params"]])
    vector = layout.from_pieces(saved.pop("vector"))
    saved["vector"] = vector if saved.pop("has_vector") else None
    tracker.load_state_dict(saved)
