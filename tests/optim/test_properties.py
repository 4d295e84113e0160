"""Property-based tests (Hypothesis) over what users give the optimizers.

Random ρ, α, intervals, power-iteration counts, step counts, base optimizers, several parameter
groups with their own hyperparameters, frozen parameters and parameters that get no gradient,
float32/float64/bfloat16 parameters (mixed within one optimizer too), zero gradients and
gradient norms from 1e-38 to 1e38. Each step either leaves finite weights or raises a documented
error (``FloatingPointError`` for a non-finite loss or gradient, ``ValueError``/``TypeError`` for
bad arguments) with the weights exactly as before the step.

Profiles: ``ci`` (default; derandomized, so CI is reproducible) and ``thorough``
(``HYPOTHESIS_PROFILE=thorough``, many more cases). ``CASES`` counts the cases tried per test.
"""

from __future__ import annotations

import collections
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from eigensam import EGR, SAM, XSAM, EigenSAM, ReverseSAM

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CASES: collections.Counter[str] = collections.Counter()
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Loss multipliers: 0 gives zero gradients; the others span tiny to huge gradient norms.
SCALES = [0.0, 1e-38, 1e-30, 1e-20, 1e-8, 1.0, 1e8, 1e20, 1e30, 1e38]
# Gradients within this factor of the dtype's largest value may overflow the *base* optimizer's
# own arithmetic (momentum buffers, Adam moments), exactly as without SAM: not guarded.
HEADROOM = 1e30
DOCUMENTED = (FloatingPointError, ValueError, TypeError)


class Net(nn.Module):
    """Three layers whose dtypes are chosen freely; ``unused`` never gets a gradient and
    ``frozen`` has ``requires_grad=False``."""

    def __init__(self, dtypes: list[torch.dtype], seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(3, 5).to(dtypes[0]), nn.Linear(5, 4).to(dtypes[1])])
        self.head = nn.Linear(4, 2).to(dtypes[2])
        self.unused = nn.Linear(2, 2)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x.to(layer.weight.dtype)))
        x = x + self.frozen.to(x.dtype)
        return self.head(x.to(self.head.weight.dtype)).float()


def group_strategy(kind: str) -> st.SearchStrategy[dict]:
    """Per-group hyperparameters (always valid: invalid ones are tested at construction)."""
    fields: dict[str, st.SearchStrategy] = {
        "rho": st.sampled_from([0.0, 1e-6, 0.05, 0.5, 5.0]),
        "lr": st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    }
    if kind == "sam":
        fields["adaptive"] = st.booleans()
        fields["eta"] = st.sampled_from([0.0, 0.01, 1.0])
    if kind == "eigen-sam":
        fields["alpha"] = st.sampled_from([0.0, 0.2, 1.0, 10.0])
    if kind == "x-sam":
        fields["alpha"] = st.sampled_from([0.0, 0.5, 1.0, 2.0])
    return st.fixed_dictionaries(fields)


KINDS = {"sam": SAM, "eigen-sam": EigenSAM, "x-sam": XSAM, "reverse-sam": ReverseSAM, "egr": EGR}


@st.composite
def setups(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(sorted(KINDS)))
    dtype_names = draw(st.lists(st.sampled_from(sorted(DTYPES)), min_size=3, max_size=3))
    num_groups = draw(st.integers(1, 3))
    base = draw(st.sampled_from(["sgd", "sgd-momentum", "adamw"]))
    options: dict = {}
    if kind in ("eigen-sam", "x-sam"):
        options = {
            "eig_interval": draw(st.integers(1, 4)),
            "eig_iters": draw(st.integers(1, 6)),
            "eig_method": draw(st.sampled_from(["power", "lanczos"])),
            "hvp": draw(st.sampled_from(["autograd", "fd-central", "fd-forward"])),
        }
    if kind == "egr":
        options = {"hvp": draw(st.sampled_from(["autograd", "fd-central", "fd-forward"]))}
    return {
        "kind": kind,
        "dtypes": dtype_names,
        "groups": [draw(group_strategy(kind)) for _ in range(num_groups)],
        "base": base,
        "options": options,
        "scales": draw(st.lists(st.sampled_from(SCALES), min_size=1, max_size=4)),
        "seed": draw(st.integers(0, 3)),
    }


def build(setup: dict) -> tuple[Net, torch.optim.Optimizer, list[nn.Parameter]]:
    model = Net([DTYPES[name] for name in setup["dtypes"]], setup["seed"])
    params = [p for name, p in model.named_parameters()] + [model.frozen]
    params = list(dict.fromkeys(params))  # frozen is already among named_parameters
    chunks = [params[i :: len(setup["groups"])] for i in range(len(setup["groups"]))]
    groups = [
        {"params": chunk, **hyper} for chunk, hyper in zip(chunks, setup["groups"], strict=True)
    ]
    base, base_kwargs = {
        "sgd": (torch.optim.SGD, {"lr": 0.1}),
        "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        "adamw": (torch.optim.AdamW, {"lr": 0.01}),
    }[setup["base"]]
    opt = KINDS[setup["kind"]](groups, base, model=model, **setup["options"], **base_kwargs)
    return model, opt, params


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def unchanged(params: list[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, s) for p, s in zip(params, saved, strict=True))


