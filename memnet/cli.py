"""Library commands of the ``memnet`` CLI (the entry point lives in worker/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

from memnet.config import ConfigValueError, ModelConfig
from memnet.errors import MemnetError
from memnet.model import load_model, random_model, save_model


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("init", help="write a model with random weights (as in the reference)")
    p.add_argument("out", help="model file to write (.safetensors)")
    p.add_argument("--input-dim", type=int, required=True)
    p.add_argument("--memory-dim", type=int, required=True)
    p.add_argument("--output-dim", type=int, required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_init)

    p = sub.add_parser("inspect", help="check a model file and print its config")
    p.add_argument("model")
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
        )
    except ConfigValueError as e:
        print(f"memnet init: {e}", file=sys.stderr)
        return 2
    model = random_model(config, seed=args.seed)
    save_model(model, args.out)
    print(f"wrote {args.out} (fingerprint {model.fingerprint[:12]})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
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
