"""The ``memnet`` command line: version, help, imports, the process's settings, and one
line (never a traceback) with a documented exit status for each user error."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from worker import cli as worker_cli
from worker.cli import build_parser
from worker.cli import main as cli
from worker.protocol import Keys, partition_of
from worker.settings import (
    ENV_NAMES,
    Settings,
    SettingsError,
    describe,
    redact,
    set_process_defaults,
)

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
NO_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
# memnet/__init__.py re-exports the engine; until it does so lazily, importing any memnet
# module (the library commands' parsers included) loads JAX.


def run(
    *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess:
    """``python -m worker.cli ARGS`` (what the memnet script runs), as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": NO_REDIS, **(env or {})},
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def test_version():
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"memnet {VERSION}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_help_shows_every_default():
    commands = subcommands()
    expected = {"init", "train", "worker", "write", "delete", "produce", "status", "eval-babi"}
    assert expected <= set(commands)
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.default is None or action.default is False or not action.option_strings:
                continue
            if action.default == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in text, f"memnet {name} {action.option_strings[0]}: {text!r}"
    init_help = commands["init"].format_help()
    assert "(default: 16)" in init_help and "(default: 0)" in init_help  # --hidden, --seed


def test_main_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for status in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n  {status}" in out


def test_worker_help_lists_every_setting_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        cli(["worker", "--help"])
    out = capsys.readouterr().out
    for name in ENV_NAMES.values():
        assert name in out
    assert "MEMNET_LEASE_MS=5000\n      partition lease" in out
    assert "MEMNET_MODEL (required)" in out
    assert "JAX_PLATFORMS=cpu" in out and "MEMNET_BLAS_THREADS=1" in out


