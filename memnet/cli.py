"""Library commands of the ``memnet`` CLI (the entry point lives in worker/cli.py).

Building the parser imports only light modules (config, training settings, the bAbI paths);
each command imports what it runs on (JAX among it) when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from memnet.babi import DATA
from memnet.config import ConfigValueError, IndexConfig, ModelConfig
from memnet.training.settings import Settings


def non_negative(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the option if not)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("init", help="write a model with random weights (as in the reference)")
    p.add_argument("out", help="model file to write (.safetensors)")
    p.add_argument("--input-dim", type=int, required=True, help="D: size of an input x")
    p.add_argument("--memory-dim", type=int, required=True, help="M: size of a memory slot")
    p.add_argument("--output-dim", type=int, required=True, help="Y: size of a response y")
    p.add_argument("--slots", type=int, required=True, help="S: slots of every memory")
    p.add_argument("--hidden", type=int, default=16, help="H: hidden size of the MLPs")
    p.add_argument("--top-k", type=int, default=5, help="slots a query attends over")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument(
        "--exact-max-slots",
        type=int,
        default=IndexConfig.exact_max_slots,
        help="memories up to this many slots are searched exactly, larger ones with an "
        "hnswlib graph (see docs/performance.md)",
    )
    p.set_defaults(run=cmd_init)

    p = sub.add_parser("train", help="train a text memory network on a bAbI task (the train extra)")
    p.add_argument(
        "--task", type=int, required=True, choices=range(1, 21), metavar="1..20", help="bAbI task"
    )
    p.add_argument("--data", type=Path, default=DATA, help="a bAbI directory")
    p.add_argument("--out", type=Path, help="model file (default: var/models/qaTASK.safetensors)")
    p.add_argument("--seeds", type=positive, default=3, help="runs; the best on validation is kept")
    p.add_argument(
        "--dim", type=positive, default=64, help="embedding size (memory_dim is twice it)"
    )
    p.add_argument("--hops", type=positive, default=3, help="rounds of attention (O)")
    p.add_argument(
        "--relative-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="O's hops also score each fact's age relative to what the hop before found",
    )
    p.add_argument(
        "--latest",
        action="store_true",
        help="O's hops after the first read the latest matching fact before what the hop "
        "before found, or before now",
    )
    p.add_argument("--epochs", type=positive, default=Settings.epochs, help="most epochs per seed")
    p.add_argument(
        "--patience",
        type=positive,
        default=Settings.patience,
        help="epochs without a better validation result before stopping",
    )
    p.add_argument(
        "--weight-decay",
        type=non_negative,
        default=Settings.weight_decay,
        help="AdamW's decoupled weight decay (default %(default)s; the bAbI rule's last step "
        "tries 0.1 and 0.3)",
    )
    p.add_argument("--no-support", action="store_true",
                   help="train on answers only, without the supporting facts")  # fmt: skip
    p.add_argument("--output", default="multi-hop", help="the O component")
    p.add_argument("--response", default="answer-mlp", help="the R component")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("inspect", help="check a model file and print its config")
    p.add_argument("model", help="model file (.safetensors)")
    p.set_defaults(run=cmd_inspect)


def cmd_init(args: argparse.Namespace) -> int:
    try:
        config = ModelConfig(
            input_dim=args.input_dim,
            memory_dim=args.memory_dim,
            output_dim=args.output_dim,
            hidden=args.hidden,
            slots=args.slots,
            top_k=args.top_k,
            index=IndexConfig(exact_max_slots=args.exact_max_slots),
        )
        IndexConfig.from_json({"exact_max_slots": args.exact_max_slots})  # checks the value
    except ConfigValueError as e:
        print(f"memnet init: {e}", file=sys.stderr)
        return 2
    from memnet.model import random_model, save_model

    model = random_model(config, seed=args.seed)
    save_model(model, args.out)
    print(f"wrote {args.out} (fingerprint {model.fingerprint[:12]})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if not args.data.is_dir():
        print(
            f"memnet train: no bAbI data at {args.data}: pass --data DIR (a directory of "
            "qaN_*_train.txt files, such as bAbI's en/)",
            file=sys.stderr,
        )
        return 2
    # Both halves of the train extra now, not after training: optax (the step), matplotlib
    # (the plot at the end). A missing one is reported by worker.cli as the extra to install.
    import matplotlib  # noqa: F401

    from memnet.errors import MemnetError
    from memnet.training.train import spread, train_task

    out = args.out or Path("var/models") / f"qa{args.task}.safetensors"
    settings = Settings(
        epochs=args.epochs,
        patience=args.patience,
        supervise_support=not args.no_support,
        weight_decay=args.weight_decay,
    )
    try:
        summary = train_task(
            args.data, args.task, out, seeds=args.seeds, dim=args.dim, hops=args.hops,
            relative_time=args.relative_time, latest=args.latest,
            output=args.output, response=args.response, settings=settings,
        )  # fmt: skip
    except (MemnetError, ConfigValueError) as e:
        print(f"memnet train: {e}", file=sys.stderr)
        return 2
    print(
        f"qa{args.task}: validation accuracy {summary['val_accuracy']:.1%} (seed "
        f"{summary['seed']}; {args.seeds} seeds: {spread(summary['seed_accuracies'])}), "
        f"held out {summary['holdout_accuracy']:.1%} (seeds: "
        f"{spread(summary['seed_holdout_accuracies'])}) in {summary['seconds']} s\n"
        f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.json')}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from memnet.errors import MemnetError
    from memnet.model import load_model

    try:
        model = load_model(args.model)
    except MemnetError as e:
        print(f"memnet inspect: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "fingerprint": model.fingerprint,
                "config": model.config.to_json(),
                "tensors": {k: list(v.shape) for k, v in model.params.items()},
            },
            indent=2,
        )
    )
    return 0
