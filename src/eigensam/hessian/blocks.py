"""Curvature of a block of parameters: an operator restricted to a subset of its variables.

For an operator ``H`` on the flat vector of parameters ``w = (w_B, w_rest)``, the block operator
is the diagonal block

    ``H_BB = P_B H P_Bᵀ``,   ``H_BB v = P_B H (P_Bᵀ v)``,

where ``P_Bᵀ`` writes a block vector into a full-length vector with zeros elsewhere and ``P_B``
reads the block's entries back. Its eigenvalues are those of the block's own curvature (the
Hessian of the loss as a function of ``w_B`` alone, the rest held fixed); by Cauchy interlacing
``λ₁(H_BB) ≤ λ₁(H)``, and the traces of the blocks of a partition add up to ``tr(H)``.

A block is chosen by name from ``model.named_parameters()``: a module name (all its parameters,
e.g. ``"features.0"`` or ``"layer1"``), a parameter name (``"fc.weight"``), or a shell-style
pattern over parameter names (``"*.bias"``, ``"blocks.*.attn.*"``); a list of them is their union.
:func:`layer_blocks` names one block per module that owns parameters (the per-layer spectrum).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

Block = str | Sequence[str]


def _matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, lies in the module ``pattern``, or matches it as a glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _patterns(block: object) -> list[str]:
    patterns = [block] if isinstance(block, str) else block
    if not isinstance(patterns, Sequence) or not patterns:
        raise TypeError(
            "block must be a module or parameter name, a glob pattern, or a non-empty list of "
            f"them, got {block!r}"
        )
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"block patterns must be non-empty strings, got {pattern!r}")
    return list(patterns)


def select_parameters(model: nn.Module, block: Block) -> list[tuple[str, Tensor]]:
    """The ``(name, parameter)`` pairs of ``model`` in ``block`` (see the module docstring), in
    the model's order; raises ValueError naming a pattern that matches no parameter."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    patterns = _patterns(block)
    for pattern in patterns:
        if not any(_matches(name, pattern) for name, _ in named):
            modules = layer_blocks(model)
            shown = ", ".join(modules[:12]) + (", ..." if len(modules) > 12 else "")
            raise ValueError(
                f"block pattern {pattern!r} matches no trainable parameter of "
                f"{type(model).__name__}; give a module name ({shown}), a parameter name or a "
                "glob pattern such as '*.bias'"
            )
    return [(n, p) for n, p in named if any(_matches(n, pattern) for pattern in patterns)]


def layer_blocks(model: nn.Module) -> list[str]:
    """The names of the modules that own trainable parameters directly (one block per layer),
    in the model's order; a parameter of the root module is its own block."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        owned = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if owned:
            blocks.extend(owned if not name else [name])
    return blocks


class BlockOperator:
    """``H_BB v = P_B H P_Bᵀ v``: the operator ``op`` restricted to the parameters of ``block``
    of ``model`` (see the module docstring), as ``v ↦ H_BB v`` on flat vectors of the block.

    ``op`` is any operator on flat parameter vectors that lists its variables in ``op.params``
    (:class:`~eigensam.hessian.hvp.HessianOperator`,
    :class:`~eigensam.hessian.dataset.DatasetHessian`,
    :class:`~eigensam.hessian.ggn.GGNOperator`); its product is computed in full and read
    back, so one block product costs one product of ``op``. Used as a context manager it opens
    and closes ``op``; over an ``op`` already open, call :meth:`matvec` directly. Every solver of
    :mod:`eigensam.hessian.analysis` accepts it. ``names`` lists the block's parameters.
    """

    def __init__(self, op: Any, model: nn.Module, block: Block):
        params = getattr(op, "params", None)
        if not callable(getattr(op, "matvec", None)) or not isinstance(params, list):
            raise TypeError(
                "op must be an operator on parameter vectors with matvec and params (a "
                f"HessianOperator, DatasetHessian or GGNOperator), got {type(op).__name__}"
            )
        layout = getattr(op, "layout", None)
        if getattr(layout, "sharded", False):
            raise ValueError("op acts on sharded (FSDP2) parameters; restrict an unsharded one")
        selected = select_parameters(model, block)
        offsets: dict[int, tuple[int, int]] = {}
        start = 0
        for p in params:
            offsets[id(p)] = (start, start + p.numel())
            start += p.numel()
        missing = [n for n, p in selected if id(p) not in offsets]
        if missing:
            raise ValueError(f"block parameters {missing} are not variables of op")
        device = params[0].device
        self.index = torch.cat([torch.arange(*offsets[id(p)], device=device) for _, p in selected])
        self.op = op
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.dim = int(self.index.numel())
        self.num_matvecs = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def __enter__(self) -> BlockOperator:
        self.op.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.op.__exit__(*exc)

    def matvec(self, v: Tensor) -> Tensor:
        """``H_BB v`` for a flat block vector ``v`` of length ``dim``."""
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"v must be a tensor of shape ({self.dim},), got {shape}")
        full = v.new_zeros(self.op.dim).index_copy_(0, self.index, v)
        self.num_matvecs += 1
        return self.op.matvec(full).index_select(0, self.index)

    __call__ = matvec
