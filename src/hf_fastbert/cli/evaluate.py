"""`hf-fastbert evaluate`: accuracy, mean exit layer, FLOPs and wall-time speed-up per speed."""

import logging

from ..analysis import (
    format_table,
    results_source,
    write_rows,
)
from ..constants import (
    EVALUATE_SPEEDS,
    RESULT_COLUMNS,
)
from .common import (
    _add_backend_argument,
    _add_data_arguments,
    _add_exit_rule_arguments,
    _add_int8_argument,
    _add_model_argument,
    _HelpFormatter,
    _speed,
    check_results_file,
    describe_data,
    prepare_evaluation,
)


logger = logging.getLogger(__name__)


def register(commands):
    """Add the `evaluate` command to `commands` (the subcommands of `hf-fastbert`)."""
    evaluate = commands.add_parser(
        "evaluate",
        help="Accuracy, mean exit layer, FLOPs and wall-time speed-up at given speeds.",
        description="Evaluates a FastBERT model at each speed: accuracy, mean exit layer and FLOPs speed-up come from "
        "one full-depth pass (exact); the wall-time speed-up is measured by running the early-exit engine at each "
        "speed against speed 0 (= BertForSequenceClassification) on this machine.",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(evaluate)
    evaluate.add_argument(
        "--speeds", type=_speed, nargs="+", default=list(EVALUATE_SPEEDS), help="Speeds to evaluate."
    )
    evaluate.add_argument("--output", help="Also write the results to this .csv or .json file.")
    evaluate.add_argument("--no-timing", action="store_true", help="Skip the wall-time measurement.")
    _add_exit_rule_arguments(evaluate)
    _add_int8_argument(evaluate)
    _add_backend_argument(evaluate)
    _add_data_arguments(evaluate, split_default="test")
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args):
    import torch

    from ..analysis import add_wall_time, timing_batches
    from ..evaluation import evaluate_speeds

    if args.output:
        check_results_file(args.output)
    model, tokenizer, dataset = prepare_evaluation(args)
    speeds = sorted(set(args.speeds))
    results = evaluate_speeds(model, dataset, speeds, args.batch_size, progress=True, exit_rule=args.exit_rule)
    if results[0]["accuracy"] is None:
        raise ValueError("the evaluation data has no labels: accuracy needs a label column (--label-column)")
    if not args.no_timing:
        add_wall_time(results, model, timing_batches(dataset, tokenizer, args.batch_size), args.exit_rule)
    columns = list(RESULT_COLUMNS) + ([] if args.no_timing else ["wall_time_s", "wall_speedup"])
    print(
        f"{len(dataset)} samples, batch size {args.batch_size}, {torch.get_num_threads()} CPU threads, "
        f"{'int8' if args.int8 else 'float32'} linear layers, exit rule "
        f"{args.exit_rule or model.config.exit_rule}; speed-ups are over speed 0 (every layer, = the stock classifier)"
    )
    print(format_table(results, columns))
    if args.output:
        source = results_source(args.model, describe_data(args.dataset, args.split, args.dataset_config), len(dataset))
        write_rows(results, args.output, source)
        print(f"results written to {args.output}")
