"""`hf-fastbert calibrate`: the largest speed within an accuracy drop, or the smallest reaching a speed-up."""

import logging
import shutil
from pathlib import Path

from ..analysis import (
    describe_drop,
    format_table,
)
from ..constants import (
    CALIBRATION_SPEEDS,
    EXIT_RULES,
    RESULT_COLUMNS,
)
from ..files import atomic_path, check_writable_folder
from .common import (
    _add_backend_argument,
    _add_data_arguments,
    _add_exit_rule_arguments,
    _add_model_argument,
    _HelpFormatter,
    _non_negative_float,
    _positive_float,
    _probability,
    _speed,
    prepare_evaluation,
    print_oracle,
)


logger = logging.getLogger(__name__)

CALIBRATION_MIN_SAMPLES = 1000  # below this, `calibrate` warns that its accuracy budget is not measured reliably


def register(commands):
    """Add the `calibrate` command to `commands` (the subcommands of `hf-fastbert`)."""
    calibrate = commands.add_parser(
        "calibrate",
        help="Pick the exit rule and speed for an accuracy budget or a target speed-up.",
        description="On a validation set, fits the calibrated exit rules (per-layer thresholds, learned exit), then "
        "picks the exit rule and speed with the largest FLOPs speed-up whose accuracy stays within "
        "--max-accuracy-drop of full depth, or the most accurate reaching --target-speedup. Prints each rule's "
        "choice beside the oracle bound. --save writes the choice into the model's config.json as its default.",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(calibrate)
    criterion = calibrate.add_mutually_exclusive_group(required=True)
    criterion.add_argument(
        "--max-accuracy-drop",
        type=_non_negative_float,
        help="Largest accepted accuracy loss, as a fraction (0.005 = 0.5 points).",
    )
    criterion.add_argument("--target-speedup", type=_positive_float, help="FLOPs speed-up to reach, e.g. 2.")
    calibrate.add_argument(
        "--confidence",
        type=_probability,
        help="With --max-accuracy-drop: keep the expected accuracy drop on new data within the budget at this "
        "confidence (e.g. 0.95), not only the drop measured on this validation data. Each speed's drop is read at its "
        "upper confidence bound, speeds in increasing order: slower speeds, but a promise that holds far more often "
        "(docs/training.md, 'What a calibrated speed promises on new data').",
    )
    calibrate.add_argument(
        "--speeds",
        type=_speed,
        nargs="+",
        default=list(CALIBRATION_SPEEDS),
        help="Candidate speeds; 0 is always added (default: 0, 0.01, ..., 0.99).",
    )
    calibrate.add_argument(
        "--save",
        action="store_true",
        help="Write the chosen rule and speed (with the calibrated thresholds and learned heads) into the local "
        "model's config.json.",
    )
    _add_exit_rule_arguments(
        calibrate,
        several=True,
        default=list(EXIT_RULES),
        help_text="Candidate exit rules; thresholds and learned are fitted on this validation data first.",
    )
    _add_data_arguments(calibrate)
    _add_backend_argument(calibrate)
    calibrate.set_defaults(run=run_calibrate)


def run_calibrate(args):

    from ..analysis import calibrate

    save_dir = Path(args.model).expanduser()
    if args.save:
        if not save_dir.is_dir():
            raise ValueError(f"--save needs a local model folder, got {args.model}")
        check_writable_folder(save_dir, f"--save cannot write {save_dir / 'config.json'}")
    if args.confidence is not None and args.max_accuracy_drop is None:
        raise ValueError("--confidence bounds an accuracy budget: give it with --max-accuracy-drop")
    model, _, dataset = prepare_evaluation(args)
    choice = calibrate(
        model,
        dataset,
        max_accuracy_drop=args.max_accuracy_drop,
        target_speedup=args.target_speedup,
        confidence=args.confidence,
        exit_rules=args.exit_rule,
        speeds=args.speeds,
        batch_size=args.batch_size,
        progress=True,
    )
    reference = choice.reference
    print(f"{len(dataset)} samples; full depth: accuracy {reference['accuracy']:.4f}")
    if args.max_accuracy_drop is not None and len(dataset) < CALIBRATION_MIN_SAMPLES:
        logger.warning(
            f"Calibrated on only {len(dataset)} samples: one sample is {100 / len(dataset):.2g} accuracy points, so "
            f"an accuracy budget of {100 * args.max_accuracy_drop:g} points is not measured reliably. Calibrate on at "
            f"least {CALIBRATION_MIN_SAMPLES:,} held-out samples (--split, --max-samples)."
        )
    rows = [{"exit_rule": rule, **(row or {})} for rule, row in choice.candidates.items()]
    print(format_table(rows, ("exit_rule",) + RESULT_COLUMNS + ("accuracy_drop_se",)))
    print_oracle(choice.oracle, [])
    if args.max_accuracy_drop is None:
        criterion = f"a FLOPs speed-up of at least {args.target_speedup:g}x"
    else:
        criterion = f"accuracy within {args.max_accuracy_drop:g} of full depth"
        if args.confidence is not None:
            criterion += f" at {args.confidence:.0%} confidence"
    print(
        f"calibrated speed: {choice.speed:g} with exit rule {choice.exit_rule} ({criterion}; "
        f"{choice.row['flops_speedup']:.2f}x FLOPs, accuracy {choice.row['accuracy']:.4f}, "
        f"{describe_drop(choice.row, choice.reference, args.confidence or 0.95)})"
    )
    if args.save:
        saved = f"exit_rule={choice.exit_rule}, speed={choice.speed:g}"
        if args.backend == "onnx":  # the runtime's own default; config.json keeps the PyTorch model's
            path = model.save_calibration(save_dir)
            print(f"saved {saved} as the ONNX Runtime default in {path}")
            return
        previous = save_dir / "config.json.previous"
        with atomic_path(previous) as temporary:  # the config before, kept whole
            shutil.copy2(save_dir / "config.json", temporary)
        with atomic_path(save_dir / "config.json") as temporary:
            model.config.to_json_file(temporary, use_diff=True)  # as `save_pretrained` writes it
        print(f"saved {saved} as the default in {save_dir / 'config.json'} (the previous one: {previous})")
