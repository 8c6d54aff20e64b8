"""The `mtl-breast` console script: one program, one subcommand per job.

`pretrain` and `finetune` hand their arguments to LightningCLI (fit / validate / test, --config,
--print_config). The other subcommands are thin wrappers that parse flags and call one library
function, so everything they do is also reachable from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mtl_breast.run.fitcheck_flags import add_arguments as add_fit_check_arguments

# Imports inside functions: each subcommand imports the library function it calls when it runs, so building the
# parser (`mtl-breast --help`) loads neither torch nor Lightning (tests/test_cli_startup.py).
Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args) -> exit code` as subcommand `name`; `configure` adds its flags."""

    def register(fn: Command) -> Command:
        _COMMANDS[name] = (help, configure, fn)
        return fn

    return register


def _print_skipped(skipped: list[dict[str, str]]) -> None:
    """One stderr line per skipped case, naming it and its file ("case X (file): why" -> "skipped X (file): why")."""
    for item in skipped:
        pid, reason = item["patient_id"], item["reason"]
        detail = reason[len(f"case {pid}"):] if reason.startswith(f"case {pid} ") else f": {reason}"
        print(f"  skipped {pid}{detail}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- synth
def _synth_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output root (MAMA-MIA layout)")
    p.add_argument("--cases", type=int, default=40, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=48, help="voxels per side of the phantom volume")
    p.add_argument("--difficulty-shift", type=float, default=0.0,
                   help="how much harder segmentation/pCR is for the dense / young subgroups (0 = none, 1 = strong)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of cases in the test split")
    p.add_argument("--physics", choices=("randomised", "fixed"), default="randomised",
                   help="randomised per-case physics with withheld acquisition values (default), or one fixed value "
                        "per field strength with every value recorded (for tests that need exact values)")


@command("synth", "write a synthetic DCE-MRI dataset in the MAMA-MIA layout", _synth_flags)
def _synth(args: argparse.Namespace) -> int:
    from mtl_breast.phantoms.collection import generate_dataset

    summary = generate_dataset(args.out, num_cases=args.cases, seed=args.seed, size=args.size,
                               difficulty_shift=args.difficulty_shift, test_fraction=args.test_fraction,
                               physics=args.physics)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- convert
def _convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dicom", type=Path, required=True, help="folder of DICOM studies (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="output root: one case folder per study (NIfTI phases "
                                                           "+ manifest.json with times and header metadata)")
    p.add_argument("--clinical", type=Path, default=None,
                   help="the collection's clinical table (CSV/XLSX); its pCR goes into each matching case")
    p.add_argument("--id-column", default=None, help="patient-id column of --clinical (default: found by name)")
    p.add_argument("--pcr-column", default=None, help="pCR column of --clinical (default: the column named *pcr*)")


@command("convert", "convert DICOM studies into case folders (the dynamic series as per-phase NIfTI)", _convert_flags)
def _convert(args: argparse.Namespace) -> int:
    from mtl_breast.data.convert import convert_dicom

    report = convert_dicom(args.dicom, args.out, clinical=args.clinical, id_column=args.id_column,
                           pcr_column=args.pcr_column)
    ignored = sum(len(v) for v in report["ignored"].values())
    print(f"converted {len(report['converted'])}, unchanged {len(report['unchanged'])}, skipped "
          f"{len(report['skipped'])}; {ignored} non-dynamic series ignored; report (with each series ignored and "
          f"why): {report['report_path']}")
    _print_skipped(report["skipped"])
    return 1 if report["skipped"] else 0


# ---------------------------------------------------------------------------------------------- corpus
def _corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build",), help="build: list every usable case of the roots once")
    p.add_argument("--root", type=Path, action="append", required=True,
                   help="a dataset root (MAMA-MIA, case folders, DICOM studies, BreastDCEDL); repeat for each; a "
                        "patient in several roots is kept from the first")
    p.add_argument("--out", type=Path, required=True, help="corpus file (JSON) for `pretrain fit --data.corpus`")
    p.add_argument("--eval-split", action="append", default=[], metavar="ROOT[:SPLIT]",
                   help="an evaluation split whose patients are left out: a MAMA-MIA root or split CSV (split "
                        "default test) or a text file of patient ids; repeatable")
    p.add_argument("--include-test", action="store_true",
                   help="do not treat the test split of each MAMA-MIA --root as an evaluation split")


@command("corpus", "build one pretraining corpus over several roots: each patient once, evaluation patients out",
         _corpus_flags)
def _corpus(args: argparse.Namespace) -> int:
    from mtl_breast.data.corpus import build_corpus

    corpus = build_corpus(args.root, args.out, eval_splits=args.eval_split, include_test=args.include_test)
    summary = corpus["summary"]
    for root in corpus["roots"]:
        print(f"{root['path']} ({root['collection']}): {root['cases_read']} cases read, {root['kept']} kept")
    print(f"corpus: {summary['cases']} cases of {summary['patients']} patients; removed "
          f"{summary['removed_evaluation_cases']} case(s) of {summary['removed_evaluation_patients']} patient(s) in "
          f"evaluation splits ({', '.join(summary['evaluation_splits']) or 'none'}) and "
          f"{summary['removed_duplicate_cases']} case(s) of patients already in an earlier root; written to {args.out}")
    _print_skipped(corpus["unreadable"])
    return 1 if corpus["unreadable"] else 0


# ---------------------------------------------------------------------------------------------- preprocess
def _preprocess_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="dataset root (MAMA-MIA layout or folder of cases)")
    p.add_argument("--cache", type=Path, required=True, help="cache root")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="target spacing in mm (default 1 1 1)")
    p.add_argument("--margin", type=float, default=None, help="breast box margin in mm")
    p.add_argument("--clip", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="percentile clip before normalisation, e.g. 0.5 99.5")
    p.add_argument("--no-crop", action="store_true", help="do not crop to the breast box")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default=None,
                   help="stored type of the cached phases (default float16: half the disk, error <= 2^-11 relative)")


