"""The shipped process definitions: the Procfile and the systemd template unit."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_procfile_execs_the_worker_so_honcho_sees_its_exit_code():
    lines = (ROOT / "Procfile").read_text().splitlines()
    assert [line for line in lines if line.startswith("worker:")] == ["worker: exec memnet worker"]


def test_the_systemd_unit_runs_a_worker_and_restarts_it_except_on_a_config_error():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(ROOT / "deploy" / "memnet-worker@.service")
    service = unit["Service"]
    program, *args = shlex.split(service["ExecStart"])
    assert program.endswith("/bin/memnet") and args == ["worker"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["EnvironmentFile"] == "/etc/memnet/worker.env"
    assert service["Environment"] == "MEMNET_WORKER_ID=%H-%i"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 5  # a worker stops within 4 s
    assert service["User"] == "memnet"
    assert "/var/lib/memnet" in service["ReadWritePaths"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
