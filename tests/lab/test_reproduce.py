"""``eigensam reproduce``: planning of every target (configs, seeds, equal compute, shared
runs), bad input before anything trains, and a tiny end-to-end run on synthetic data."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
from tiny_runs import tiny

from eigensam.cli import main
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.experiments import reproduce
from eigensam.lab.experiments.report import (
    Section,
    not_testable,
    paired_claim,
    read_section_claims,
    write_report,
)
from eigensam.lab.experiments.runs import (
    SideTask,
    check_runs,
    estimated_cost,
    execute,
    make_scale,
)
from eigensam.lab.experiments.verdicts import VERDICTS

# Synthetic data, a quarter-width SimpleCNN: 2 steps per epoch.
TINY = dict(
    dataset="synthetic", train_subset=64, batch_size=32, width=0.25, track_iters=5, track_every=4
)


def plans(target: str, tmp_path: Path, seeds=(0, 1), scale="cpu"):
    return reproduce.plan_targets(
        reproduce.resolve_targets(target),
        scale,
        seeds,
        tmp_path,
        TINY if scale == "cpu" else None,
    )


def test_unknown_target_and_scale_are_refused():
    with pytest.raises(ValueError, match="one of headline, decide, noise, datasize, table1, .*all"):
        reproduce.resolve_targets("fig9")
    with pytest.raises(ValueError, match="scale must be one of cpu, paper"):
        make_scale("gpu", "x")


def test_one_seed_is_refused_where_intervals_are_needed(tmp_path):
    with pytest.raises(ValueError, match="seeds: fig1 .* at least 2"):
        plans("fig1", tmp_path, seeds=(3,))
    with pytest.raises(ValueError, match="more than once"):
        plans("fig1", tmp_path, seeds=(3, 3))
    with pytest.raises(ValueError, match="seeds: table2 .* at least 2"):
        plans("table2", tmp_path, seeds=(3,))


def test_table1_gives_sgd_twice_the_epochs_and_every_method_all_seeds(tmp_path):
    _, plan = plans("table1", tmp_path, seeds=(0, 1, 2))
    runs = plan["table1"]
    assert set(runs) == {"sgd", "sam", "eigen-sam", "x-sam", "asam"}
    assert all([c.seed for c in configs] == [0, 1, 2] for configs in runs.values())
    assert runs["sgd"][0].epochs == 2 * runs["sam"][0].epochs
    assert runs["eigen-sam"][0].resolved_alpha == 0.2 and runs["sam"][0].rho == 0.05


def test_targets_share_runs(tmp_path):
    _, plan = plans("all", tmp_path)
    table1, fig3, table34 = plan["table1"], plan["fig3"], plan["table3-4"]
    assert fig3["α=0.2"][0].run_dir == table1["eigen-sam"][0].run_dir
    assert fig3["α=0 (SAM)"][0].run_dir == table1["sam"][0].run_dir
    assert fig3["X-SAM α=1.0"][0].run_dir == table1["x-sam"][0].run_dir
    assert table34["p=20 burst"][0].run_dir == table1["eigen-sam"][0].run_dir
    for method in ("sgd", "sam", "eigen-sam"):
        assert plan["headline"][method] == table1[method]
    # The dynamics targets run on the short scale, in their own folders.
    assert plan["fig5"]["eigen-sam"] == plan["fig1"]["eigen-sam"]
    assert plan["fig1"]["sam"][0].run_dir.name == "short-sam-seed0"
    assert plan["fig1"]["sam"][0].run_dir != table1["sam"][0].run_dir
    assert fig3["α=auto"][0].alpha == "auto"
    assert len(fig3["α=0.4"]) == len(table34["p=50 burst"]) == 2  # sweeps: first 3 seeds
    assert len(plans("fig3", tmp_path, seeds=(0, 1, 2, 3))[1]["fig3"]["α=0.4"]) == 3
    assert table34["p=20 spread"][0].eig_schedule == "spread"
    burst = [table34[f"p={p} burst"][0].eig_interval for p in (10, 20, 50, 100)]
    assert burst == [10, 20, 50, 100]
    configs = [c for p in plan.values() for runs in p.values() for c in runs]
    assert len(check_runs(configs)) < len(configs)  # shared runs train once


def test_paper_scale_plans_the_paper_configs():
    scale = make_scale("paper", "runs/x")
    table1 = reproduce.TARGETS["table1"].plan(scale)
    assert len(table1) == 12 * 5
    sgd = table1["resnet18-cifar100/sgd"][0]
    assert (sgd.model, sgd.dataset, sgd.epochs, sgd.rho) == ("resnet18", "cifar100", 400, 0.1)
    fig1 = reproduce.TARGETS["fig1"].plan(scale)["sam"][0]
    assert (fig1.model, fig1.dataset, fig1.epochs) == ("simplecnn", "cifar10", 200)
    with pytest.raises(ValueError, match="table2 .* not implemented"):
        reproduce.TARGETS["table2"].plan(scale)


def test_a_run_folder_from_another_configuration_is_refused(tmp_path):
    _, plan = plans("fig1", tmp_path)
    config = plan["fig1"]["sam"][0]
    config.run_dir.mkdir(parents=True)
    from eigensam.lab.engine import run_folder as tracking

    other = TrainConfig(**{**config.to_dict(), "lr": 0.5})
    tracking.write_yaml(config.run_dir / tracking.CONFIG_FILE, other.to_dict())
    with pytest.raises(ValueError, match="different configuration.*lr"):
        plans("fig1", tmp_path)


def test_cli_reports_bad_input_before_training(tmp_path, capsys):
    assert main(["reproduce", "fig1", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    for jobs in ("0", "-1"):
        assert main(["reproduce", "fig1", "--jobs", jobs, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "jobs must be an integer >= 1" in err
        assert "Traceback" not in err
    assert not any(tmp_path.iterdir())
    file = tmp_path / "report.md"
    file.write_text("not a folder")
    assert main(["reproduce", "headline", "--out", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"out: {file} is a file" in err


def test_report_states_scales_rules_and_times(tmp_path):
    scale = make_scale("cpu", tmp_path)
    invocation = reproduce._invocation("table2", scale, (0, 1), 2, 600.0)
    assert (
        invocation == "eigensam reproduce table2 --scale cpu --seeds 0,1 --jobs 2 --stop-after 10"
    )
    generated = reproduce._generated(invocation, 600.0, 540.0, 2, (15, 1800.0), 1100.0)
    claim = not_testable("ViT-B-16", "98.5", "needs a GPU")
    section = Section("table2", "Table 2", "eigensam reproduce table2", "body\n", [], [claim])
    report = tmp_path / "report.md"
    write_report([section], report, header=reproduce._header(scale), generated=generated)
    text = report.read_text()
    assert "short CPU scale" in text and "Deviations" in text
    assert "*contradicted*" in text and "*inconclusive*" in text and "MDE" in text
    assert '## Verdicts\n\n--8<-- "report/verdicts.md"' in text
    assert '--8<-- "report/table2.md"' in text
    part = (tmp_path / "report" / "table2.md").read_text()
    assert "10.0 min" in part and "1100 CPU-seconds" in part and "15 runs took 0.50 h" in part
    assert "not testable on CPU" in (tmp_path / "report" / "verdicts.md").read_text()


def claim_section(target: str, verdict_value: float) -> Section:
    claim = paired_claim(
        f"{target} claim", "+0.2", [verdict_value, verdict_value + 0.1], [0.0, 0.0], expect=1
    )
    return Section(target, target.title(), f"eigensam reproduce {target}", "body\n", [], [claim])


def test_one_target_is_regenerated_without_touching_the_others(tmp_path):
    """Each target's section is its own file; rewriting one keeps the others' files and
    rebuilds the page's includes and verdict table from every section file present."""
    page = tmp_path / "docs" / "reproduction.md"
    order = ["headline", "table1", "fig1"]
    write_report(
        [claim_section("table1", 1.0), claim_section("fig1", 2.0)],
        page,
        header="# R\n",
        order=order,
    )
    folder = page.parent / "reproduction"
    fig1 = (folder / "fig1.md").read_text()
    write_report([claim_section("headline", 3.0)], page, header="# R\n", order=order)
    write_report([claim_section("table1", 5.0)], page, header="# R\n", order=order)
    assert (folder / "fig1.md").read_text() == fig1  # untouched
    assert "+5.05" in (folder / "table1.md").read_text()  # rewritten
    text = page.read_text()
    includes = [line for line in text.splitlines() if line.startswith("--8<--")]
    assert includes == [
        '--8<-- "reproduction/verdicts.md"',
        '--8<-- "reproduction/headline.md"',
        '--8<-- "reproduction/table1.md"',
        '--8<-- "reproduction/fig1.md"',
    ]
    rows = (folder / "verdicts.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| headline claim",
        "| table1 claim",
        "| fig1 claim",
    ]
    assert "+5.05" in rows[1]
    assert read_section_claims(page, "fig1")[0] == claim_section("fig1", 2.0).claims[0]