@command("preprocess", "resample, crop and normalise cases into the training cache", _preprocess_flags)
def _preprocess(args: argparse.Namespace) -> int:
    from mtl_breast.data.build import preprocess_dataset
    from mtl_breast.data.preprocess import PreprocessConfig

    overrides = {}
    if args.spacing is not None:
        overrides["spacing"] = tuple(args.spacing)
    if args.margin is not None:
        overrides["margin_mm"] = args.margin
    if args.clip is not None:
        overrides["clip_percentiles"] = tuple(args.clip)
    if args.no_crop:
        overrides["crop_to_breast"] = False
    if args.cache_dtype is not None:
        overrides["cache_dtype"] = args.cache_dtype
    report = preprocess_dataset(args.data, args.cache, PreprocessConfig(**overrides), workers=args.workers)
    again = f" ({len(report['stale'])} again: their source files or table values changed)" if report["stale"] else ""
    print(f"done {len(report['done'])}{again}, skipped {len(report['skipped'])}, already cached "
          f"{len(report['cached'])}; report: {report['report_path']}")
    print(report["assumed"]["line"])
    _print_skipped(report["skipped"])
    if report["skipped"]:
        print(f"mtl-breast preprocess: {len(report['skipped'])} case(s) skipped (listed above and in "
              f"{report['report_path']})", file=sys.stderr)
    return 1 if report["skipped"] else 0


# ---------------------------------------------------------------------------------------------- export
def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, required=True, help="Lightning checkpoint (.ckpt) of pretrain or finetune")
    p.add_argument("--out", type=Path, required=True, help="output folder for model.safetensors + config.json")


@command("export", "turn a training checkpoint into released weights", _export_flags)
def _export(args: argparse.Namespace) -> int:
    from mtl_breast.tasks.export import export_checkpoint

    print(f"weights written to {export_checkpoint(args.ckpt, args.out)}")
    return 0


