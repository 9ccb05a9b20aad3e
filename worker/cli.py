"""The ``memnet`` command line: library commands plus the worker and its clients."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from memnet import MemnetError
from memnet import cli as core_cli
from worker import logs
from worker.client import NoDeployment
from worker.faults import UNAVAILABLE
from worker.settings import Settings, SettingsError


def _vector(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memnet",
        description="Memory networks as a streaming service on Redis Streams. "
        "Worker and client commands read REDIS_URL, MEMNET_PREFIX and the other MEMNET_* "
        "settings from the environment (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    core_cli.add_commands(sub)

    p = sub.add_parser("worker", help="run a worker (settings from the environment)")
    p.add_argument(
        "--burst",
        action="store_true",
        help="exit once every partition this worker holds is drained",
    )
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("write", help="send one write")
    p.add_argument("--memory", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--x", type=_vector, help="input vector, e.g. 0.1,0.2,0.3")
    group.add_argument("--text")
    p.set_defaults(run=cmd_write)

    p = sub.add_parser("query", help="send one query and print its response")
    p.add_argument("--memory", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--x", type=_vector, help="query in input space (through I)")
    group.add_argument("--q", type=_vector, help="query in memory space")
    group.add_argument("--text")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    p.set_defaults(run=cmd_query)

    p = sub.add_parser("tail", help="print responses as JSON lines as they arrive")
    p.add_argument("--partition", type=int, action="append", help="only these (repeatable)")
    p.add_argument("--from-start", action="store_true", help="from the oldest kept response")
    p.set_defaults(run=cmd_tail)

    p = sub.add_parser("produce", help="send the events of a JSON-lines file")
    p.add_argument("file", help='one event per line, e.g. {"op":"write","memory":"m","x":[...]}')
    p.set_defaults(run=cmd_produce)

    p = sub.add_parser("status", help="partitions, owners, lag and snapshots")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser(
        "eval-babi", help="score models on bAbI through Redis and workers (or in-process)"
    )
    p.add_argument("--model", type=Path, help="a model file or a directory of qaN.safetensors "
                   "(default: the models shipped in models/babi)")  # fmt: skip
    p.add_argument("--data", type=Path, help="a bAbI directory (default: data/babi/en)")
    p.add_argument("--tasks", default=",".join(map(str, range(1, 21))), help="e.g. 1,2,3")
    p.add_argument("--split", choices=("validation", "train", "all"), default="validation")
    p.add_argument("--workers", type=int, default=2, help="worker processes to stream through")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in-process", action="store_true", help="the library alone, no Redis")
    mode.add_argument("--both", action="store_true", help="both paths; check they agree")
    p.add_argument("--json", action="store_true", help='print {"qa1": accuracy, ...} last')
    p.set_defaults(run=cmd_eval_babi)

    p = sub.add_parser("demo", help="the main job on an embedded default (see README)")
    p.add_argument("--events", type=int, default=4000)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (SettingsError, MemnetError) as e:
        print(f"memnet {args.command}: {e}", file=sys.stderr)
        return 2
    except UNAVAILABLE as e:
        print(f"memnet {args.command}: cannot reach Redis: {e}", file=sys.stderr)
        return 3
    except NoDeployment as e:
        print(f"memnet {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _client() -> Any:
    from worker.client import MemnetClient

    settings = Settings.from_env()
    return MemnetClient(settings.redis_url, settings.prefix)


def _stop_during_start_up(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # nothing is owned yet: stopping now loses nothing


def cmd_worker(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_during_start_up)
    from worker.worker import serve

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
    serve(settings, burst=args.burst)
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    entry_id = _client().write(args.memory, args.x, text_input=args.text)
    print(entry_id)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from worker.client import QueryTimeout

    try:
        response = _client().query(
            args.memory, args.x, q=args.q, text_input=args.text, timeout_s=args.timeout
        )
    except QueryTimeout as e:
        print(f"memnet query: {e} (is a worker running?)", file=sys.stderr)
        return 1
    print(json.dumps(response))
    return 0 if "error" not in response else 1


def cmd_tail(args: argparse.Namespace) -> int:
    client = _client()
    for p, entry_id, response in client.tail(args.partition, "0-0" if args.from_start else "$"):
        print(json.dumps({"partition": p, "entry": entry_id, **response}), flush=True)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from worker.produce import produce_file

    sent = produce_file(_client(), args.file)
    print(f"sent {sent} events", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.status import print_status

    settings = Settings.from_env()
    return print_status(settings, as_json=args.json)


def cmd_eval_babi(args: argparse.Namespace) -> int:
    from worker import babi_eval

    try:
        tasks = babi_eval.parse_tasks(args.tasks)
    except ValueError as e:
        print(f"memnet eval-babi: {e}", file=sys.stderr)
        return 2
    mode = "in-process" if args.in_process else "both" if args.both else "stream"
    return babi_eval.run_eval(
        args.model, args.data or babi_eval.DATA, tasks, mode, args.split, args.workers, args.json
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(events=args.events)


if __name__ == "__main__":
    sys.exit(main())
