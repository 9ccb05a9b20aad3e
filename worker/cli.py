"""The ``memnet`` command line: library commands plus the worker and its clients.

Building the parser imports only light modules and each command imports what it runs on when
it runs, so ``memnet --help`` and the client commands (write, query, delete, tail, produce)
load no JAX (provided importing a light memnet module does not: memnet/__init__.py). A new
command is one ``sub.add_parser`` in ``build_parser`` (or a module's ``add_commands``, as
memnet.cli does) with ``set_defaults(run=...)``; its options' defaults appear in its --help
by themselves (``HelpFormatter``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from worker import logs
from worker.dead import at_least_zero
from worker.settings import Settings, SettingsError, describe, set_process_defaults

EXIT_CODES = """\
exit status:
  0    done
  1    a query got an error response or no response in time
  2    usage or configuration error (a bad option or setting, a missing file or extra)
  3    Redis unreachable
  130  interrupted (Ctrl-C)

Worker and client commands read REDIS_URL, MEMNET_PREFIX and the other settings from the
environment: `memnet worker --help` lists them."""

# Optional dependencies (pyproject.toml's extras) by the module that needs them.
EXTRAS = {
    "optax": "train",
    "matplotlib": "train",
    "fakeredis": "demo",
    "lupa": "demo",
}
_EXTRA_HINTS = {"demo": " (or set REDIS_URL, or install redis-server)"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's lines; ends every option's help with its default
    (except flags, required options, helps that state it, and options without one, whose
    help says what their absence means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "(default:" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or action.required
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: HelpFormatter unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class _Version(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"memnet {version()}")
        parser.exit()


def version() -> str:
    """The installed package's version, else (a checkout run without installing) the one
    pyproject.toml says."""
    from importlib import metadata

    try:
        return metadata.version("memnet")
    except metadata.PackageNotFoundError:
        import tomllib

        try:
            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _vector(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {value!r}"
        ) from None


def _settings_epilog() -> str:
    lines = ["settings, from the environment (VARIABLE=default, then what it does):"]
    for name, default, meaning in describe():
        lines.append(f"  {name}={default}" if default != "(required)" else f"  {name} (required)")
        lines += textwrap.wrap(meaning, 80, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from memnet import cli as core_cli  # the library's commands (light: no JAX until run)

    parser = Parser(
        prog="memnet",
        description="Memory networks as a streaming service on Redis Streams.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)  # fmt: skip
    core_cli.add_commands(sub)
    from worker.status import add_commands as operator_commands  # light: no redis, no JAX

    operator_commands(sub)  # memnet status (--check, --max-lag) and memnet dead
    from worker.inventory import add_command as memories_command  # light: no JAX

    memories_command(sub)  # memnet memories
    from worker.upgrade import add_commands as upgrade_commands  # light: no JAX

    upgrade_commands(sub)  # memnet rebuild, memnet deploy

    p = sub.add_parser(
        "worker",
        help="run a worker (settings from the environment)",
        description="Serve partitions until SIGTERM or SIGINT: read writes and queries from\n"
        "Redis Streams, apply them to named memories, publish responses.",
        epilog=_settings_epilog(),
    )
    p.add_argument(
        "--burst",
        action="store_true",
        help="exit once every partition this worker holds is drained",
    )
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("write", help="send one write")
    p.add_argument("--memory", required=True, help="the memory's name")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--x", type=_vector, help="input vector, e.g. 0.1,-0.2,0.3")
    group.add_argument("--text", help="input text (text models)")
    p.set_defaults(run=cmd_write)

    p = sub.add_parser("query", help="send one query and print its response")
    p.add_argument("--memory", required=True, help="the memory's name")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--x", type=_vector, help="query in input space (through I)")
    group.add_argument("--q", type=_vector, help="query in memory space")
    group.add_argument("--text", help="query text (text models)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    p.set_defaults(run=cmd_query)

    p = sub.add_parser(
        "delete",
        help="delete a memory (its next event starts afresh)",
        description="Send one delete: the memory's next event starts from memory_init, as if\n"
        "it never existed. Prints the entry id.",
    )
    p.add_argument("--memory", required=True, help="the memory's name")
    p.add_argument("--id", help="ask for a response {id, memory, deleted: true} with this id")
    p.add_argument(
        "--wait", action="store_true", help="wait until a worker has applied it (exit 1 if not)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait, with --wait")
    p.set_defaults(run=cmd_delete)

    p = sub.add_parser("tail", help="print responses as JSON lines as they arrive")
    p.add_argument(
        "--partition", type=int, action="append", help="only these (repeatable; default: all)"
    )
    p.add_argument(
        "--from-start", action="store_true", help="from the oldest kept response, not new ones"
    )
    p.set_defaults(run=cmd_tail)

    p = sub.add_parser("produce", help="send the events of a JSON-lines file")
    p.add_argument("file", help='one event per line, e.g. {"op":"write","memory":"m","x":[...]}')
    p.add_argument(
        "--skip",
        type=at_least_zero,
        default=0,
        metavar="N",
        help="skip the file's first N events (to resume an interrupted run)",
    )
    p.set_defaults(run=cmd_produce)

    p = sub.add_parser(
        "eval-babi", help="score models on bAbI through Redis and workers (or in-process)"
    )
    from memnet.babi import DATA, MODELS
    from memnet.cli import positive

    p.add_argument(
        "--model", type=Path, default=MODELS, help="a model file or a directory of qaN.safetensors"
    )
    p.add_argument(
        "--data",
        type=Path,
        help=f"a bAbI directory (default: the one each model was trained on, as its qaN.json "
        f"records, else {DATA})",
    )
    p.add_argument(
        "--tasks",
        default=",".join(map(str, range(1, 21))),
        help="comma-separated task numbers, e.g. 1,2,3 (default: all 20)",
    )
    p.add_argument(
        "--split",
        choices=("holdout", "validation", "train", "all"),
        default="holdout",
        help="which stories of each task's training file: holdout (default) is what training "
        "and the choice of seed never saw",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes to stream through")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in-process", action="store_true", help="the library alone, no Redis")
    mode.add_argument("--both", action="store_true", help="both paths; check they agree")
    p.add_argument("--json", action="store_true", help='print {"qa1": accuracy, ...} last')
    p.set_defaults(run=cmd_eval_babi)

    p = sub.add_parser("demo", help="the main job on an embedded default (see README)")
    p.add_argument("--events", type=positive, default=4000, help="events to stream")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``memnet`` command. Without argv it is the process's own command line (the
    console script, ``python -m worker.cli``), and the process's defaults are set first,
    before numpy or JAX loads; with argv (tests, other programs) nothing process-wide is."""
    args, status = None, 0
    try:
        if argv is None:
            set_process_defaults()
        args = build_parser().parse_args(_joined_vectors(sys.argv[1:] if argv is None else argv))
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, not at exit with a traceback
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`memnet status | head -1`): stop quietly, the exit status
        # unchanged; what is still buffered goes nowhere (the recipe in Python's docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return status
    except Exception as e:
        failure = _failure(e)
        if failure is None:
            raise
        command = getattr(args, "command", None)
        notes = [n for n in getattr(e, "__notes__", ()) if "JAX_TRACEBACK" not in n]
        line = "; ".join([failure[1], *notes])  # (less JAX's note on its traceback)
        print(f"memnet {command}: {line}" if command else f"memnet: {line}", file=sys.stderr)
        return failure[0]