# ---------------------------------------------------------------------------------------------- predict
def _predict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, required=True, help="exported joint-model weights folder")
    p.add_argument("--data", type=Path, required=True, help="MAMA-MIA root or folder of cases")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="test", choices=("test", "train", "all"),
                   help="split of a MAMA-MIA root to predict (a root without a split file: all cases)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--largest-component", action="store_true", help="keep the largest tumour component only")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default 0.5)")
    p.add_argument("--device", default=None)


@command("predict", "predict tumour masks (NIfTI) and pCR (CSV) for new cases", _predict_flags)
def _predict(args: argparse.Namespace) -> int:
    from mtl_breast.run.predict import predict_dataset

    report = predict_dataset(args.weights, args.data, args.out, device=args.device,
                             split=None if args.split == "all" else args.split, tta_flips=args.tta or None,
                             largest_component=args.largest_component or None, overlap=args.overlap)
    print(f"predicted {len(report['done'])} cases into {args.out}; skipped {len(report['skipped'])}")
    print(report["assumed"]["line"])
    _print_skipped(report["skipped"])
    if report["skipped"]:
        print(f"mtl-breast predict: {len(report['skipped'])} case(s) skipped (listed above); no mask or pCR row "
              "was written for them", file=sys.stderr)
    return 1 if report["skipped"] else 0


# ---------------------------------------------------------------------------------------------- evaluate
def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", type=Path, required=True, help="folder with pred_segmentations/ and/or predictions.csv")
    p.add_argument("--data", type=Path, required=True, help="MAMA-MIA root with expert masks and clinical data")
    p.add_argument("--out", type=Path, required=True, help="where scores.json and report.md go")
    p.add_argument("--spacing-aware", action="store_true", help="HD95 in mm instead of voxel indices")
    p.add_argument("--cases", type=Path, default=None, metavar="FILE",
                   help="patient ids to score, one per line (default: the test split of the dataset's split file, "
                        "or every case without one); a case without a prediction is scored as a failure")


@command("evaluate", "score predictions exactly as the MAMA-MIA challenge does", _evaluate_flags)
def _evaluate(args: argparse.Namespace) -> int:
    from mtl_breast.run.evaluate import evaluate, headline

    for flag, folder in (("--pred", args.pred), ("--data", args.data)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {folder}: no such folder")
    scores = evaluate(args.pred, args.data, args.out, spacing_aware=args.spacing_aware, cases=args.cases)
    summary = headline(scores)
    for part in summary.values():  # the ids are in scores.json; the summary says how many
        if isinstance(part.get("missing_predictions"), list):
            part["missing_predictions"] = len(part["missing_predictions"])
    print(json.dumps(summary, indent=2))
    print(f"scores: {args.out / 'scores.json'}  report: {args.out / 'report.md'}")
    missing = scores.get("missing_predictions") or []
    if missing:
        print(f"mtl-breast evaluate: warning: {len(missing)} of {scores['scored_cases']['n']} case(s) have no "
              f"prediction and were scored as failures (missing_predictions in {args.out / 'scores.json'})",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- extract
def _extract_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, required=True, help="exported encoder / MAE / joint weights folder")
    p.add_argument("--data", type=Path, required=True, help="dataset root")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None)


@command("extract", "write encoder features of every case (per token, per phase, pooled)", _extract_flags)
def _extract(args: argparse.Namespace) -> int:
    from mtl_breast.run.extract import extract_dataset

    report = extract_dataset(args.weights, args.data, args.out, device=args.device)
    print(f"features of {len(report['done'])} cases in {args.out}; table {report['table']}")
    _print_skipped(report["skipped"])
    return 1 if report["skipped"] else 0


# ---------------------------------------------------------------------------------------------- plot
def _plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="training run folder (its --trainer.default_root_dir)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default RUN/plots)")


@command("plot", "draw a training run's loss, learning-rate and validation curves to PNG", _plot_flags)
def _plot(args: argparse.Namespace) -> int:
    from mtl_breast.run.plot import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return 0


