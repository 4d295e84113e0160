"""The ``eigensam`` command.

Subcommands are registered by the functions in :data:`SUBCOMMANDS`: each adds its parser to the
subparsers and sets ``handler``, a function of the parsed arguments returning the exit code.
Bad input (unknown names, invalid values, missing files) prints one ``eigensam: error:`` message
and exits with 2; a diverged run exits with 1, an interrupted one with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eigensam.lab import experiments, sde
from eigensam.lab.curvature_reports import (
    CURVATURES,
    block_spectrum_report,
    blocks_table,
    power_convergence_report,
    spectrum_report,
)
from eigensam.lab.engine.config import METHODS, TrainConfig, load_config
from eigensam.lab.engine.launch import is_main, leave
from eigensam.lab.engine.train import Trainer
from eigensam.lab.engine.trained_model import fixed_batches, load_trained
from eigensam.lab.experiments import reproduce
from eigensam.lab.experiments.report import HEADLINE_END, HEADLINE_START

INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError)
Handler = Callable[[argparse.Namespace], int]


class InputError(Exception):
    """Bad command-line input, reported as one line with exit code 2."""


def _fail(message: str, code: int) -> int:
    print(f"eigensam: error: {message}", file=sys.stderr)
    return code


def _prepare(build: Callable[[], Any]) -> Any:
    """``build()``, with bad-input exceptions turned into :class:`InputError`."""
    try:
        return build()
    except INPUT_ERRORS as error:
        raise InputError(str(error)) from error


def _execute(run: Callable[[], Any], resume_hint: str) -> int:
    """Run training: 0 when it finishes, 1 on divergence, 130 on Ctrl-C (saying how to resume)."""
    try:
        run()
    except FloatingPointError as error:
        return _fail(str(error), 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; to continue, {resume_hint}", 130)
    return 0


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings to a mapping; values are read as YAML (numbers, true, null)."""
    import yaml  # here, so that importing this module without [lab] fails on eigensam.lab

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects key=value, got {item!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return overrides


def _csv(kind: Callable[[str], Any], name: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a comma-separated list") from None

    return parse


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """``--field-name`` options for :class:`TrainConfig` fields, typed and documented from the
    dataclass; unset options stay None so the configuration's default applies."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in names:
        hint = hints[name]
        flag = "--" + name.replace("_", "-")
        default = experiments.DEFAULT_OVERRIDES.get(name, fields[name].default)
        help_text = f"{fields[name].metadata['help']} (default: {default})"
        if hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kinds = [t for t in (int, float, str) if t is hint or t in typing.get_args(hint)]
        kind = _number_or_word(kinds[0]) if kinds[1:] == [str] else kinds[0]
        parser.add_argument(flag, type=kind, default=None, help=help_text)


def _number_or_word(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser giving a number of ``kind`` if the text reads as one (``--alpha 0.2``,
    ``--hessian-parts 3``), else the word (``--alpha auto``)."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text

    return parse


def _config_overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**overrides, **_parse_overrides(args.set)}


# --------------------------------------------------------------------------------------------
# compare

COMPARE_FLAGS = (
    "train_subset",
    "label_noise",
    "val_fraction",
    "data_dir",
    "download",
    "width",
    "batch_size",
    "lr",
    "weight_decay",
    "rho",
    "alpha",
    "eig_interval",
    "eig_iters",
    "eig_method",
    "hvp",
    "hessian_parts",
    "track_every",
    "track_iters",
    "device",
    "augment",
)


def _add_compare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train several methods over seeds and compare them",
        description="Train every method with every seed (runs in OUT/<method>-seed<s>/), then "
        "write OUT/comparison.md and OUT/comparison.png and print the table. Runs already "
        "finished are reused and interrupted ones continued: rerun the same command to resume.",
    )
    parser.add_argument("--dataset", required=True, help="dataset name")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--methods", required=True, type=_csv(str, "--methods"))
    parser.add_argument("--seeds", default=[0], type=_csv(int, "--seeds"), help="default: 0")
    parser.add_argument("--epochs", required=True, type=int)
    parser.add_argument("--out", default="runs/compare", help="output folder")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other TrainConfig field (repeatable)",
    )
    _add_config_flags(parser, COMPARE_FLAGS)
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    overrides = _config_overrides(args, COMPARE_FLAGS)
    plan = _prepare(
        lambda: experiments.plan_comparison(
            args.dataset, args.model, args.methods, args.seeds, args.epochs, args.out, **overrides
        )
    )
    code = _execute(plan.run, "run the same command again")
    if code == 0 and is_main():
        out = Path(args.out)
        print(f"wrote {out / experiments.COMPARISON_TABLE} and {out / experiments.COMPARISON_PLOT}")
    return code


# --------------------------------------------------------------------------------------------
# train


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one run from a YAML config",
        description="Train one run from a YAML config (see configs/), or continue one with "
        f"--resume. Methods: {', '.join(METHODS)}.",
    )
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--resume", type=Path, help="run folder to continue")
    parser.add_argument("--out", help="run folder (default: out_dir of the config)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    parser.set_defaults(handler=_run_train)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    if args.config is None and args.resume is None:
        raise InputError("train needs --config FILE, or --resume RUN_DIR")
    overrides = _parse_overrides(args.set)
    if args.out is not None:
        overrides["out_dir"] = args.out
    source = args.config if args.config is not None else args.resume / "config.yaml"
    return load_config(source, overrides)


def _run_train(args: argparse.Namespace) -> int:
    trainer = _prepare(lambda: Trainer(_train_config(args), args.resume))
    code = _execute(trainer.run, f"run: eigensam train --resume {trainer.dir}")
    if code == 0 and trainer.ranks.main:
        print((trainer.dir / "summary.md").read_text(encoding="utf-8"), end="")
        print(f"run folder: {trainer.dir}")
    return code


# --------------------------------------------------------------------------------------------
# spectrum and power-convergence


def _add_measure_flags(parser: argparse.ArgumentParser, data_subset: int) -> None:
    parser.add_argument("checkpoint", type=Path, help="run folder or checkpoint.pt")
    parser.add_argument(
        "--data-subset",
        type=int,
        default=data_subset,
        help=f"training samples the Hessian averages over (default: {data_subset})",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="default: 128")
    parser.add_argument(
        "--mode", choices=("train", "eval"), default="train", help="model mode (default: train)"
    )
    parser.add_argument("--hvp", default="autograd", help="HVP backend (default: autograd)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--out", type=Path, help="output folder (default: the run folder)")


def _add_spectrum(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "spectrum",
        help="top eigenvalues, trace and spectral density of a trained model's Hessian",
        description="Write spectrum.json and spectrum.png (log-scale density, as the paper's "
        "Figure 3) for the Hessian of the training loss averaged over --data-subset samples.",
    )
    _add_measure_flags(parser, data_subset=512)
    parser.add_argument("--top-k", type=int, default=1, help="default: 1")
    parser.add_argument("--lanczos-iters", type=int, default=90, help="SLQ steps (default: 90)")
    parser.add_argument(
        "--trace-matvecs", type=int, default=None, help="Hutch++ budget (default: 99; per block 30)"
    )
    parser.add_argument(
        "--curvature", choices=CURVATURES, default="hessian", help="matrix (default: hessian)"
    )
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="λ₁ and trace of each layer's block instead (spectrum_blocks.json, .md and .png)",
    )
    parser.add_argument(
        "--blocks",
        type=_csv(str, "--blocks"),
        default=None,
        help="with --per-layer: these blocks instead of one per layer (module names, parameter "
        "names or glob patterns such as '*.bias', comma-separated)",
    )
    parser.set_defaults(handler=_run_spectrum)


def _run_spectrum(args: argparse.Namespace) -> int:
    if args.blocks is not None and not args.per_layer:
        return _fail("--blocks needs --per-layer", 2)
    trained = _prepare(lambda: load_trained(args.checkpoint))
    batches = _prepare(lambda: fixed_batches(trained.config, args.data_subset, args.batch_size))
    out = args.out or trained.folder
    common = dict(
        curvature=args.curvature,
        mode=args.mode,
        backend=args.hvp,
        seed=args.seed,
        label=f"{trained.config.method} step {trained.step}",
    )
    if args.per_layer:
        matvecs = 30 if args.trace_matvecs is None else args.trace_matvecs
        blocks = _prepare(
            lambda: block_spectrum_report(
                trained.model, batches, out, blocks=args.blocks, trace_matvecs=matvecs, **common
            )
        )
        print(blocks_table(blocks), end="")
        print(f"wrote {Path(out) / 'spectrum_blocks'}.json, .md and .png")
        return 0
    matvecs = 99 if args.trace_matvecs is None else args.trace_matvecs
    report = _prepare(
        lambda: spectrum_report(
            trained.model,
            batches,
            out,
            top_k=args.top_k,
            lanczos_iters=args.lanczos_iters,
            trace_matvecs=matvecs,
            **common,
        )
    )
    eigenvalues = ", ".join(f"{e['eigenvalue']:.4g}" for e in report["eigenvalues"])
    trace = report["trace"]
    print(f"top eigenvalues: {eigenvalues}")
    print(f"trace: {trace['estimate']:.4g} ± {trace['std_error']:.2g} (standard error)")
    print(f"wrote {Path(out) / 'spectrum.json'} and {Path(out) / 'spectrum.png'}")
    return 0


def _add_power_convergence(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "power-convergence",
        help="alignment of the top-eigenvector estimate vs HVP steps (paper Figure 5)",
        description="Write power_convergence.json and .png: |cos| and Align of power iteration "
        "and Lanczos estimates with the converged top eigenvector, per HVP step, from a cold "
        "(random) start and a warm start (the checkpoint's Eigen-SAM/X-SAM tracker vector, else "
        "the converged eigenvector of the next --data-subset samples).",
    )
    _add_measure_flags(parser, data_subset=128)
    parser.add_argument("--max-steps", type=int, default=20, help="default: 20")
    parser.set_defaults(handler=_run_power_convergence)


def _run_power_convergence(args: argparse.Namespace) -> int:
    trained = _prepare(lambda: load_trained(args.checkpoint))
    config = trained.config
    batches = _prepare(lambda: fixed_batches(config, args.data_subset, args.batch_size))
    warm = trained.tracker_vector
    if warm is None:
        warm = _prepare(
            lambda: fixed_batches(config, args.data_subset, args.batch_size, args.data_subset)
        )
    out = args.out or trained.folder
    _prepare(
        lambda: power_convergence_report(
            trained.model,
            batches,
            out,
            max_steps=args.max_steps,
            warm_start=warm,
            mode=args.mode,
            backend=args.hvp,
            seed=args.seed,
            label=f"{config.method} step {trained.step}",
        )
    )
    print(f"wrote {Path(out) / 'power_convergence.json'} and .png")
    return 0


# --------------------------------------------------------------------------------------------
# reproduce


def _add_reproduce(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="re-run an experiment of the Eigen-SAM paper and report what reproduces",
        description="Train every run TARGET needs (finished runs are reused, interrupted ones "
        "resumed), then write OUT/TARGET/ (JSON, PNG) and a markdown report with a verdict per "
        "claim. --scale cpu runs on a laptop CPU (SimpleCNN, Fashion-MNIST subset) and says so "
        "in every output; --scale paper uses configs/ (GPU, datasets).",
    )
    parser.add_argument("target", help=f"one of {', '.join([*reproduce.TARGETS, 'all'])}")
    parser.add_argument("--scale", default="cpu", help="cpu (default) or paper")
    parser.add_argument("--seeds", type=_csv(int, "seeds"), default=None, help="default: 0,1,2,3,4")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/reproduce-SCALE")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes at once: training runs, and beside them the targets' own "
        "computations (simulations, fine-tuning, Hessian measurements) (default: 1)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="report file (default: OUT/reproduction.md)"
    )
    parser.add_argument("--data-dir", default=None, help="dataset root (default: see train)")
    parser.add_argument("--device", default=None, help="torch device of every run")
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="MINUTES",
        help="start no new run after this many minutes, then report the runs finished (0: "
        "train nothing, report what is there; default: run everything)",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="with the decide target: write its headline table and conclusion between this "
        "file's <!-- headline:start --> and <!-- headline:end --> markers",
    )
    parser.set_defaults(handler=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    if args.stop_after is not None and not args.stop_after >= 0:
        raise InputError(f"--stop-after must be a number of minutes >= 0, got {args.stop_after}")
    if args.readme is not None:
        text = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
        if HEADLINE_START not in text or HEADLINE_END not in text:
            raise InputError(
                f"--readme: {args.readme} has no {HEADLINE_START} … {HEADLINE_END} markers"
            )
    overrides = {
        k: v for k, v in (("data_dir", args.data_dir), ("device", args.device)) if v is not None
    }
    _prepare(lambda: reproduce.resolve_targets(args.target))
    _prepare(
        lambda: reproduce.plan_targets(
            reproduce.resolve_targets(args.target),
            args.scale,
            args.seeds,
            args.out or Path("runs") / f"reproduce-{args.scale}",
            overrides,
            args.jobs,
        )
    )
    return _execute(
        lambda: reproduce.reproduce(
            args.target,
            args.scale,
            args.seeds,
            args.out,
            jobs=args.jobs,
            report=args.report,
            overrides=overrides,
            stop_after=None if args.stop_after is None else 60 * args.stop_after,
            readme=args.readme,
        ),
        "run the same command again",
    )


# --------------------------------------------------------------------------------------------
# sde

SDE_FIELDS = (
    ("dataset", str),
    ("data_dir", str),
    ("train_subset", int),
    ("test_subset", int),
    ("width", float),
    ("batch_size", int),
    ("lr", float),
    ("rho", float),
    ("steps", int),
    ("track_every", int),
    ("svag_l", int),
    ("lambda_iters", int),
    ("track_batch", int),
    ("eta_horizon", float),
    ("device", str),
)
ETA_SCALING_DEFAULT = (0.04, 0.02, 0.01, 0.005)


def _add_sde(subparsers: Any) -> None:
    defaults, paper = sde.SDEConfig(), sde.SDEConfig.paper()
    parser = subparsers.add_parser(
        "sde",
        help="discrete SAM against its 2nd- and 3rd-order SDEs (paper Figure 2, Theorem 4.1)",
        description="Simulate discrete SAM, SGD and the second- (Eq. 3) and third-order (Eq. 4) "
        "SDEs of SAM (SVAG scheme) from the same initialization and batch stream, over seeds; "
        "write OUT/sde.json, OUT/figure2.png (6 metrics with 95% bands), OUT/weak_errors.md "
        "and OUT/corollary.png (Align(ε, v₁) against cos(∇³f(ĝ,ĝ), ∇λ₁) during SAM). "
        "--l-values adds the convergence in SVAG's l, --eta-scaling the weak error against η "
        "for ρ = c·η^(1/3) and c·η^(1/2). Defaults: the paper's setting (784-unit GeLU MLP, "
        "η = 0.01, ρ = 0.2) on Fashion-MNIST at CPU size; --scale paper for the full size.",
    )
    parser.add_argument("--out", default="runs/sde", help="output folder (default: runs/sde)")
    parser.add_argument(
        "--scale",
        choices=("default", "paper"),
        default="default",
        help="default: CPU-sized (about 10 min on 2 cores); paper: full data, 1000 steps, "
        "10 seeds, l = 8",
    )
    for name, kind in SDE_FIELDS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"default: {getattr(defaults, name)} ({getattr(paper, name)} at paper scale)",
        )
    parser.add_argument(
        "--seeds", type=_csv(int, "--seeds"), help=f"default: {','.join(map(str, defaults.seeds))}"
    )
    parser.add_argument(
        "--l-values",
        type=_csv(int, "--l-values"),
        default=None,
        help="also run both SDEs with these SVAG l (e.g. 1,2,4,8) and tabulate the weak error",
    )
    parser.add_argument(
        "--eta-scaling",
        nargs="?",
        const=",".join(map(str, ETA_SCALING_DEFAULT)),
        default=None,
        type=_csv(float, "--eta-scaling"),
        help="also measure the weak error against η at horizon --eta-horizon (default η values: "
        f"{','.join(map(str, ETA_SCALING_DEFAULT))})",
    )
    parser.add_argument(
        "--no-corollary", action="store_true", help="skip the Corollary 4.1.1 measurement"
    )
    parser.add_argument(
        "--no-figure2",
        action="store_true",
        help="skip the Figure 2 runs (e.g. to run only --eta-scaling)",
    )
    parser.set_defaults(handler=_run_sde)


def _sde_config(args: argparse.Namespace) -> sde.SDEConfig:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name, _ in SDE_FIELDS if getattr(args, name) is not None
    }
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.l_values is not None:
        overrides["l_values"] = tuple(args.l_values)
    if args.eta_scaling is not None:
        overrides["eta_values"] = tuple(args.eta_scaling)
    if args.no_corollary:
        overrides["corollary"] = False
    if args.no_figure2:
        overrides["figure2"] = False
    if args.scale == "paper":
        return sde.SDEConfig.paper(**overrides)
    return sde.SDEConfig(**overrides)


def _run_sde(args: argparse.Namespace) -> int:
    config = _prepare(lambda: _sde_config(args))
    out = Path(args.out)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        summary = _prepare(lambda: sde.run_sde(config, out, progress))
    except FloatingPointError as error:
        return _fail(f"{error}; what was recorded is in {out / sde.RESULTS_FILE}", 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; what was recorded is in {out / sde.RESULTS_FILE}", 130)
    for name in (sde.TABLE_FILE, sde.L_FILES[0], sde.ETA_FILES[0]):
        if name in summary["files"]:
            print((out / name).read_text(encoding="utf-8"))
    corollary = summary["corollary"]
    if corollary.get("mean_align") is not None:
        correlation = corollary["correlation"]
        print(
            f"Corollary 4.1.1: mean Align(ε, v₁) {corollary['mean_align']:.3f}, mean "
            f"cos(∇³f(ĝ,ĝ), ∇λ₁) {corollary['mean_cos_third']:.3f}, correlation "
            + ("–" if correlation is None else f"{correlation:.2f}")
        )
    print(
        f"wall time {summary['wall_seconds']:.0f} s; wrote {', '.join(summary['files'])} in {out}"
    )
    return 0


# --------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_compare,
    _add_train,
    _add_spectrum,
    _add_power_convergence,
    _add_sde,
    _add_reproduce,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eigensam",
        description="Sharpness-aware training that sees the Hessian.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    try:
        code = args.handler(args)
    except InputError as error:
        code = _fail(str(error), 2)
    leave(code)  # a torchrun job's process ends here
    return code