_NUMBERS = re.compile(r"-[\d.]")  # a vector that starts with a negative number


def _joined_vectors(argv: list[str]) -> list[str]:
    """``--x -0.1,0.2`` as ``--x=-0.1,0.2``: argparse takes "-0.1,0.2" for an option (it is
    not one number), and the vectors of a trained or random model start with minus often."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--x", "--q") and _NUMBERS.match(arg):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    return out


def _failure(e: Exception) -> tuple[int, str] | None:
    """(exit status, one line) for an error a user can act on; None for a bug, which keeps
    its traceback. The error classes are imported here, on failure: light modules all."""
    if isinstance(e, SettingsError):
        return 2, str(e)
    if isinstance(e, ModuleNotFoundError) and e.name:
        extra = EXTRAS.get(e.name.partition(".")[0])
        if extra:
            return 2, (
                f"needs the {extra} extra ({e.name} is not installed): "
                f"pip install 'memnet[{extra}]'{_EXTRA_HINTS.get(extra, '')}"
            )
        return None
    from memnet.errors import MemnetError as LibraryError
    from worker.events import ClientError, MemnetError, QueryTimeout
    from worker.faults import UNAVAILABLE

    if isinstance(e, QueryTimeout | MemnetError):
        return 1, str(e)
    if isinstance(e, ClientError | LibraryError):
        return 2, str(e)
    import redis

    if isinstance(e, redis.AuthenticationError):  # (a ConnectionError to redis-py)
        return 2, (
            f"REDIS_URL: Redis refused the credentials ({e}; write '@', ':' and '/' in the "
            f"user or password as %40, %3A and %2F)"
        )
    if isinstance(e, UNAVAILABLE):
        return 3, f"cannot reach Redis: {e}"
    if isinstance(e, OSError) and e.filename is not None:  # a file the command was given
        return 2, f"{e.strerror or e}: {e.filename}"
    if isinstance(e, RuntimeError) and "Unable to initialize backend" in str(e):
        return 2, f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}: {e}"
    return None


def _client() -> Any:
    from worker.client import MemnetClient

    return MemnetClient.from_env()


_STOPPED_EARLY = threading.Event()


def _stop_during_start_up(signum: int, frame: Any) -> None:
    """Nothing is owned yet: stopping now loses nothing. The SystemExit can land where
    Python ignores it (a garbage-collector callback of JAX's, seen in the chaos suite), so
    the event also tells serve() to stop as soon as the worker exists."""
    _STOPPED_EARLY.set()
    raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_during_start_up)
    settings = Settings.from_env()
    logs.configure(settings.log_level)
    running: list[Any] = []  # the Worker, once serve() has made it
    if settings.metrics_port:
        from worker import health

        try:
            health.start(
                settings.metrics_host,
                settings.metrics_port,
                lambda: running[0].last_progress() if running else None,
                within_s=settings.stall_s,  # (when the lease keeper gives up too)
            )
        except OSError as e:  # the port is taken, or the host is not this machine's
            raise SettingsError(str(e)) from None
    from worker.worker import serve

    serve(settings, burst=args.burst, on_worker=running.append, stopped=_STOPPED_EARLY)
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    entry_id = _client().write(args.memory, args.x, text_input=args.text)
    print(entry_id)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from worker.client import MemnetError, QueryTimeout

    try:
        response = _client().query(
            args.memory, args.x, q=args.q, text_input=args.text, timeout_s=args.timeout
        )
    except QueryTimeout as e:
        print(f"memnet query: {e} (is a worker running?)", file=sys.stderr)
        return 1
    except MemnetError as e:  # an error response: printed as it came
        print(json.dumps(e.response))
        return 1
    print(json.dumps(response))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from worker.client import QueryTimeout

    try:
        entry_id = _client().delete(args.memory, id=args.id, wait=args.wait, timeout_s=args.timeout)
    except QueryTimeout as e:
        print(f"memnet delete: {e} (is a worker running?)", file=sys.stderr)
        return 1
    print(entry_id)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    client = _client()
    for p, entry_id, response in client.tail(args.partition, "0-0" if args.from_start else "$"):
        print(json.dumps({"partition": p, "entry": entry_id, **response}), flush=True)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb"):
            pass
    except OSError as e:
        print(f"memnet produce: cannot read {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    from worker.produce import produce_file

    sent = produce_file(_client(), args.file, skip=args.skip)
    print(f"sent {sent} events", file=sys.stderr)
    return 0


def cmd_eval_babi(args: argparse.Namespace) -> int:
    from worker import babi_eval

    try:
        tasks = babi_eval.parse_tasks(args.tasks)
    except ValueError as e:
        print(f"memnet eval-babi: {e}", file=sys.stderr)
        return 2
    mode = "in-process" if args.in_process else "both" if args.both else "stream"
    return babi_eval.run_eval(
        args.model, args.data, tasks, mode, args.split, args.workers, args.json
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(events=args.events)


if __name__ == "__main__":
    sys.exit(main())