def test_importing_the_client_loads_no_jax_and_changes_no_environment():
    bare = {k: v for k, v in os.environ.items() if not k.endswith("NUM_THREADS")}
    bare.pop("JAX_PLATFORMS", None)
    done = subprocess.run(
        [sys.executable, "-c", "import os, sys; before = dict(os.environ); import worker.client; "
         "print('jax' in sys.modules, dict(os.environ) == before)"],
        cwd=ROOT, env=bare, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_the_command_sets_its_own_process_defaults():
    env: dict[str, str] = {}
    set_process_defaults(env)
    assert env == {
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "JAX_PLATFORMS": "cpu",
    }
    env = {"MEMNET_BLAS_THREADS": "2", "OMP_NUM_THREADS": "3", "JAX_PLATFORMS": "cuda"}
    set_process_defaults(env)
    assert env["OPENBLAS_NUM_THREADS"] == "2" and env["OMP_NUM_THREADS"] == "3"
    assert env["JAX_PLATFORMS"] == "cuda"


@pytest.mark.parametrize(
    "argv", [["--help"], ["write", "--help"], ["delete", "--help"], ["produce", "--help"]]
)
def test_help_loads_no_jax(argv):
    done = python(
        "import sys\nfrom worker.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('jax' in sys.modules, file=sys.stderr)"
    )
    assert done.stderr.strip() == "False", done.stderr


def test_a_client_command_loads_no_jax():
    done = python(
        "import sys\nfrom worker.cli import main\n"
        "status = main(['write', '--memory', 'm', '--x', '1,2'])\n"
        "print(status, 'jax' in sys.modules, file=sys.stderr)",
        env={"REDIS_URL": NO_REDIS},
    )
    assert done.stderr.splitlines()[-1] == "3 False", done.stderr


def test_produce_of_a_missing_file_is_one_line_and_exit_2(tmp_path):
    done = run("produce", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2
    assert "missing.jsonl" in one_line(done) and "No such file" in done.stderr


def test_produce_passes_skip_through(monkeypatch, tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"op": "write", "memory": "m", "x": [1]}\n')
    calls = []
    monkeypatch.setattr(worker_cli, "_client", lambda: "client")
    monkeypatch.setattr(
        "worker.produce.produce_file", lambda client, path, **kw: calls.append(kw) or 0
    )
    assert cli(["produce", str(events), "--skip", "5"]) == 0
    assert cli(["produce", str(events)]) == 0
    assert calls == [{"skip": 5}, {"skip": 0}]
    with pytest.raises(SystemExit) as exited:
        cli(["produce", str(events), "--skip", "-1"])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    "argv", [["write", "--memory", "m", "--x", "1,2"], ["delete", "--memory", "m"]]
)
def test_unreachable_redis_is_exit_3(argv):
    done = run(*argv)
    assert done.returncode == 3
    assert "cannot reach Redis" in one_line(done)


def test_delete_sends_one_entry_and_waits_only_when_asked(redis_url, monkeypatch, capsys):
    keys = Keys("cli-delete")
    r = redis.Redis.from_url(redis_url)
    r.hset(keys.meta, mapping={"partitions": 4, "protocol": 1})
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MEMNET_PREFIX", "cli-delete")
    assert cli(["delete", "--memory", "alice", "--id", "d1"]) == 0
    entry_id = capsys.readouterr().out.strip()
    [(got_id, fields)] = r.xrange(keys.inp(partition_of("alice", 4)))
    assert got_id.decode() == entry_id
    assert msgpack.unpackb(fields[b"msg"]) == {"op": "delete", "memory": "alice", "id": "d1"}
    assert cli(["delete", "--memory", "alice", "--wait", "--timeout", "0.2"]) == 1  # no worker
    assert "no response to" in capsys.readouterr().err
    assert r.xlen(keys.inp(partition_of("alice", 4))) == 2
    r.close()


@pytest.mark.parametrize("url", ["redis://localhost:notaport/0", "redis://u:pw@h:99999/0"])
def test_a_bad_port_in_redis_url_names_the_variable(url):
    with pytest.raises(SettingsError, match="REDIS_URL") as error:
        Settings.from_env({"REDIS_URL": url})
    assert "pw" not in str(error.value)
    done = run("write", "--memory", "m", "--x", "1,2", env={"REDIS_URL": url})
    assert done.returncode == 2
    assert "REDIS_URL" in one_line(done) and "pw" not in done.stderr


def test_the_gc_threshold_is_checked_and_applied_after_start_up():
    from worker.worker import release_free_heap

    with pytest.raises(SettingsError, match="MEMNET_GC_THRESHOLD must be at least 1"):
        Settings.from_env({"MEMNET_GC_THRESHOLD": "0"})
    assert Settings.from_env({}).gc_threshold == 100_000
    assert Settings.from_env({"MEMNET_GC_THRESHOLD": "700"}).gc_threshold == 700
    before = gc.get_threshold()
    try:
        release_free_heap(12_345)  # what Worker.run calls once compiled
        assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_redact_hides_only_the_password():
    assert redact("redis://u:s3cret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact("rediss://:s3cret@h/0") == "rediss://:***@h/0"
    assert redact("redis://u:pw@h:bad/0") == "redis://u:***@h:bad/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    # a password with "/" or "@" not percent-encoded, and redis-py's query parameter
    assert redact("redis://default:s3/cr@t@h:6379/0") == "redis://default:***@h:6379/0"
    assert (
        redact("unix:///run/r.sock?db=0&password=s3cret") == "unix:///run/r.sock?db=0&password=***"
    )


@pytest.mark.parametrize(
    "env, named",
    [
        (
            {"REDIS_URL": "redis://:s3cret@h/0?socket_timeout=abc"},
            "REDIS_URL has a bad option",
        ),
        ({"REDIS_URL": "rediss://:s3cret@h/0?ssl_cert_reqs=bogus"}, "REDIS_URL has a bad option"),
        ({"REDIS_URL": "redis://default:s3/cret@h:6379/0"}, "REDIS_URL has a bad port"),
        ({"MEMNET_SNAPSHOT_URL": "file://var/snapshots"}, "MEMNET_SNAPSHOT_URL must be a path"),
        ({"MEMNET_SNAPSHOT_EVERY_S": "nan"}, "MEMNET_SNAPSHOT_EVERY_S must be a finite number"),
        ({"MEMNET_STOP_SNAPSHOT_S": "inf"}, "MEMNET_STOP_SNAPSHOT_S must be a finite number"),
        ({"PORT": "abc"}, "PORT must be a number"),
        ({"MEMNET_SNAPSHOTS_KEPT": "1"}, "MEMNET_SNAPSHOTS_KEPT must be at least 2"),
    ],
)
def test_a_bad_setting_stops_with_its_name_and_no_password(env, named):
    with pytest.raises(SettingsError, match=named) as error:
        Settings.from_env(env)
    assert "s3cret" not in str(error.value) and "cret" not in str(error.value)
    done = run("status", env=env)
    assert done.returncode == 2 and named in one_line(done) and "cret" not in done.stderr


def test_a_file_that_cannot_be_written_stops_with_its_path(tmp_path):
    (tmp_path / "missing").write_text("")  # (a file where a directory should be)
    out = tmp_path / "missing" / "m.safetensors"
    done = run("init", "--input-dim", "4", "--memory-dim", "4", "--output-dim", "2",
               "--slots", "8", str(out))  # fmt: skip
    assert done.returncode == 2 and "missing" in one_line(done)


def test_metrics_port_in_use_names_the_setting(tmp_path, model_file):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        done = run(
            "worker",
            env={"MEMNET_MODEL": str(model_file), "MEMNET_METRICS_PORT": port,
                 "MEMNET_SNAPSHOT_DIR": str(tmp_path)},
        )  # fmt: skip
    assert done.returncode == 2
    assert "MEMNET_METRICS_PORT" in one_line(done) and port in done.stderr


def test_status_into_a_closed_pipe_exits_quietly(redis_url, redis_server, tmp_path):
    with redis_server.client() as r:  # a deployment's meta, as a worker records it
        r.hset("memnet:meta", mapping={"partitions": 8, "protocol": 1})
    env = {"REDIS_URL": redis_url, "MEMNET_PREFIX": "memnet", "MEMNET_SNAPSHOT_DIR": str(tmp_path)}
    for args in (["status"], ["status", "--json"]):
        read, write = os.pipe()
        os.close(read)  # `memnet status | head -1` once head has exited
        try:
            done = run(*args, env=env, stdout=write)
        finally:
            os.close(write)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""


def test_interrupted_is_130(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(worker_cli, "_client", interrupted)
    assert cli(["write", "--memory", "m", "--x", "1"]) == 130


@pytest.mark.parametrize(
    ("missing", "argv", "extra"),
    [
        ("optax", ["train", "--task", "1"], "train"),
        ("matplotlib", ["train", "--task", "1"], "train"),
        ("fakeredis", ["demo"], "demo"),
    ],
)
def test_a_missing_extra_names_the_extra(missing, argv, extra, tmp_path):
    # The module blocked as if not installed; no REDIS_URL and no redis-server on PATH, so
    # the demo needs its embedded fakeredis.
    code = (
        f"import sys\nsys.modules[{missing!r}] = None\nfrom worker.cli import main\n"
        f"sys.exit(main({argv!r}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PATH"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"needs the {extra} extra" in one_line(done)
    assert f"pip install 'memnet[{extra}]'" in done.stderr


@pytest.mark.parametrize("option", ["--seeds", "--epochs", "--patience", "--hops", "--dim"])
def test_training_counts_of_zero_are_refused_by_name(option, capsys):
    """(--epochs 0 ended in max() of nothing with a traceback, after loading the data.)"""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--task", "1", option, "0"])
    assert e.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, named",
    [
        ({"MEMNET_BLAS_THREADS": "abc"}, "MEMNET_BLAS_THREADS must be a positive integer"),
        ({"MEMNET_MODEL": "/nonexistent/m.safetensors"}, "MEMNET_MODEL: /nonexistent/m."),
        ({"JAX_PLATFORMS": "gpu", "MEMNET_MODEL": "MODEL"}, "JAX_PLATFORMS='gpu': Unable to"),
    ],
)
def test_process_settings_and_the_model_file_stop_the_worker_by_name(env, named, model_file):
    """(Each ended in a traceback, exit 1, which a supervisor restarts forever.)"""
    env = {k: str(model_file) if v == "MODEL" else v for k, v in env.items()}
    done = run("worker", env=env)
    assert done.returncode == 2 and named in one_line(done)


def test_the_readme_settings_table_lists_every_setting():
    """Every variable memnet worker --help lists has its row (four were missing)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| variable | default | what |") :].split("\n\n", 1)[0]
    listed = table.replace("` / `_S`", "` `MEMNET_SNAPSHOT_EVERY_S`")
    assert [name for name, _, _ in describe() if f"`{name}`" not in listed] == []


def test_a_vector_starting_with_a_minus_is_a_vector_not_an_option(redis_url, monkeypatch, capsys):
    keys = Keys("cli-minus")
    r = redis.Redis.from_url(redis_url)
    r.hset(keys.meta, mapping={"partitions": 4, "protocol": 1, "input_dim": 2})
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MEMNET_PREFIX", "cli-minus")
    assert cli(["write", "--memory", "alice", "--x", "-0.5,2"]) == 0
    assert cli(["write", "--memory", "alice", "--x", "-.5,-2"]) == 0
    sent = [msgpack.unpackb(f[b"msg"]) for _, f in r.xrange(keys.inp(partition_of("alice", 4)))]
    assert [np.frombuffer(m["x"], "<f4").tolist() for m in sent] == [[-0.5, 2.0], [-0.5, -2.0]]
    r.close()


def test_a_wrong_password_is_a_setting_not_an_unreachable_redis(tmp_path):
    from worker.servers import RedisServer

    server = RedisServer(tmp_path / "auth", "--requirepass", "right")
    try:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        done = run("write", "--memory", "m", "--x", "1,2", env={"REDIS_URL": url})
    finally:
        server.stop()
    assert done.returncode == 2, done.stderr
    assert "REDIS_URL: Redis refused the credentials" in one_line(done)
    assert "wrong" not in done.stderr


def test_a_worker_waiting_for_redis_at_start_up_says_so_once(tmp_path, model_file):
    """No Redis at REDIS_URL yet (a wrong port, Redis started later): the worker retries
    with backoff and logs it once a minute, not at every try (every 3-5 s)."""
    env = {
        **os.environ,
        "REDIS_URL": NO_REDIS,
        "MEMNET_MODEL": str(model_file),
        "MEMNET_SNAPSHOT_DIR": str(tmp_path / "s"),
        "MEMNET_CACHE_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(12)  # (tries at about 0.1, 0.3, 0.7, 1.5, 3.1, 6.3 s after the first)
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert err.count("Redis unavailable") == 1, err