# ---------------------------------------------------------------------------------------------- fit-check
@command("fit-check", "estimate the peak GPU memory of a training config without a GPU", add_fit_check_arguments)
def _fit_check(args: argparse.Namespace) -> int:
    from mtl_breast.run.fitcheck import run

    return run(args)


# ---------------------------------------------------------------------------------------------- demo
def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--labelled", type=int, default=288, help="labelled phantoms for fine-tuning (train + validation)")
    p.add_argument("--held-out", type=int, default=150, help="phantoms that only prediction and scoring see")
    p.add_argument("--pool", type=int, default=200, help="unlabeled phantoms for MAE pretraining")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--physics", choices=("randomised", "fixed"), default="randomised",
                   help="phantom physics (see `mtl-breast synth --help`)")


@command("demo", "synthesise phantoms, pretrain, fine-tune, predict and evaluate end to end", _demo_flags)
def _demo(args: argparse.Namespace) -> int:
    from mtl_breast.run.demo import run_demo

    run_demo(args.workdir, labelled=args.labelled, held_out=args.held_out, pool=args.pool, size=args.size,
             seed=args.seed, physics=args.physics)
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl-breast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    for name, what in _TRAINING.items():
        sub.add_parser(name, help=f"{what} through LightningCLI: `mtl-breast {name} fit --config X.yaml`")
    return parser


# The two training commands hand everything to LightningCLI, whose parser needs torch and Lightning; their own
# help is written here so that `mtl-breast pretrain --help` answers at once.
_TRAINING = {"pretrain": "MAE pretraining of the encoder on unlabelled phases",
             "finetune": "joint segmentation and pCR fine-tuning"}


def _training_help(task: str) -> str:
    return (f"usage: mtl-breast {task} {{fit,validate,test}} [--config X.yaml ...] [--KEY VALUE ...]\n\n"
            f"{_TRAINING[task]} through LightningCLI.\n\n"
            "subcommands:\n"
            "  fit       train; --ckpt_path last resumes the run in --trainer.default_root_dir\n"
            "  validate  score a checkpoint (--ckpt_path) on the validation split\n"
            "  test      score a checkpoint (--ckpt_path) on the test split\n\n"
            f"example:\n  mtl-breast {task} fit --config configs/{task}/demo.yaml --data.root DATA\n\n"
            f"Every option with its default: `mtl-breast {task} fit --help` (loads torch and Lightning, seconds).\n")


def _is_input_error(err: BaseException) -> bool:
    """Errors about the user's files, settings and disk, whose message says what is wrong (no traceback needed)."""
    from mtl_breast.data.cache import CacheError
    from mtl_breast.data.case import CaseError, DatasetError
    from mtl_breast.files import DISK_FULL, NOT_WRITABLE, DiskFullError
    from mtl_breast.hub import WeightsError
    from mtl_breast.predictor import SettingsError
    from mtl_breast.run.evaluate import PredictionsError
    from mtl_breast.tasks.checkpointing import CheckpointError

    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno in NOT_WRITABLE | DISK_FULL:
        return True  # a read-only or full output folder: the message names the file
    return isinstance(err, (CaseError, DatasetError, CacheError, WeightsError, PredictionsError, DiskFullError,
                            SettingsError, CheckpointError,
                            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (2 for bad input, reported in one line on stderr).

    Set MTL_BREAST_TRACEBACK=1 to get the full traceback of such an error instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command_name = argv[0] if argv else ""
    try:
        if command_name in _TRAINING and argv[1:] in ([], ["-h"], ["--help"]):
            print(_training_help(command_name), file=sys.stdout if argv[1:] else sys.stderr, end="")
            return 0 if argv[1:] else 2
        if command_name in _TRAINING:
            from mtl_breast.run.train import lightning_cli  # torch and Lightning: only when training

            return lightning_cli(command_name, argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        return _COMMANDS[args.command][2](args)
    except Exception as err:
        if os.environ.get("MTL_BREAST_TRACEBACK") or not _is_input_error(err):
            raise
        print(f"mtl-breast {command_name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
