"""What the commands share: argument types and groups, and the checks run before any long work."""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser

from ..analysis import (
    format_table,
)
from ..backbones import max_input_length
from ..configuration_fastbert import validate_speed
from ..constants import (
    EXIT_RULES,
    SUMMARY_COLUMNS,
)
from ..files import check_writable_folder
from ..loading import load_fastbert


logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


def _speed(value):
    try:
        speed = float(value)
        validate_speed(speed)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid speed {value!r}: must be a number in [0, 1]") from None
    return speed


def _integer(low: int, high: float, requirement: str):
    """An argparse type: an integer in [low, high], else an error saying `requirement`."""

    def parse(value):
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value!r}")
        return number

    return parse


_positive_int = _integer(1, float("inf"), "a positive integer")
# The config's own rule (validate_uncertainty_top_k): the entropy of one probability is always 0.
_top_k = _integer(2, float("inf"), "an integer >= 2 (the entropy of one label is 0)")
_port = _integer(0, 65535, "a port number in [0, 65535] (0: any free port)")


def _non_negative_float(value):
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number


def _positive_float(value):
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value!r}")
    return number


def _probability(value):
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"must be a probability strictly between 0 and 1, e.g. 0.95, got {value!r}")
    return number


class _RefuseTokenArgument(argparse.Action):
    """`--token` on the command line shows the token in `ps` and the shell history: refused, with what to do."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--token would show your token in `ps` and the shell history: set HF_TOKEN or run `hf auth login`"
        )


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in help_text:
            default = action.default
            if isinstance(default, list):
                default = " ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in default)
            help_text += f" (default: {default})"
        return help_text


def _add_model_argument(parser):
    parser.add_argument("model", help="FastBERT model: a folder written by `hf-fastbert train` or a Hub repo id.")


def _add_int8_argument(parser):
    parser.add_argument(
        "--int8",
        action="store_true",
        help="Run the linear layers in int8 on the CPU (dynamic quantization: about 1.8x faster at speed 0, "
        "exits on top; check the accuracy with `evaluate --int8`). With --backend onnx: require an int8 export.",
    )


def _add_backend_argument(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch: the PyTorch model. onnx: its ONNX Runtime stages (`hf-fastbert export MODEL` first; needs "
        "pip install 'hf-fastbert[onnx]'), with the exit rule and speed `calibrate --backend onnx --save` chose for "
        "them, else the model's.",
    )


def _add_data_arguments(parser, *, split_default="validation"):
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        help="Hub dataset name (e.g. rotten_tomatoes) or a local .csv/.json/.jsonl/.parquet file. "
        "Default: the offline demo data (Rotten Tomatoes held-out snippets).",
    )
    group.add_argument("--dataset-config", help="Configuration of a Hub dataset (e.g. sst2 for glue).")
    group.add_argument("--split", default=split_default, help="Split to use (ignored for a local file).")
    group.add_argument("--text-column", default="text", help="Column holding the text.")
    group.add_argument("--text-pair-column", help="Second text column, for sentence-pair tasks.")
    group.add_argument("--label-column", default="label", help="Column holding the labels.")
    group.add_argument("--max-samples", type=_positive_int, help="Use only the first N examples.")
    group.add_argument("--max-length", type=_positive_int, default=128, help="Truncate inputs to N tokens.")
    group.add_argument("--batch-size", type=_positive_int, default=32, help="Inference batch size.")


def _add_exit_rule_arguments(parser, *, several=False, default=None, help_text=None):
    group = parser.add_argument_group("exit rule")
    group.add_argument(
        "--exit-rule",
        nargs="+" if several else None,
        choices=EXIT_RULES,
        default=default,
        metavar="RULE",
        help=help_text
        or f"Exit rule ({', '.join(EXIT_RULES)}; default: the model's config.exit_rule). "
        "thresholds and learned need `calibrate --save` first.",
    )
    group.add_argument(
        "--uncertainty-top-k",
        type=_top_k,
        help="Uncertainty over the K most probable labels (many-class tasks; default: the model's config).",
    )


def input_file(path, what):
    """`path` if it names an existing file; otherwise a one-line error saying what it names instead."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return file


def check_results_file(path):
    """A results file to write (`--output`): a .csv or .json name in a writable folder, checked before computing."""
    path = Path(path).expanduser()
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"cannot write results to {path}: use a .csv or .json file name")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write results to {path}: it is a folder")
    check_writable_folder(path.parent, f"cannot write results to {path}")


def is_local_data(name):
    """Whether `--dataset` names local files (an existing path or a data-file extension) rather than a Hub dataset."""
    from ..data import FILE_BUILDERS

    return Path(name).exists() or Path(name).suffix.lower() in FILE_BUILDERS


def load_split(dataset, split, dataset_config=None):
    """
    One split of the data: the demo's Rotten Tomatoes snippets (`dataset=None`), a local file (the whole file, `split`
    ignored) or a Hub dataset's split.
    """
    from ..data import load_raw_datasets

    if dataset is None:
        from ..demo_data import load_rotten_tomatoes

        splits = load_rotten_tomatoes()
    elif is_local_data(dataset):
        input_file(dataset, "data file")
        return load_raw_datasets(data_files={"data": dataset})["data"]
    else:
        splits = load_raw_datasets(dataset_name=dataset, dataset_config_name=dataset_config)
    if split not in splits:
        raise ValueError(f"the dataset has no split {split!r}; its splits are {sorted(splits)}: pick one with --split")
    return splits[split]


