"""What the optimizers cannot run on FSDP2's sharded parameters (``fully_shard``), stated once.

The optimizers refuse it when they are built on a sharded model; configuration code that knows
only the option values (a training configuration with ``strategy: fsdp``, before any model
exists) calls :func:`check_fsdp2_options` for the same refusals and messages.
"""

from __future__ import annotations

from eigensam.hessian.hvp import EXACT_UNDER_FSDP2

LOCAL_UNDER_FSDP2 = (
    "sharpness='local' (m-sharpness) is not supported under FSDP2 (fully_shard): a gradient "
    "computed without synchronization (set_requires_gradient_sync(False)) stays unsharded and "
    "out of p.grad, so a per-rank ε would need a full copy of the weights on every rank; use "
    "sharpness='global', or DistributedDataParallel for m-sharpness"
)

SCALER_UNDER_FSDP2 = (
    "scaler: a GradScaler is not supported under FSDP2 (fully_shard): each rank sees only its "
    "shards' overflow, so the ranks could disagree on skipping a step; train in bfloat16 "
    "(MixedPrecisionPolicy(param_dtype=torch.bfloat16)), which needs no scaler"
)


def check_fsdp2_options(*, sharpness: str = "global", hvp: str | None = None) -> None:
    """Raise ``ValueError`` for an option an optimizer cannot run under FSDP2: ``sharpness=
    "local"`` or exact products (``hvp="autograd"``; None: no products are taken)."""
    if sharpness == "local":
        raise ValueError(LOCAL_UNDER_FSDP2)
    if hvp == "autograd":
        raise ValueError(EXACT_UNDER_FSDP2)