@given(setups())
def test_every_step_is_finite_or_a_documented_error_with_weights_unchanged(setup):
    CASES["steps"] += 1
    model, opt, params = build(setup)
    frozen = model.frozen.detach().clone()
    unused = snapshot(list(model.unused.parameters()))
    g = torch.Generator().manual_seed(setup["seed"])
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    for scale in setup["scales"]:

        def closure(scale: float = scale) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(x), y) * scale
            loss.backward()
            return loss

        before = snapshot(params)
        try:
            opt.step(closure)
        except DOCUMENTED as error:
            CASES[f"error: {type(error).__name__}: {str(error)[:70]}"] += 1
            assert unchanged(params, before), f"weights changed by a failed step: {error}"
            continue
        if not all(bool(torch.isfinite(p).all()) for p in params):
            assert scale > HEADROOM, f"non-finite weights after a step at scale {scale}"
            CASES["base optimizer overflow near the dtype's largest value"] += 1
            break
        CASES["finite step"] += 1
        assert torch.equal(model.frozen, frozen)
        assert unchanged(list(model.unused.parameters()), unused)
        for p in params:
            assert p.grad is None or torch.isfinite(p.grad).all()


@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    rho=st.floats(1e-4, 10.0),
    log_magnitude=st.integers(-40, 38),
    size=st.integers(1, 300),
    adaptive=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_perturbation_has_norm_rho_for_any_gradient_magnitude(
    dtype, rho, log_magnitude, size, adaptive, seed
):
    """‖ε‖ = ρ for SAM (ASAM: ‖T⁻¹ε‖ = ρ) whatever the gradient's scale, as long as the gradient
    itself is representable (nonzero) in the parameters' dtype."""
    CASES["perturbation"] += 1
    torch_dtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(size, generator=g).to(torch_dtype) + 0.5)
    grad = (torch.randn(size, generator=g, dtype=torch.float64) * 10.0**log_magnitude).to(
        torch_dtype
    )
    assume(bool(torch.isfinite(grad).all()) and bool((grad != 0).any()))
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    eps = opt.perturbation(grad).double()
    assert torch.isfinite(eps).all()
    if adaptive:  # T = |w| (eta = 0): ε vanishes where w does
        t = w.detach().double().abs()
        assert torch.all(eps[t == 0] == 0)
        eps = eps[t > 0] / t[t > 0]
    tolerance = 0.02 if torch_dtype == torch.bfloat16 else 1e-4
    assert float(eps.norm()) == pytest.approx(rho, rel=tolerance)


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@given(
    kind=st.sampled_from(["sam", "eigen-sam", "x-sam"]),
    rho=NUMBERS,
    alpha=NUMBERS,
    interval=NUMBERS,
    iters=NUMBERS,
)
def test_construction_accepts_exactly_the_valid_hyperparameters(kind, rho, alpha, interval, iters):
    """Valid values build an optimizer; anything else raises ValueError/TypeError naming the
    argument."""
    CASES["construction"] += 1

    def real(v, low=0.0, high=math.inf):
        return (
            not isinstance(v, bool)
            and isinstance(v, int | float)
            and math.isfinite(v)
            and low <= v <= high
        )

    def count(v):
        return not isinstance(v, bool) and isinstance(v, int) and v >= 1

    w = nn.Parameter(torch.zeros(3))
    valid = {"rho": real(rho)}
    kwargs: dict = {"rho": rho}
    if kind != "sam":
        valid["alpha"] = real(alpha, 0.0, 2.0 if kind == "x-sam" else math.inf)
        valid["eig_interval"] = count(interval)
        valid["eig_iters"] = count(iters)
        kwargs.update(alpha=alpha, eig_interval=interval, eig_iters=iters)
    cls = {"sam": SAM, "eigen-sam": EigenSAM, "x-sam": XSAM}[kind]
    if all(valid.values()):
        cls([w], torch.optim.SGD, lr=0.1, **kwargs)
        return
    with pytest.raises((ValueError, TypeError)) as info:
        cls([w], torch.optim.SGD, lr=0.1, **kwargs)
    bad = [name for name, ok in valid.items() if not ok]
    assert any(name in str(info.value) for name in bad), (bad, str(info.value))


def test_report_cases(capsys):
    """Print how many cases the properties above tried (run with -s to see it)."""
    with capsys.disabled():
        print(f"\nhypothesis cases: {dict(sorted(CASES.items()))}")