def describe_data(dataset, split, dataset_config=None):
    """Which data an evaluation command ran on, in words, for its results files and the model card."""
    if dataset is None:
        return f"the hf-fastbert demo's Rotten Tomatoes snippets ({split} split)"
    if is_local_data(dataset):
        return Path(dataset).name
    return dataset + (f"/{dataset_config}" if dataset_config else "") + f" ({split} split)"


def prepare_evaluation(args):
    """Load the FastBERT model and its tokenizer, then the labelled evaluation data, tokenized with its label set."""
    from ..backbones import takes_token_type_ids
    from ..data import check_columns, prepare_dataset

    raw = load_split(args.dataset, args.split, args.dataset_config)
    check_columns(raw, [args.text_column, args.text_pair_column, args.label_column], split=args.split)
    model, tokenizer = load_fastbert(args.model, int8=getattr(args, "int8", False), backend=args.backend)
    if getattr(args, "uncertainty_top_k", None) is not None:
        model.config.uncertainty_top_k = args.uncertainty_top_k
    if args.max_samples is not None:
        raw = raw.select(range(min(args.max_samples, len(raw))))
    label_names = [str(model.config.id2label[index]) for index in range(model.config.num_labels)]
    dataset = prepare_dataset(
        raw,
        tokenizer,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        label_names=label_names,
        max_length=min(args.max_length, max_input_length(model.config)),
        split=args.split if args.dataset is None or not is_local_data(args.dataset) else Path(args.dataset).name,
        token_type_ids=takes_token_type_ids(model.config),
    )
    return model, tokenizer, dataset


def default_output_dir(model, name):
    path = Path(model).expanduser()
    return path / name if path.is_dir() else Path(name)


def print_oracle(oracle, summary):
    """The oracle bound, and each rule's share of it within one accuracy point."""
    print(
        f"oracle (leave at the first layer that answers as the teacher): accuracy {oracle['accuracy']:.4f}, "
        f"mean exit layer {oracle['mean_exit_layer']:.2f}, {oracle['flops_speedup']:.2f}x FLOPs speed-up"
    )
    if summary:
        print("per rule, the fastest speed within 1 point of full depth (oracle_fraction: speed-up / oracle's):")
        print(format_table(summary, SUMMARY_COLUMNS))


def dataclass_from_namespace(dtype, args):
    """
    An options dataclass (`FastBertTrainingConfig`...) made from the parsed `args` it declares (`HfArgumentParser`
    made their options from its fields); a `ValueError` from its checks names the options the user typed
    (`--finetune-epochs/--epochs`), not the field.
    """
    values = {option.name: getattr(args, option.name) for option in dataclasses.fields(dtype) if option.init}
    try:
        return dtype(**values)
    except ValueError as error:
        message = str(error)
        for option in dataclasses.fields(dtype):
            names = [f"--{option.name.replace('_', '-')}", *option.metadata.get("aliases", [])]
            message = message.replace(f"`{option.name}`", "/".join(names))
        raise ValueError(message) from None


class CommandParser(HfArgumentParser):
    """
    The parser of one `hf-fastbert` command: `HfArgumentParser`, whose options come from dataclass fields, except that
    a `bool` option off by default is a plain flag (`--auto-truncate`), as argparse's `store_true` makes it: it takes
    no value, so `serve --auto-truncate MODEL` leaves MODEL to the positional argument.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dataclass_types:
            self.add_argument(
                "--config",
                dest="config_file",  # read before parsing (`parse_known_args`); `args.config` is the parsed one
                metavar="FILE",
                help="A .yaml or .json file of these options, by their names (max_length: 64, eval_speeds: [0, 0.5]); "
                "options given on the command line win.",
            )

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        path = next((value for option, value in zip(args[:-1], args[1:], strict=True) if option == "--config"), None)
        path = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), path)
        if path is not None and self.dataclass_types:
            self.set_defaults(**self._read_config(path))  # defaults: what the command line gives wins
        return super().parse_known_args(args, namespace)

    def _read_config(self, path) -> dict:
        """The options of a `--config` file; a usage error naming the file and the problem."""
        import yaml

        file = Path(path).expanduser()
        if not file.is_file():
            self.error(f"--config {path}: no such file")
        try:
            text = file.read_text(encoding="utf-8")
            values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as error:
            self.error(f"--config {path} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {error}")
        if not isinstance(values, dict):
            self.error(f"--config {path} must hold a mapping of option names to values")
        names = {option.name for dtype in self.dataclass_types for option in dataclasses.fields(dtype)}
        values = {str(key).replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            self.error(
                f"--config {path}: unknown options {', '.join(unknown)} (the options are {', '.join(sorted(names))})"
            )
        return values

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if field.type is bool and field.default is False:
            options = [f"--{field.name}", f"--{field.name.replace('_', '-')}"]
            parser.add_argument(*dict.fromkeys(options), action="store_true", help=field.metadata.get("help"))
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