@pytest.mark.slow  # 8 tiny training runs: about a minute on an idle 2-core CPU
def test_fig1_and_fig5_end_to_end_on_synthetic_data(tmp_path):
    overrides = {**TINY, "width": 0.125, "epochs": 2, "snapshot_epochs": [1], "eig_interval": 2}
    report = tmp_path / "report.md"
    sections = reproduce.reproduce(
        "fig1", "cpu", (0, 1), tmp_path, report=report, overrides=overrides
    )
    assert [s.target for s in sections] == ["fig1"]
    verdicts = {c.verdict for s in sections for c in s.claims}
    assert verdicts <= set(VERDICTS) and len(sections[0].claims) == 6
    text = report.read_text()
    assert "## Verdicts" in text and '--8<-- "report/fig1.md"' in text
    assert "(report_figures/fig1-fig1.png)" in (tmp_path / "report" / "fig1.md").read_text()
    assert (tmp_path / "report_figures" / "fig1-fig1.png").is_file()
    assert (tmp_path / "fig1" / "fig1.json").is_file()
    # fig5 reuses fig1's runs (nothing retrained) and measures their mid-training snapshots.
    fig5 = reproduce.reproduce("fig5", "cpu", (0, 1), tmp_path, overrides=overrides)
    assert "power/warm" in (tmp_path / "fig5" / "fig5.json").read_text()
    assert fig5[0].claims


