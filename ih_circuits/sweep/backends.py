"""Where a sweep's runs execute: a local process pool (the default) or a Ray cluster.

Both yield ``(run, outcome)`` as runs finish, each run in a worker with one torch thread, so the same spec
gives the same numbers on either. A worker that dies (killed, out of memory) gives its run a failed record.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from pathlib import Path

from ih_circuits.sweep.execute import RunOutcome, execute_run, failure
from ih_circuits.sweep.spec import RunSpec

BACKENDS = ("local", "ray")
Execute = Callable[[RunSpec], RunOutcome]


def available_cores() -> int:
    """Cores this process may use (its CPU affinity where the platform reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _guarded(tree: ast.Module, line: int) -> bool:
    """Whether ``line`` of a module lies inside an ``if __name__ == "__main__":`` block."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return True
    return False


def check_spawn_safe_entry() -> None:
    """Refuse, before any process starts, a local pool started from the top level of a script without the
    ``if __name__ == "__main__":`` guard: each spawned worker imports the script and would start the sweep again
    (every worker dies, every run fails). Notebooks, the CLI and interactive sessions are not scripts of the main
    module, so they pass."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py"):
        return
    path = os.path.realpath(path)
    frame = sys._getframe(1)
    while frame is not None:
        top_level = frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"
        if top_level and os.path.realpath(frame.f_code.co_filename) == path:
            break
        frame = frame.f_back
    if frame is None:
        return
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return
    if not _guarded(tree, frame.f_lineno):
        raise RuntimeError(
            f"{path}, line {frame.f_lineno}: a sweep with backend='local' started from a script's top level; its "
            "spawned workers import the script and would start it again. Put the call under "
            '`if __name__ == "__main__":`'
        )


def _drain(
    queue: deque[RunSpec], width: int, execute: Execute, context: BaseContext
) -> Generator[tuple[RunSpec, RunOutcome], None, list[RunSpec]]:
    """Run ``queue`` on a pool of ``width`` processes, at most ``width`` runs in flight, until it is empty or a
    worker dies; then return the runs that were in flight (one of them killed the pool, the others with it)."""
    with ProcessPoolExecutor(max_workers=width, mp_context=context) as pool:
        in_flight: dict[Future[RunOutcome], RunSpec] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < width:
                    run = queue.popleft()
                    in_flight[pool.submit(execute, run)] = run
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as error:  # the outcome could not come back (it did not pickle)
                        outcome = failure(in_flight[future], f"{type(error).__name__}: {error}")
                    yield in_flight.pop(future), outcome
                if broken:
                    return list(in_flight.values())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return []


def run_local(
    runs: Sequence[RunSpec], workers: int, execute: Execute = execute_run
) -> Iterator[tuple[RunSpec, RunOutcome]]:
    """Execute ``runs`` in ``workers`` spawned processes (spawn, not fork: a forked torch can hang).

    When a worker dies (killed, out of memory) the pool goes down with every run in flight; those runs are run
    again one at a time in a fresh process, the one that dies alone gets a failed record, and the rest of the
    sweep goes on in a fresh pool. ``execute`` (default ``execute_run``) must be importable by name, as spawned
    workers import it. Scripts that call this must guard their entry point with ``if __name__ == "__main__":``
    (spawned workers import the main module); notebooks and the CLI need nothing.
    """
    context = multiprocessing.get_context("spawn")
    queue = deque(runs)
    while queue:
        suspects = yield from _drain(queue, workers, execute, context)
        for run in suspects:
            if (yield from _drain(deque([run]), 1, execute, context)):
                yield run, failure(run, "worker process died (killed, or out of memory) while running it")


def run_ray(
    runs: Sequence[RunSpec], workers: int, address: str | None, execute: Execute = execute_run
) -> Iterator[tuple[RunSpec, RunOutcome]]:
    """Execute ``runs`` as Ray tasks (one CPU each): on the cluster at ``address`` (``"auto"``, ``"ray://..."``),
    on the Ray instance this process already joined, or on a local instance with ``workers`` CPUs.

    A cluster's workers need ``ih_circuits`` installed. Results come back to this process, so the cluster needs
    no shared file system. A local instance started here is shut down at the end.
    """
    try:
        import ray
    except ImportError:
        raise ValueError("backend='ray' needs Ray: pip install 'ih_circuits[ray]'") from None
    started = not ray.is_initialized()
    if started:
        options = {"num_cpus": workers} if address is None else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
    remote = ray.remote(num_cpus=1, max_retries=0)(execute)
    pending = {remote.remote(run): run for run in runs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                run = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as error:  # the worker died or the task was lost
                    outcome = failure(run, f"Ray task failed: {type(error).__name__}: {error}")
                yield run, outcome
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
