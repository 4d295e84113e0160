"""The SDE simulator: drifts, the SVAG scheme, its limits, the study and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from eigensam import cli
from eigensam.hessian import HigherOrderUnsupportedError
from eigensam.lab import sde
from eigensam.lab.sde import drifts, trajectory, weak_error
from eigensam.optim import SAM

# --------------------------------------------------------------------------------------------
# A small smooth classifier on synthetic data


def small_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4)).to(dtype)


def batches(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g))
        for _ in range(n)
    ]


def closure_of(model):
    def make(batch):
        images, labels = batch

        def closure():
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            return loss

        return closure

    return make


def test_rho_zero_drifts_equal_sgd_drift():
    model = small_model()
    params = list(model.parameters())
    batch = batches(1)[0]
    sgd = drifts.make_drift("sgd", params, closure_of(model), 0.0)(batch)
    for kind in ("sde2", "sde3", "sam"):
        h = drifts.make_drift(kind, params, closure_of(model), 0.0, model)(batch)
        assert torch.equal(h, sgd), kind


def test_drifts_are_the_taylor_expansion_of_the_sam_gradient():
    """h₂ and h₃ are the first- and second-order Taylor polynomials of ∇f_γ(w + ρĝ) in ρ:
    the SAM drift minus h₃ shrinks as ρ³, minus h₂ as ρ²."""
    model = small_model()
    params = list(model.parameters())
    batch = batches(1)[0]
    gaps2, gaps3 = [], []
    for rho in (0.02, 0.01):
        sam = drifts.make_drift("sam", params, closure_of(model), rho)(batch)
        h2 = drifts.make_drift("sde2", params, closure_of(model), rho, model)(batch)
        h3 = drifts.make_drift("sde3", params, closure_of(model), rho, model)(batch)
        gaps2.append(float((sam - h2).norm()))
        gaps3.append(float((sam - h3).norm()))
    assert 3.5 < gaps2[0] / gaps2[1] < 4.5  # O(ρ²)
    assert 7.0 < gaps3[0] / gaps3[1] < 9.0  # O(ρ³)
    assert gaps3[1] < 0.05 * gaps2[1]


def test_svag_coefficients():
    for n in (1, 2, 4, 8):
        c1, c2 = drifts.svag_coefficients(n)
        assert c1 + c2 == pytest.approx(1.0)
        assert c1**2 + c2**2 == pytest.approx(n)
    assert drifts.svag_coefficients(1) == (1.0, 0.0)


@pytest.mark.parametrize("kind", ["sam", "sgd"])
def test_l_equal_one_with_discrete_drift_is_the_discrete_algorithm(kind):
    """SVAG with l = 1 and the drift of SAM (or SGD) reproduces optim.SAM (or torch SGD)."""
    lr, rho, data = 0.1, 0.3, batches(6)
    reference, simulated = small_model(), small_model()
    if kind == "sam":
        optimizer = SAM(reference, torch.optim.SGD, rho=rho, lr=lr)
    else:
        optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    for batch in data:
        closure = closure_of(reference)(batch)
        if kind == "sam":
            optimizer.step(closure)
        else:
            optimizer.zero_grad()
            closure()
            optimizer.step()
    params = list(simulated.parameters())
    drift = drifts.make_drift(kind, params, closure_of(simulated), rho, simulated)
    for batch in data:
        drifts.svag_step(params, drift, (batch, None), lr, 1)
    for a, b in zip(reference.parameters(), params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert not torch.equal(params[0], small_model()[1].weight)  # it moved


def test_ornstein_uhlenbeck_moments():
    """f_γ(x) = ½xᵀAx − ξ_γᵀx with ξ_γ ~ N(0, S): the SDE is dX = −AX dt + √η S^{1/2} dW, so
    E X_t = e^{−At}x₀ and Var X_t,i = η s_i (1 − e^{−2a_i t})/(2a_i) (A, S diagonal).
    20 000 paths (one parameter row each), η = 0.1, t = 1: with l = 16 the mean is within 0.005
    and the variances within 5% (Monte Carlo ≈ 1%, SVAG bias ≈ 1%); l = 1 (discrete SGD) is off
    by > 10% in the stiff coordinate."""
    paths, eta, steps = 20_000, 0.1, 10
    a = torch.tensor([1.0, 3.0], dtype=torch.float64)
    s = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = eta * steps
    mean_ou = torch.exp(-a * t)
    var_ou = eta * s * (1 - torch.exp(-2 * a * t)) / (2 * a)

    def simulate(svag_l):
        x = torch.ones(paths, 2, dtype=torch.float64, requires_grad=True)
        g = torch.Generator().manual_seed(svag_l)

        def noise():
            return torch.randn(paths, 2, generator=g, dtype=torch.float64) * s.sqrt()

        def make(xi):
            def closure():
                loss = (0.5 * a * x**2).sum() - (xi * x).sum()
                loss.backward()
                return loss

            return closure

        drift = drifts.make_drift("sde3", [x], make, 0.0)
        for _ in range(steps * svag_l):
            drifts.svag_step([x], drift, (noise(), noise()), eta, svag_l)
        return x.detach()

    x = simulate(16)
    assert (x.mean(0) - mean_ou).abs().max() < 0.005
    var = x.var(0)
    assert ((var - var_ou).abs() / var_ou).max() < 0.05
    cov = float(((x[:, 0] - x[:, 0].mean()) * (x[:, 1] - x[:, 1].mean())).mean())
    assert abs(cov) < 4 * math.sqrt(float(var.prod()) / paths)
    discrete = simulate(1).var(0)
    assert (discrete[1] - var_ou[1]) / var_ou[1] > 0.10


# --------------------------------------------------------------------------------------------
# Weak errors and slopes


def test_paired_weak_error_and_slope():
    ref = {
        0: [{"step": 0, "m": 1.0}, {"step": 5, "m": 2.0}],
        1: [{"step": 0, "m": 1.0}, {"step": 5, "m": 4.0}],
    }
    other = {
        0: [{"step": 0, "m": 1.0}, {"step": 5, "m": 1.0}],
        1: [{"step": 0, "m": 1.0}, {"step": 5, "m": 2.0}],
    }
    entry = weak_error.paired_weak_error(ref, other, "m")
    assert entry["error"] == pytest.approx(1.5)  # |mean(1, 2)| at step 5
    assert entry["step"] == 5 and entry["seeds"] == 2
    assert entry["ci"] == pytest.approx(12.706 * 0.5, rel=1e-3)  # t_{0.975,1}·s/√2, s = √0.5
    assert weak_error.paired_weak_error(ref, other, "missing") is None
    assert weak_error.fit_slope([0.04, 0.02, 0.01], [8e-2, 2e-2, 5e-3]) == pytest.approx(2.0)
    assert weak_error.fit_slope([0.04], [1.0]) is None


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lr", 0.0, "lr \\(η\\) must be > 0"),
        ("lr", -0.1, "lr \\(η\\) must be > 0"),
        ("rho", -0.2, "rho must be >= 0"),
        ("svag_l", 0, "svag_l \\(SVAG factor l\\) must be an integer >= 1"),
        ("l_values", (2, 0), "l_values \\(SVAG factor l\\)"),
        ("eta_values", (0.01, -1.0), "eta_values must be > 0"),
        ("seeds", (), "seeds must name"),
        ("steps", 0, "steps must be an integer >= 1"),
    ],
)
def test_bad_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        sde.SDEConfig(**{field: value})


def test_bad_drift_kind_and_trajectory_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="drift kind must be one of"):
        drifts.make_drift("ode", list(model.parameters()), closure_of(model), 0.1)
    with pytest.raises(ValueError, match="rho must be >= 0"):
        drifts.make_drift("sde2", list(model.parameters()), closure_of(model), -1.0)


def test_model_without_third_derivative_is_refused(no_double_backward):
    lin = nn.Linear(16, 4).double()

    def make(batch):
        images, labels = batch

        def closure():
            logits = no_double_backward(lin(images.flatten(1)))
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            return loss

        return closure

    drift = drifts.make_drift("sde3", list(lin.parameters()), make, 0.2, lin)
    with pytest.raises(HigherOrderUnsupportedError, match="model: cannot compute"):
        drift(batches(1)[0])


# --------------------------------------------------------------------------------------------
# The study and the command

TINY = dict(
    dataset="synthetic",
    train_subset=128,
    test_subset=64,
    width=0.02,
    batch_size=16,
    steps=4,
    track_every=2,
    seeds=(0, 1),
    svag_l=2,
    lambda_iters=6,
    track_batch=32,
)


def test_run_sde_writes_every_output(tmp_path):
    config = sde.SDEConfig(**TINY, l_values=(1,), eta_values=(0.02, 0.01), eta_horizon=0.04)
    messages = []
    summary = sde.run_sde(config, tmp_path, messages.append)
    expected = {
        "sde.json",
        "figure2.png",
        "weak_errors.md",
        "corollary.png",
        "l_convergence.md",
        "l_convergence.png",
        "eta_scaling.md",
        "eta_scaling.png",
    }
    assert expected <= set(summary["files"])
    results = json.loads((tmp_path / "sde.json").read_text())
    assert results["complete"] is True
    runs = results["runs"]
    assert set(runs) == set(trajectory.METHODS)
    sam0 = runs["sam"]["0"]
    assert [r["step"] for r in sam0] == [0, 2, 4]
    # same x₀ for every process; the processes then differ
    for method in trajectory.METHODS:
        assert runs[method]["0"][0]["weight_norm"] == sam0[0]["weight_norm"]
    assert runs["sde3"]["0"][-1]["weight_norm"] != sam0[-1]["weight_norm"]
    assert {"align", "cos_third"} <= set(sam0[1])
    assert -1 <= summary["corollary"]["mean_cos_third"] <= 1
    assert set(summary["weak_errors"]) == {"sde2", "sde3", "sgd"}
    assert summary["weak_errors"]["sde3"]["train_loss"]["error"] >= 0
    assert set(summary["l_convergence"]["errors"]) == {"1", "2"}
    schedules = summary["eta_scaling"]["schedules"]
    assert set(schedules) == {"eta^(1/3)", "eta^(1/2)", "eta^0"}
    assert set(schedules["eta^(1/3)"]["slopes"]) == {"sde2", "sde3"}
    # ρ held constant: c·η^0 is the configured ρ at every η.
    assert schedules["eta^0"]["power"] == 0 and schedules["eta^0"]["c"] == config.rho
    assert any("step 4/4" in m for m in messages)


def test_diverging_run_stops_and_keeps_records(tmp_path):
    config = sde.SDEConfig(**{**TINY, "lr": 1e6, "steps": 6, "track_every": 1, "seeds": (0,)})
    with pytest.raises(sde.DivergedError, match="sam diverged at step"):
        sde.run_sde(config, tmp_path)
    results = json.loads((tmp_path / "sde.json").read_text())
    assert results["complete"] is False
    assert "diverged" in results["stopped"]
    assert len(results["runs"]["sam"]["0"]) >= 1


def cli_flags(tmp_path):
    flags = ["sde", "--out", str(tmp_path)]
    for key, value in TINY.items():
        if key == "seeds":
            value = ",".join(map(str, value))
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def test_cli_sde(tmp_path, capsys):
    assert cli.main(cli_flags(tmp_path)) == 0
    out = capsys.readouterr()
    assert "| sde3 |" in out.out and "Corollary 4.1.1" in out.out
    assert "step 4/4" in out.err
    assert (tmp_path / "figure2.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--lr", "0", "lr \\(η\\) must be > 0"),
        ("--rho", "-1", "rho must be >= 0"),
        ("--svag-l", "0", "svag_l"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, flag, value, match):
    assert cli.main([*cli_flags(tmp_path), flag, value]) == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_cli_divergence_exit_code(tmp_path, capsys):
    flags = [*cli_flags(tmp_path), "--lr", "1e6", "--seeds", "0", "--track-every", "1"]
    assert cli.main(flags) == 1
    assert "what was recorded is in" in capsys.readouterr().err


def test_eta_scaling_alone(tmp_path):
    config = sde.SDEConfig(
        **{**TINY, "seeds": (0,)}, figure2=False, eta_values=(0.02, 0.01), eta_horizon=0.02
    )
    summary = sde.run_sde(config, tmp_path)
    assert "figure2.png" not in summary["files"] and "eta_scaling.md" in summary["files"]
    assert summary["weak_errors"] == {}
    with pytest.raises(ValueError, match="l_values needs figure2=True"):
        sde.SDEConfig(figure2=False, l_values=(1,))


def test_rerun_reuses_finished_trajectories(tmp_path):
    config = sde.SDEConfig(**{**TINY, "seeds": (0,)})
    first = sde.run_sde(config, tmp_path)
    messages = []
    again = sde.run_sde(
        sde.SDEConfig(**{**TINY, "seeds": (0,)}, l_values=(1,)), tmp_path, messages.append
    )
    reused = [m for m in messages if "reused" in m]
    assert len(reused) == len(trajectory.METHODS) + 2  # Figure 2, and l = 2 of the l-convergence
    assert again["weak_errors"] == first["weak_errors"]
    assert any("l=1" in m and "step 4/4" in m for m in messages)
    messages.clear()
    sde.run_sde(sde.SDEConfig(**{**TINY, "seeds": (0,), "width": 0.03}), tmp_path, messages.append)
    assert not any("reused" in m for m in messages)  # another model: the cache does not apply
