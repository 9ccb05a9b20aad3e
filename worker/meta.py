"""The deployment's record in Redis, ``PREFIX:meta``: what workers and clients agree on.

Fields: ``partitions`` and ``protocol`` (clients route by them), ``model`` (the fingerprint of
the model the deployment serves), ``deploying`` (the model ``memnet deploy`` switches to, or
switched to last), and, for clients and operators, the served model's dimensions and
component names.
The first worker writes it; every live worker re-asserts it each lease renewal
(``HSETNX``: it only fills in what is missing), so a deleted record -- ``DEL``, FLUSHALL, a
Redis restart without persistence -- is back within seconds. What is stored wins: a worker
whose partition count, protocol or model differs is refused at start-up, never the other way
round; and a newcomer that finds the record missing while other workers are alive waits for
them to re-assert it rather than write its own.

A worker is *active* while its model is the served one. Otherwise it takes no partitions
and is not a member of the live set; a worker whose model is neither the served nor the
deploying one is refused at start-up; and only active workers write the record (after a
deploy, the old model's workers must not bring their model back if it is deleted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.connection import Client, text
from worker.protocol import PROTOCOL, Keys
from worker.settings import Settings, SettingsError

if TYPE_CHECKING:
    from memnet import Model


def record(settings: Settings, model: Model) -> dict[str, str]:
    config = model.config
    return {
        "partitions": str(settings.partitions),
        "protocol": str(PROTOCOL),
        "model": model.fingerprint,
        "input_dim": str(config.input_dim),
        "memory_dim": str(config.memory_dim),
        "output_dim": str(config.output_dim),
        "components": ",".join(
            (config.encoder, config.generalizer, config.output, config.response)
        ),
    }


class Meta:
    def __init__(
        self,
        client: Client,
        keys: Keys,
        values: dict[str, str],
        model: str,
        deployed: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.client = client
        self.deployed = deployed  # the model the snapshot store records as deployed
        self.keys = keys
        self.key = keys.meta
        self.values = values
        self.model = model  # how to name this worker's model file in messages
        self.active = True  # this worker's model is the one the deployment serves (last seen)

    def check_at_start(self, others_alive: Callable[[], bool], wait_s: float) -> None:
        """Join the deployment's record, or raise SettingsError naming what differs."""
        deadline = time.monotonic() + wait_s
        while not self.client.exists(self.key) and others_alive():
            if time.monotonic() > deadline:
                break  # nobody re-asserted it: the live set is stale, claim it
            time.sleep(0.1)
        served = self.served_elsewhere()
        if served is not None:
            raise SettingsError(
                f"{self.key} is missing, and this deployment's partitions are served by model "
                f"{served[:12]} (memnet deploy); MEMNET_MODEL {self.model} is model "
                f"{self.values['model'][:12]}. Start a worker of model {served[:12]} (it "
                "writes the record again), or deploy this one with memnet deploy"
            )
        mismatch = self.reassert()
        if mismatch:
            raise SettingsError(mismatch)

    def served_elsewhere(self) -> str | None:
        """With the record missing (deleted, or lost by Redis): the model memnet deploy
        made the only one to take the partitions (PREFIX:{p}:serve), or, where Redis lost
        those too (FLUSHALL), the one the snapshot store records as deployed, if not this
        worker's: its workers re-assert the record; a worker of the old model must not
        write its own, which would undo the deploy."""
        if self.client.exists(self.key):
            return None
        mine = self.values["model"]
        pipe = self.client.pipeline(transaction=False)
        for p in range(int(self.values["partitions"])):
            pipe.get(self.keys.part(p, "serve"))
        serve = {text(v) for v in pipe.execute() if v is not None}
        if serve:
            return min(serve - {mine}) if serve - {mine} else None
        recorded = self.deployed()
        return recorded if recorded not in (None, mine) else None

    def reassert(self) -> str | None:
        """Fill in missing fields (one round trip when none is missing); what differs from
        this worker's values, or None (also while the record is missing and another
        worker's to write)."""
        stored = self._stored()
        if self.active and not stored and self.served_elsewhere() is not None:
            self.active = False  # (deployed away since its last look: it must not write)
        if self.active and not self.values.keys() <= stored.keys():
            pipe = self.client.pipeline(transaction=False)
            for field, value in self.values.items():
                pipe.hsetnx(self.key, field, value)
            pipe.execute()
            stored = self._stored()
        return self.mismatch(stored) if stored else None

    def _stored(self) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.client.hgetall(self.key).items()}

    def mismatch(self, stored: dict[str, str]) -> str | None:
        mine = self.values
        if stored.get("partitions") != mine["partitions"]:
            return (
                f"MEMNET_PARTITIONS is {mine['partitions']}, but this deployment ({self.key}) "
                f"has {stored.get('partitions')} partitions; the count is fixed once set"
            )
        if stored.get("protocol") != mine["protocol"]:
            return f"{self.key} speaks protocol {stored.get('protocol')}, this worker {PROTOCOL}"
        serving, deploying = stored.get("model"), stored.get("deploying")
        self.active = serving == mine["model"]
        if mine["model"] not in (serving, deploying):
            also = f" and deploying {deploying[:12]}" if deploying not in (None, serving) else ""
            return (
                f"MEMNET_MODEL {self.model} is model {mine['model'][:12]}, but this deployment "
                f"({self.key}) serves model {str(serving)[:12]}{also}: start workers with "
                "that model file, or switch models with memnet deploy --model FILE"
            )
        return None