def test_the_converged_and_the_short_cpu_scales(tmp_path):
    scale = make_scale("cpu", tmp_path)
    headline = reproduce.TARGETS["headline"].plan(scale)
    assert list(headline) == ["sgd", "sam", "eigen-sam"]
    sam, sgd = headline["sam"][0], headline["sgd"][0]
    # Converged scale (the pilot's choice): 1,024 images, quarter width, 60 epochs, no
    # augmentation, cosine to 0; 8 steps per epoch, so 480 steps; SGD trains twice the epochs.
    assert (sam.train_subset, sam.width, sam.epochs, sam.augment) == (1024, 0.25, 60, False)
    assert sam.lr_schedule == "cosine" and sgd.epochs == 120 and sgd.method == "sgd"
    assert sam.epochs * -(-sam.train_subset // sam.batch_size) == 480
    assert sam.track_every == 240 and sam.track_batches == 0 and sam.eval_every == 60
    assert [c.seed for c in headline["eigen-sam"]] == [0, 1, 2, 3, 4]
    assert headline["eigen-sam"][0].eig_interval == 20
    fig1 = reproduce.TARGETS["fig1"].plan(scale)["sam"][0]
    assert (fig1.train_subset, fig1.width, fig1.epochs, fig1.augment) == (8192, 0.5, 6, True)
    assert fig1.track_batches == 2 and fig1.snapshot_epochs == [3]
    assert scale.note_for(True) != scale.note and "not converged" in scale.note_for(True)
    with pytest.raises(ValueError, match="headline target runs at CPU scale"):
        reproduce.TARGETS["headline"].plan(make_scale("paper", tmp_path))


def test_threads_per_job_keeps_omp_num_threads(monkeypatch):
    from eigensam.lab.experiments import runs

    monkeypatch.setattr(runs.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runs.threads_per_job(1) == 8 and runs.threads_per_job(3) == 2
    assert runs.threads_per_job(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runs.threads_per_job(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert runs.threads_per_job(2) == 4
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        runs.threads_per_job(0)


def test_runs_are_trained_longest_first(tmp_path):
    """Parallel jobs end together when the longest runs start first: Eigen-SAM (2.5 gradients
    per step for 60 epochs) before SGD (1 for 120) and SAM (2 for 60); the short scale's runs
    (8× the images at twice the width) before all of them."""
    scale = make_scale("cpu", tmp_path)
    headline = reproduce.TARGETS["headline"].plan(scale)
    short = reproduce.TARGETS["fig1"].plan(scale)["sgd"][0]
    costs = {m: estimated_cost(runs[0]) for m, runs in headline.items()}
    assert costs["eigen-sam"] > costs["sgd"] == costs["sam"]
    assert estimated_cost(short) > costs["eigen-sam"]


# jobs=2 spawns a pool (two fresh interpreters importing torch): slow on a busy machine.
@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_side_tasks_run_in_the_pool_once_their_runs_are_finished(tmp_path, capsys, jobs):
    """A side task starts only when the runs it needs are finished (it copies a run's summary:
    before the run ends there is none); one that fails, or whose runs never finish, is
    reported and the others go on."""
    run, never = tiny(tmp_path, "run", epochs=1), tiny(tmp_path, "never", epochs=1)
    summary = run.run_dir / "summary.json"
    side = [
        SideTask("copy", (run,), functools.partial(shutil.copyfile, summary, tmp_path / "a")),
        SideTask("broken", (), functools.partial(shutil.copyfile, tmp_path / "no", tmp_path / "b")),
        SideTask("blocked", (never,), functools.partial(Path.touch, tmp_path / "c")),
    ]
    summaries = execute([run], jobs, side)
    assert summaries[run.run_dir]["status"] == "finished"
    assert (tmp_path / "a").read_text() == summary.read_text()
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    err = capsys.readouterr().err
    assert "1 runs: 0 already finished, 1 to train, 3 side tasks" in err
    assert "copy: done in" in err and "broken: failed: FileNotFoundError" in err
    assert "blocked: not run (its runs did not finish)" in err
