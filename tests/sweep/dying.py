"""A stand-in for ``execute_run`` whose worker process dies on seed 1 (spawned workers import it by name)."""

import os

from ih_circuits.sweep.execute import RunOutcome, base_record
from ih_circuits.sweep.spec import RunSpec


def die_on_seed_1(run: RunSpec) -> RunOutcome:
    if run.seed == 1:
        os._exit(3)
    return RunOutcome({**base_record(run), "status": "ok", "error": ""})
