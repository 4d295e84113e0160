"""How well does each eigenvector estimator follow the training loss's top eigenvector?

One SAM run is trained; every estimator of :mod:`eigensam.hessian.estimators` observes it
through its own :class:`~eigensam.hessian.tracker.EigenTracker`: at every step the estimator
spends the products it asks for on the step's batch (in eval mode, as Eigen-SAM does) and is
handed SAM's free product ``y = (g(w + ε) − g(w))/‖ε‖`` along ``ε̂``. All estimators see the
same weights and batches, so their differences are the estimators' alone. Every
``measure_every`` steps the top ``k`` eigenpairs of the training loss on a fixed sample
(Lanczos, eval mode) give, per estimator, ``|cos(v̂, v₁)|`` and the top-k subspace capture
``‖V_kᵀ v̂‖`` for ``k = 1..K``, and ``λ₂/λ₁``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eigensam.hessian import DatasetHessian, top_eigenvalues
from eigensam.hessian.estimators import Estimator
from eigensam.hessian.tracker import EigenTracker
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.engine.train import Trainer, make_closure
from eigensam.lab.engine.trained_model import fixed_batches
from eigensam.optim import SAM, EigenSAM

TOP_K = 5


@dataclasses.dataclass
class Observer:
    """One estimator watching the run: its tracker, the products it spent and its seconds."""

    tracker: EigenTracker
    products: int = 0
    seconds: float = 0.0


def _flat_grads(params: list[Tensor]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )


def reference_eigenpairs(
    model: torch.nn.Module, batches: list[Any], k: int, seed: int
) -> tuple[list[float], Tensor]:
    """The top ``k`` eigenvalues and eigenvectors (rows) of the loss on ``batches`` (eval mode,
    exact products, Lanczos to relative residual 1e-3, at most 80 products)."""
    with DatasetHessian(model, batches, mode="eval", check=False) as op:
        pairs = top_eigenvalues(op, k, num_iters=80, tol=1e-3, seed=seed)
    return [p.eigenvalue for p in pairs], torch.stack([p.eigenvector for p in pairs])


def observe(
    config: TrainConfig,
    estimators: Mapping[str, Callable[[], Estimator]],
    measure_every: int,
    sample: int,
    out: Path,
) -> dict[str, Any]:
    """Train ``config`` (a SAM run) with every estimator observing; measure against the top
    eigenvectors of the loss on the first ``sample`` training images every ``measure_every``
    steps. Writes and returns ``{"measurements": [...], "products": {...}, ...}``."""
    config = dataclasses.replace(config, method="sam", track_every=0, out_dir=str(out / "run"))
    trainer = Trainer(config)
    model, optimizer = trainer.model, trainer.optimizer
    assert isinstance(optimizer, SAM)
    params = [p for p in model.parameters() if p.requires_grad]
    rho = float(optimizer.param_groups[0]["rho"])
    batches = fixed_batches(config, min(sample, len(trainer.data.train)), 256)
    observers = {
        name: Observer(EigenTracker(estimator=make(), seed=config.seed))
        for name, make in estimators.items()
    }
    measurements: list[dict[str, Any]] = []
    step = 0
    sam_seconds = 0.0
    while trainer.epoch < config.epochs:
        for images, labels in trainer.loader:
            closure = make_closure(model, trainer.criterion, images, labels)
            for obs in observers.values():
                if obs.tracker.due(step):
                    start = time.process_time()
                    result = obs.tracker.update(closure, params, model)
                    obs.products += result.num_matvecs
                    obs.seconds += time.process_time() - start
            if step % measure_every == 0:
                measurements.append(_measure(step, model, batches, observers, config.seed))
            start = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            closure()
            grad = _flat_grads(params)
            optimizer.first_step(zero_grad=True)
            closure()
            product = (_flat_grads(params) - grad) / rho
            optimizer.second_step(zero_grad=True)
            trainer.scheduler.step()
            sam_seconds += time.process_time() - start
            norm = grad.norm()
            if norm > 0:
                direction = grad / norm
                for obs in observers.values():
                    begin = time.process_time()
                    obs.tracker.observe(params, direction, product)
                    obs.seconds += time.process_time() - begin
            step += 1
        trainer.epoch += 1
    measurements.append(_measure(step, model, batches, observers, config.seed))
    result = {
        "steps": step,
        "sample": len(batches) and sum(len(b[1]) for b in batches),
        "measure_every": measure_every,
        "sam_seconds": sam_seconds,
        "products": {name: obs.products for name, obs in observers.items()},
        "estimator_seconds": {name: obs.seconds for name, obs in observers.items()},
        "extra_vectors": {name: obs.tracker.rule.extra_vectors for name, obs in observers.items()},
        "measurements": measurements,
    }
    (out / "observations.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def _measure(
    step: int,
    model: torch.nn.Module,
    batches: list[Any],
    observers: Mapping[str, Observer],
    seed: int,
) -> dict[str, Any]:
    values, vectors = reference_eigenpairs(model, batches, TOP_K, seed)
    record: dict[str, Any] = {"step": step, "eigenvalues": values, "estimators": {}}
    for name, obs in observers.items():
        v = obs.tracker.vector
        if v is None:
            continue
        v = v / v.norm()
        overlaps = (vectors.to(v.dtype) @ v).abs()
        capture = [float(overlaps[:k].norm()) for k in range(1, TOP_K + 1)]
        record["estimators"][name] = {"abs_cos": float(overlaps[0]), "capture": capture}
    return record


def step_time_ratios(
    make_model: Callable[[], torch.nn.Module],
    rules: Mapping[str, Callable[[], Estimator]],
    batches: list[tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
) -> dict[str, float]:
    """CPU seconds per step of Eigen-SAM (α = 0.2, ``step(closure, batch=)``: eval-mode exact
    products, ``hessian_parts="auto"``) with each rule, over SAM's, all measured in this run:
    every optimizer starts from ``make_model()``'s weights and they take ``steps`` steps round
    robin (step ``t`` of each in turn, timed with ``time.process_time``), so that load from
    other jobs hits all alike. Returns ``{"sam": seconds per step, rule: ratio, ...}``."""
    criterion = torch.nn.CrossEntropyLoss()
    sgd: dict[str, Any] = dict(lr=lr, momentum=0.9, weight_decay=5e-5)
    runs: dict[str, tuple[torch.nn.Module, SAM]] = {}
    model = make_model()
    runs["sam"] = (model, SAM(model, torch.optim.SGD, 0.05, **sgd))
    for name, make in rules.items():
        model = make_model()
        runs[name] = (model, EigenSAM(model, torch.optim.SGD, 0.05, eig_estimator=make(), **sgd))
    seconds = dict.fromkeys(runs, 0.0)
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        for name, (model, opt) in runs.items():

            def closure(x: Tensor, y: Tensor, model: torch.nn.Module = model) -> Tensor:
                loss = criterion(model(x), y)
                loss.backward()
                return loss

            start = time.process_time()
            opt.step(closure, batch=(images, labels))
            seconds[name] += time.process_time() - start
    sam = seconds["sam"]
    return {"sam": sam / steps, **{n: s / sam for n, s in seconds.items() if n != "sam"}}
