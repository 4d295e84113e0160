"""The headline's analysis on constructed finished runs (no training): the table, the
convergence criterion, the claims with power and three-way verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.convergence import FIT_FILE, HELD_OUT_FILE, converged
from eigensam.lab.experiments.runs import make_scale
from eigensam.lab.experiments.targets import decide, headline
from eigensam.lab.experiments.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCES

# Per method and seed: (test acc, final λ₁, mean Align, train acc).
VALUES = {
    "sgd": [(0.810, 1.20, -0.30, 1.0), (0.812, 1.30, -0.31, 1.0), (0.808, 1.10, -0.29, 1.0)],
    "sam": [(0.820, 0.60, -0.20, 0.998), (0.821, 0.65, -0.22, 0.999), (0.819, 0.55, -0.21, 1.0)],
    "eigen-sam": [(0.815, 0.62, 0.10, 1.0), (0.816, 0.60, 0.12, 1.0), (0.814, 0.58, 0.11, 1.0)],
}


def finished_runs(tmp_path, sgd_train_acc=1.0):
    scale = make_scale("cpu", tmp_path, seeds=(0, 1, 2))
    plan = headline.plan(scale)
    for method, configs in plan.items():
        for config, (acc, lam, align, fit) in zip(configs, VALUES[method], strict=True):
            config.run_dir.mkdir(parents=True)
            summary = {"status": "finished", "seed": config.seed, "test_acc": acc}
            summary.update(train_seconds=40.0, track_seconds=1.0, eval_seconds=1.0)
            summary.update(final_lambda1=lam, mean_align=align)
            tracking.write_json(config.run_dir / tracking.SUMMARY_FILE, summary)
            (config.run_dir / tracking.METRICS_FILE).write_text("")
            fit = sgd_train_acc if method == "sgd" else fit
            tracking.write_json(config.run_dir / FIT_FILE, {"train_fit_acc": fit})
            held_out = {"held_out_acc": acc + 0.001}
            tracking.write_json(config.run_dir / HELD_OUT_FILE, held_out)
    return scale, plan


def test_headline_table_criterion_and_verdicts(tmp_path):
    scale, plan = finished_runs(tmp_path)
    (tmp_path / "out").mkdir()
    section = headline.analyze(scale, plan, tmp_path / "out")
    row = "| sgd | 3 | 120 | 100.00 ± 0.00 | 81.00 ± 0.50 | 81.10 ± 0.50 | 1.20 ± 0.25 |"
    assert row in section.body
    assert "every seed): met" in section.body
    verdicts = {c.claim.split(" (")[0]: c.verdict for c in section.claims}
    # The accuracy comparisons are decided by the decide target: here their power only.
    assert verdicts["SAM has a higher held-out accuracy than SGD"] == "decided by decide"
    assert section.claims[0].power.n == 3
    assert verdicts["SAM ends at a lower λ₁ than SGD"] == REPRODUCES
    assert verdicts["Eigen-SAM aligns ε with v₁ better than SAM"] == REPRODUCES
    assert verdicts["Eigen-SAM ends at a lower λ₁ than SAM"] == INCONCLUSIVE
    assert (tmp_path / "out" / "headline.json").is_file()


def test_decide_judges_the_headline_comparisons_on_the_held_out_accuracy(tmp_path):
    """decide's plan holds the headline's runs (same folders) and more seeds; with 3 of them
    finished it judges on those, says which are missing, and states the power reached."""
    scale, headline_plan = finished_runs(tmp_path)
    plan = decide.plan(scale)
    assert plan["sam"][:3] == headline_plan["sam"]
    assert len(plan["sgd"]) == decide.seeds_for("sam-sgd")
    assert len(plan["eigen-sam"]) == len(plan["sam"]) == decide.seeds_for("eigen-sam-sam")
    (tmp_path / "out").mkdir()
    section = decide.analyze(scale, plan, tmp_path / "out")
    sam_sgd, eig_sam = section.claims
    assert sam_sgd.verdict == REPRODUCES  # +1.0 points on every seed
    # Eigen-SAM − SAM = −0.5 points on every seed: a significant opposite sign.
    assert eig_sam.verdict == CONTRADICTED
    assert eig_sam.power.n == 3 and eig_sam.power.sd == pytest.approx(0.0, abs=1e-9)
    assert "Runs left out (did not finish)" in section.body and "sam-seed3" in section.body
    assert "| sam − sgd | 3 | 1.00 ± 0.25 | 1.00 ± 0.25 | 0.10 | 0.31 | 3 | 0.0 |" in section.body


def test_headline_says_when_sgd_did_not_converge(tmp_path):
    scale, plan = finished_runs(tmp_path, sgd_train_acc=0.975)
    (tmp_path / "out").mkdir()
    section = headline.analyze(scale, plan, tmp_path / "out")
    assert "every seed): NOT met (lowest 97.50%)" in section.body
    assert converged(0.99) and not converged(0.9899)
    with pytest.raises(ValueError, match="train_acc must be a fraction"):
        converged(99.0)


def test_the_readme_headline_comes_from_the_decided_comparisons(tmp_path, capsys):
    from eigensam.cli import main
    from eigensam.lab.experiments.report import fill_headline

    scale, _ = finished_runs(tmp_path)
    (tmp_path / "out").mkdir()
    section = decide.analyze(scale, decide.plan(scale), tmp_path / "out")
    assert "| sam − sgd | +0.5 points | +1.00 ± 0.25 points | 3 |" in section.headline
    assert "| eigen-sam − sam | +0.2 points | -0.50 ± 0.00 points | 3 |" in section.headline
    sentence = " ".join(section.headline.split())
    assert "sam − sgd (+0.75 to +1.25 points) has the sign of the paper's +0.5;" in sentence
    assert "eigen-sam − sam (-0.50 to -0.50 points) excludes the paper's +0.2." in sentence
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- headline:start -->\nold\n<!-- headline:end -->\nrest\n")
    fill_headline(readme, section.headline)
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n<!-- headline:start -->\nThe paper's")
    assert text.endswith("<!-- headline:end -->\nrest\n") and "| sam − sgd |" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- headline:start -->"):
        fill_headline(readme, "x")
    code = main(["reproduce", "decide", "--out", str(tmp_path / "o"), "--readme", str(readme)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--readme" in err


def test_decide_plans_from_the_sds_the_report_measured_on_the_headline():
    """decide.PILOT is the headline's measured paired SDs (its report section, two digits)."""
    report = json.loads((Path(__file__).parents[2] / "docs/reproduction/headline.json").read_text())
    sds = {c["claim"]: round(c["power"]["sd"], 2) for c in report["claims"]}
    assert sds[decide.SPECS[0].claim] == decide.PILOT["sam-sgd"]
    assert sds[decide.SPECS[1].claim] == decide.PILOT["eigen-sam-sam"]
