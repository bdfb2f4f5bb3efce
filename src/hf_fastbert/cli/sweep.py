"""`hf-fastbert sweep`: a grid of speeds and exit rules from one full-depth pass, with the oracle bound."""

import logging
import sys
from pathlib import Path

from ..analysis import (
    format_table,
    results_source,
    write_sweep,
)
from ..constants import (
    DEFAULT_SPEEDS,
    EXIT_RULES,
    PROG,
    RESULT_COLUMNS,
    STUDENT_COLUMNS,
)
from .common import (
    _add_backend_argument,
    _add_data_arguments,
    _add_exit_rule_arguments,
    _add_model_argument,
    _HelpFormatter,
    _positive_int,
    _speed,
    default_output_dir,
    describe_data,
    prepare_evaluation,
    print_oracle,
)


logger = logging.getLogger(__name__)


def register(commands):
    """Add the `sweep` command to `commands` (the subcommands of `hf-fastbert`)."""
    sweep = commands.add_parser(
        "sweep",
        help="A grid of speeds -> table, CSV/JSON, accuracy-vs-speed-up plot and the LUHA view.",
        description="Runs the data through every layer once and derives every speed's accuracy, mean exit layer and "
        "FLOPs speed-up from it under each --exit-rule (exact: exits depend only on the branches' outputs), with the "
        "oracle bound (leave at the first layer that answers as the teacher). Writes sweep.csv, sweep.json, "
        "sweep.png (accuracy against speed-up), luha.csv and luha.png (each classifier's accuracy by uncertainty "
        "bin: the paper's 'lower uncertainty, higher accuracy').",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(sweep)
    sweep.add_argument("--speeds", type=_speed, nargs="+", default=list(DEFAULT_SPEEDS), help="The grid of speeds.")
    sweep.add_argument(
        "--output-dir",
        help="Where the files go (default: <model>/sweep for a local model). A sweep of other data or another model "
        "there (e.g. the one `push` puts on the model card) is not replaced unless --overwrite-output-dir.",
    )
    sweep.add_argument(
        "--overwrite-output-dir", action="store_true", help="Replace the sweep files of other data in --output-dir."
    )
    sweep.add_argument("--luha-bins", type=_positive_int, default=10, help="Uncertainty bins of the LUHA view.")
    _add_exit_rule_arguments(
        sweep,
        several=True,
        help_text=f"Exit rules to compare side by side ({', '.join(EXIT_RULES)}; default: the model's "
        "config.exit_rule); thresholds and learned need `calibrate --save` first. The oracle bound is reported beside "
        "them.",
    )
    _add_data_arguments(sweep, split_default="test")
    _add_backend_argument(sweep)
    sweep.set_defaults(run=run_sweep)


def run_sweep(args):
    from ..analysis import check_sweep_dir, sweep
    from ..evaluation import distillation_warning

    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, "sweep")
    model, _, dataset = prepare_evaluation(args)
    source = results_source(args.model, describe_data(args.dataset, args.split, args.dataset_config), len(dataset))
    card = Path(args.model).expanduser().is_dir() and output_dir.resolve() == (Path(args.model) / "sweep").resolve()
    check_sweep_dir(output_dir, source, args.overwrite_output_dir, card=card)
    report = sweep(
        model,
        dataset,
        sorted(set(args.speeds)),
        exit_rules=args.exit_rule,
        batch_size=args.batch_size,
        luha_bins=args.luha_bins,
        progress=True,
    )
    several = len(report.by_rule) > 1
    print(f"{len(dataset)} samples; FLOPs speed-up over every layer (= the stock classifier)")
    print(format_table(report.rows, (("exit_rule",) if several else ()) + RESULT_COLUMNS))
    print_oracle(report.oracle, report.summary)
    title = f"{Path(args.model).name}: accuracy against speed-up"
    source = {**source, "exit_rule": next(iter(report.by_rule))}
    print("\nEach student against the teacher (agreement: share of samples where it predicts the teacher's class):")
    print(format_table(report.students, STUDENT_COLUMNS))
    write_sweep(report.results, report.luha, output_dir, title, source, report.oracle, report.by_rule, report.students)
    print(f"wrote sweep.csv, sweep.json, sweep.png, luha.csv, luha.png and students.csv to {output_dir}")
    warning = distillation_warning(report.students)
    if warning is not None:
        print(f"WARNING: {warning} (`{PROG} train --help`)", file=sys.stderr)
