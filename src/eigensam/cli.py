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

from eigensam.lab import experiments
from eigensam.lab.checkpoints import fixed_batches, load_trained
from eigensam.lab.reports import power_convergence_report, spectrum_report
from eigensam.lab.train import METHODS, TrainConfig, Trainer, load_config

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
        kind = next(t for t in (int, float, str) if t is hint or t in typing.get_args(hint))
        parser.add_argument(flag, type=kind, default=None, help=help_text)


def _config_overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**overrides, **_parse_overrides(args.set)}


# --------------------------------------------------------------------------------------------
# compare

COMPARE_FLAGS = (
    "train_subset",
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
    if code == 0:
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
    if code == 0:
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
    parser.add_argument("--trace-matvecs", type=int, default=99, help="Hutch++ budget (def. 99)")
    parser.set_defaults(handler=_run_spectrum)


def _run_spectrum(args: argparse.Namespace) -> int:
    trained = _prepare(lambda: load_trained(args.checkpoint))
    batches = _prepare(lambda: fixed_batches(trained.config, args.data_subset, args.batch_size))
    out = args.out or trained.folder
    report = _prepare(
        lambda: spectrum_report(
            trained.model,
            batches,
            out,
            top_k=args.top_k,
            lanczos_iters=args.lanczos_iters,
            trace_matvecs=args.trace_matvecs,
            mode=args.mode,
            backend=args.hvp,
            seed=args.seed,
            label=f"{trained.config.method} step {trained.step}",
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

SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_compare,
    _add_train,
    _add_spectrum,
    _add_power_convergence,
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
        return args.handler(args)
    except InputError as error:
        return _fail(str(error), 2)
