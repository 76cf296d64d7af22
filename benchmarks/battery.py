"""A battery of bad inputs, extreme values, damaged files and kills, run against the installed ``ih_circuits``.

Each case runs in a forked child under an address-space limit and a timeout, and ends as one of:

- right result: it ran and its checks held;
- clear error: a ``ValueError`` (or ``KeyError``, ``FloatingPointError``, ``NotImplementedError``, or an
  ``OSError`` such as ``PermissionError``) whose message names what is wrong (for an ``OSError``: the path and
  what happened); for the CLI, exit status 2 (or 1 for an interrupted run) with one line on stderr;
- unclear error: one of those types, but the message does not say what the case expects it to say;
- silent wrong result: it accepted bad input, or returned a wrong, mixed or non-finite result;
- crash: any other exception (a traceback for the user), killed (out of memory) or timed out.

Each case says what a clear error must say (a regex, usually the argument's name) or what a right result must
satisfy (its assertions). The contract the cases check: a bad argument is a ``ValueError`` (or
``MemoryBudgetError``, a ``ValueError``) naming the argument and its allowed range, raised before any computation;
work too large for the memory limit (the battery sets ``IH_CIRCUITS_MEMORY_LIMIT=4GB``) is refused with its size
and the argument to lower, instead of allocating or hanging (such cases have a short timeout).

Run ``python benchmarks/battery.py`` (``make battery``); ``--only WORD`` runs the cases whose name contains
WORD. It prints one line per case that is not a right result or a clear error, then the totals. A case's own
output (progress bars, warnings) is discarded. The older cases only use API that every version of the package
since the first release has, so the same script measures an older checkout (put it first on ``PYTHONPATH``); the
newer ones (sweeps, probes, views, priors) need the API the README describes, and count as crashes where it is
missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import resource
import select
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import ih_circuits as ih

ADDRESS_SPACE = 10 * 2**30  # per case: torch reserves about 2 GiB of address space before allocating
TIMEOUT_S = 300
CLEAR = (ValueError, KeyError, FloatingPointError, NotImplementedError, OSError)  # OSError: FileNotFoundError too
OUTCOMES = ("right result", "clear error", "unclear error", "silent wrong result", "crash")


@dataclass(frozen=True)
class Case:
    """``error``: what a clear error must say (a regex); ``must_fail``: whether finishing without one is wrong;
    ``timeout``: seconds before the case counts as hung (a crash)."""

    name: str
    run: Callable[[Path], None]
    error: str | None
    must_fail: bool
    timeout: float = TIMEOUT_S
    category: str = ""


CASES: list[Case] = []
CATEGORY = [""]


def case(
    name: str, error: str | None = None, must_fail: bool | None = None, timeout: float = TIMEOUT_S
) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register a case; by default one with an ``error`` must fail with it, one without must succeed."""

    def register(function: Callable[[Path], None]) -> Callable[[Path], None]:
        must = error is not None if must_fail is None else must_fail
        CASES.append(Case(name, function, error, must, timeout, CATEGORY[0]))
        return function

    return register


def section(category: str) -> None:
    """The category of the cases registered after this call (the totals are printed per category too)."""
    CATEGORY[0] = category


# ---- helpers that work with every version of the API ----


def short_run(seed: int = 0, steps: int = 4, **overrides) -> ih.TrainingRun:
    return ih.train_preset("cwa", seed=seed, steps=steps, batch_size=64, eval_size=64, quiet=True, **overrides)


def save(run: ih.TrainingRun, directory: Path, overwrite: bool = False) -> None:
    try:
        run.save(directory, overwrite=overwrite)
    except TypeError as error:  # versions before atomic saves had no overwrite argument
        if "overwrite" not in str(error):
            raise
        run.save(directory)


def rewrite_manifests(directory: Path) -> None:
    """After a hand edit, make the checksums agree again (as a careless script would), where saves have them."""
    try:
        from ih_circuits.checkpoint import write_manifest
    except ImportError:
        return
    if (directory / "model" / "manifest.json").is_file():
        write_manifest(directory / "model", "IHTransformer checkpoint")
    if (directory / "manifest.json").is_file():
        write_manifest(directory, "TrainingRun")


def cli(*argv: str) -> None:
    """Run the CLI in-process; exit 2 with one stderr line is a clear error, anything else is checked here."""
    from ih_circuits.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    lines = err.getvalue().strip().splitlines()
    if code == 2 and len(lines) == 1:
        raise ValueError(lines[0])
    if code not in (0, None):
        raise RuntimeError(f"exit status {code}, stderr: {err.getvalue()[-300:]!r}")


def same_run(a: ih.TrainingRun, b: ih.TrainingRun) -> bool:
    weights = all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))
    return weights and a.step == b.step and len(a.history) == len(b.history)


def edited_run(directory: Path, file: str, edit: Callable[[Path], None]) -> None:
    save(short_run(), directory / "run")
    edit(directory / "run" / file)
    rewrite_manifests(directory / "run")
    ih.TrainingRun.load(directory / "run")


def edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return apply


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def drop_share_column(path: Path) -> None:
    import pandas as pd

    history = pd.read_csv(path)
    history.drop(columns=[c for c in history.columns if c.startswith("share[")][:1]).to_csv(path, index=False)


def finite_training(**overrides) -> None:
    from ih_circuits.presets import preset_parts

    model, task, _ = preset_parts("cwa", **overrides)
    tokens = task.sample(64, seed=0).tokens
    loss = model(tokens, return_type="loss")
    loss.backward()
    assert torch.isfinite(loss), f"loss {loss.item()}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients of {bad}"


# ---- kills during saves ----
section("kills during saves")


def kill_during_save(directory: Path, seed: int) -> None:
    """Save A; a child saves B over it (again and again) and is SIGKILLed at a random moment; the directory
    must load to exactly A or B (a kill between a save's two renames loads the previous save, with a warning).
    A refusal counts as a clear error, and the README's table has none."""
    a, b = short_run(seed=0, steps=4), short_run(seed=1, steps=6)
    save(a, directory / "run")
    child = os.fork()
    if child == 0:
        while True:
            for run in (b, a):
                save(run, directory / "run", overwrite=True)
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    loaded = ih.TrainingRun.load(directory / "run")
    assert same_run(loaded, a) or same_run(loaded, b), "the directory loads a mix of two saves"


KILL_REFUSAL = "manifest|incomplete|checksum|previous save|not a saved"
for kill in range(30):
    case(f"kill during save #{kill}", error=KILL_REFUSAL, must_fail=False)(
        lambda directory, kill=kill: kill_during_save(directory, kill)
    )


# ---- overwriting and output paths ----
section("overwrites and output paths")


@case("save over a different run without overwrite", error="overwrite")
def _(directory: Path) -> None:
    save(short_run(seed=0), directory / "run")
    short_run(seed=1).save(directory / "run")


@case("overwrite leaves no stale history or optimizer file")
def _(directory: Path) -> None:
    save(short_run(), directory / "run")
    bare = short_run(seed=1)
    bare.history, bare.optimizer_state = bare.history.iloc[0:0], None
    save(bare, directory / "run", overwrite=True)
    loaded = ih.TrainingRun.load(directory / "run")
    assert loaded.optimizer_state is None and len(loaded.history) == 0, "files of the previous save came back"


@case("cli train --out over a different run", error="overwrite")
def _(directory: Path) -> None:
    save(short_run(), directory / "run")
    cli("train", "--preset", "cwa", "--steps", "3", "--batch-size", "64", "--quiet", "--out", str(directory / "run"))


@case("cli train --out an existing file", error="file")
def _(directory: Path) -> None:
    (directory / "file").write_text("x")
    cli("train", "--preset", "cwa", "--steps", "3", "--batch-size", "64", "--quiet", "--out", str(directory / "file"))


@case("cli train --out an unwritable directory", error="writable")
def _(directory: Path) -> None:
    cli("train", "--preset", "cwa", "--steps", "3", "--batch-size", "64", "--quiet", "--out", "/proc/ih-run")


@case("cli report -o a directory", error="directory")
def _(directory: Path) -> None:
    save(short_run(), directory / "run")
    cli("report", str(directory / "run"), "-o", str(directory))


@case("cli probe a damaged checkpoint", error="model.safetensors")
def _(directory: Path) -> None:
    save(short_run(), directory / "run")
    weights = directory / "run" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])
    cli("probe", str(directory / "run"), "--n-sequences", "16")


@case("cli probe a missing directory", error="nothing|not a saved|neither")
def _(directory: Path) -> None:
    cli("probe", str(directory / "nothing"))


@case("cli train interrupted by Ctrl-C exits 1 and saves")
def _(directory: Path) -> None:
    from ih_circuits import training
    from ih_circuits.cli import main

    original, calls = training.objective_loss, []

    def ctrl_c_at_step_3(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if sum(calls) == 3 and calls[-1]:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    training.objective_loss = ctrl_c_at_step_3
    out = directory / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--preset", "cwa", "--steps", "8", "--batch-size", "64", "--quiet", "--out", str(out)])
    run = ih.TrainingRun.load(out)
    assert code == 1, f"an interrupted train exits {code}"
    assert run.interrupted and 0 < run.step < 8, "the interrupted run was not saved as interrupted"


@case("cli usage error", error="invalid int value")
def _(directory: Path) -> None:
    cli("train", "--steps", "many")


# ---- loads validate what they read ----
section("loads")

for name, file, edit, error in [
    ("config without layout", "model/config.json", edit_json(lambda d: d.pop("layout")), "layout"),
    ("config window as text", "model/config.json", edit_json(lambda d: d.update(window="3")), "window"),
    ("config unknown key", "model/config.json", edit_json(lambda d: d.update(lr=1.0)), "lr"),
    ("step as text", "run.json", edit_json(lambda d: d.update(step="5")), "step"),
    ("negative step", "run.json", edit_json(lambda d: d.update(step=-5)), "step"),
    ("interrupted as text", "run.json", edit_json(lambda d: d.update(interrupted="no")), "interrupted"),
    (
        "task vocabulary differs from the model's",
        "run.json",
        edit_json(lambda d: d["task"].update(vocab_size=5)),
        "vocab",
    ),
    ("task without init", "run.json", edit_json(lambda d: d["task"].pop("init")), "init"),
    ("stage without lr", "run.json", edit_json(lambda d: d["train_config"]["stages"][0].pop("lr")), "lr"),
    ("flipped byte in the weights", "model/model.safetensors", flip_byte, "safetensors|checksum|finite"),
    ("flipped byte in run.json", "run.json", flip_byte, "run.json|JSON|checksum"),
    ("history without a share column", "history.csv", drop_share_column, "history"),
    (
        "optimizer state of a stage that does not exist",
        "optimizer.pt",
        lambda p: torch.save({"stage": 7, "state": {}}, p),
        "stage",
    ),
]:
    case(f"load: {name}", error=error)(lambda directory, file=file, edit=edit: edited_run(directory, file, edit))


@case("load: NaN weights", error="finite|NaN")
def _(directory: Path) -> None:
    run = short_run()
    with torch.no_grad():
        run.model.classifier.a.fill_(float("nan"))
    save(run, directory / "run")
    loaded = ih.TrainingRun.load(directory / "run")
    assert torch.isfinite(loaded.model.classifier.a), "NaN weights loaded"


@case("load: a complete save round-trips exactly")
def _(directory: Path) -> None:
    run = short_run()
    save(run, directory / "run")
    assert same_run(ih.TrainingRun.load(directory / "run"), run), "the reloaded run differs"


# ---- finite everywhere ----
section("finite values")


@case("train cwa with w_plus 25, w_minus 0")
def _(directory: Path) -> None:
    run = short_run(steps=3, w_plus=25.0, w_minus=0.0)
    assert run.history["eval_loss"].notna().all()


for label, overrides in [
    ("w_plus 50", {"w_plus": 50.0, "w_minus": 0.0}),
    ("w_plus 50 full copier", {"w_plus": 50.0, "w_minus": 0.0, "copier": "full"}),
    ("a 1e4", {"a_init": 1e4}),
    ("selector coefficients 1e25", {"c_init": 1e25}),
    ("alpha 1e-3", {"alpha": 1e-3}),
    ("alpha 1e3", {"alpha": 1e3}),
]:
    case(f"finite loss and gradients: {label}")(lambda directory, overrides=overrides: finite_training(**overrides))


@case("alpha 1e-40", error="alpha")
def _(directory: Path) -> None:
    task = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=20, alpha=1e-40)
    assert torch.isfinite(task.sample(8, seed=0).kernels).all(), "NaN kernels"


@case("alpha NaN", error="alpha")
def _(directory: Path) -> None:
    ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=20, alpha=float("nan")).sample(8, seed=0)


@case("unknown positions value", error="loss_positions")
def _(directory: Path) -> None:
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=20))
    model(torch.zeros(2, 10, dtype=torch.long), return_type="loss", loss_positions="first")


@case("float token ids", error="integer|dtype|float")
def _(directory: Path) -> None:
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=20))
    model.to_tokens([0.7, 1.2, 2.9])


@case("token id out of the vocabulary", error="d_vocab")
def _(directory: Path) -> None:
    ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=20))(torch.tensor([[0, 1, 5]]))


# ---- memory ----
section("memory and time")


@case("train at vocabulary 20", error="memory", must_fail=False)
def _(directory: Path) -> None:
    run = ih.train_preset("cwa", vocab_size=20, steps=2, quiet=True)
    assert run.history["eval_loss"].notna().all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < 2 * 10**9, f"peak memory {peak / 1e9:.1f} GB, above 2 GB"


@case("theory at vocabulary 50, window 5", error="memory|window", must_fail=False)
def _(directory: Path) -> None:
    scores = ih.theory.selection_scores(50, (1, 2), window=5, n_kernels=100)
    assert scores.best(2) == (1, 2), f"argmax {scores.best(2)}"


@case("sample at vocabulary 1000, batch 2048", error="memory|batch_size")
def _(directory: Path) -> None:
    ih.NGramTask(vocab_size=1000, parents=(1,), seq_len=101).sample(2048, seed=0)


@case("12 heads at degree 12: a training step", error="memory", must_fail=False)
def _(directory: Path) -> None:
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=101, n_heads=12, window=3, max_degree=12))
    tokens = ih.NGramTask(vocab_size=3, parents=(1, 2), seq_len=101).sample(64, seed=0).tokens
    loss = model(tokens, return_type="loss")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.selector.c.grad).all()


# ---- helpers of the cases below ----


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    from ih_circuits.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return (0 if code is None else code), out.getvalue(), err.getvalue()


def tiny_model(**changes) -> ih.IHTransformer:
    return ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=20, **changes))


def tiny_task(**changes) -> ih.NGramTask:
    return ih.NGramTask(**{"vocab_size": 3, "parents": (1, 2), "seq_len": 20, "window": 3, **changes})


def tiny_tokens(batch: int = 8, seq_len: int = 20, seed: int = 0) -> torch.Tensor:
    return tiny_task(seq_len=seq_len).sample(batch, seed=seed).tokens


def tiny_spec(**fixed) -> dict:
    """A sweep of one two-step CWa run at batch 32, probed with 16 sequences."""
    return {
        "preset": "cwa",
        "seeds": [0],
        "steps": 2,
        "fixed": {"batch_size": 32, "eval_size": 32, **fixed},
        "probe": {"n_sequences": 16},
    }


def finished_sweep(directory: Path) -> Path:
    from ih_circuits.sweep import run_sweep

    out = directory / "sweep"
    results = run_sweep(tiny_spec(), out, workers=1, quiet=True)
    if not (results["status"] == "ok").all():
        raise RuntimeError(f"the tiny sweep itself failed: {results['error'].tolist()}")
    return out


def both(*words: str) -> str:
    """A regex that matches a message containing every one of ``words`` (regexes themselves), in any order."""
    return "(?s)" + "".join(f"(?=.*(?:{word}))" for word in words)


def stop_at(step: int) -> Callable[[ih.TrainingRun], None]:
    """A training callback that interrupts (as Ctrl-C does) once the run has taken ``step`` steps."""

    def callback(run: ih.TrainingRun) -> None:
        if run.step == step:
            raise KeyboardInterrupt

    return callback


# ---- bad inputs to public functions: each must be a ValueError naming the argument ----
section("bad inputs")


def bad_inputs() -> list[tuple[str, Callable[[], object], str]]:
    """(name, call, what the error must name): negative, zero, NaN, infinite, mistyped and out-of-range values."""
    nan, inf = float("nan"), float("inf")
    task = ih.NGramTask  # a short name for the rows below
    tokens = tiny_tokens
    return [
        # NGramTask(...)
        ("NGramTask vocab_size 0", lambda: task(0, (1,), 10), "vocab_size"),
        ("NGramTask vocab_size 2.5", lambda: task(2.5, (1,), 10), "vocab_size"),
        ("NGramTask vocab_size True", lambda: task(True, (1,), 10), "vocab_size"),
        ("NGramTask parents (0,)", lambda: task(3, (0,), 10), "parents"),
        ("NGramTask parents (-1, 2)", lambda: task(3, (-1, 2), 10), "parents"),
        ("NGramTask parents repeated", lambda: task(3, (1, 1), 10), "parents"),
        ("NGramTask parents as text", lambda: task(3, "12", 10), "parents"),
        ("NGramTask parents (1.5,)", lambda: task(3, (1.5,), 10), "parents"),
        ("NGramTask seq_len 0", lambda: task(3, (1,), 0), "seq_len"),
        ("NGramTask seq_len -3", lambda: task(3, (1,), -3), "seq_len"),
        ("NGramTask seq_len NaN", lambda: task(3, (1,), nan), "seq_len"),
        ("NGramTask alpha -1", lambda: task(3, (1,), 10, alpha=-1.0), "alpha"),
        ("NGramTask alpha 0", lambda: task(3, (1,), 10, alpha=0.0), "alpha"),
        ("NGramTask alpha inf", lambda: task(3, (1,), 10, alpha=inf), "alpha"),
        ("NGramTask alpha as text", lambda: task(3, (1,), 10, alpha="0.1"), "alpha"),
        ("NGramTask window 0", lambda: task(3, (1,), 10, window=0), "window"),
        ("NGramTask window below the parents", lambda: task(3, (1, 2), 10, window=1), "window"),
        ("NGramTask init 'random'", lambda: task(3, (1,), 10, init="random"), "init"),
        ("NGramTask prior as text", lambda: task(3, (1,), 10, prior="dirichlet"), "prior"),
        # NGramTask.sample
        ("sample batch 0", lambda: task(3, (1,), 10).sample(0, seed=0), "batch_size"),
        ("sample batch -5", lambda: task(3, (1,), 10).sample(-5, seed=0), "batch_size"),
        ("sample batch 2.0", lambda: task(3, (1,), 10).sample(2.0, seed=0), "batch_size"),
        ("sample batch NaN", lambda: task(3, (1,), 10).sample(nan, seed=0), "batch_size"),
        ("sample seed -1", lambda: task(3, (1,), 10).sample(2, seed=-1), "seed"),
        ("sample seed 2**64", lambda: task(3, (1,), 10).sample(2, seed=2**64), "seed"),
        ("sample seed 1.5", lambda: task(3, (1,), 10).sample(2, seed=1.5), "seed"),
        ("sample seed as text", lambda: task(3, (1,), 10).sample(2, seed="0"), "seed"),
        ("sample generator 'x'", lambda: task(3, (1,), 10).sample(2, generator="x"), "generator"),
        (
            "sample seed and generator",
            lambda: task(3, (1,), 10).sample(2, seed=0, generator=torch.Generator()),
            both("seed", "generator"),
        ),
        ("sample device 'meta'", lambda: task(3, (1,), 10).sample(2, seed=0, device="meta"), "device"),
        ("sample device 'nonsense'", lambda: task(3, (1,), 10).sample(2, seed=0, device="nonsense"), "device"),
        ("sample device 'cuda:99'", lambda: task(3, (1,), 10).sample(2, seed=0, device="cuda:99"), "device"),
        # IHConfig(...) and building the model
        ("IHConfig d_vocab 1", lambda: ih.IHConfig(d_vocab=1), "d_vocab"),
        ("IHConfig n_ctx 0", lambda: ih.IHConfig(n_ctx=0), "n_ctx"),
        ("IHConfig n_ctx -5", lambda: ih.IHConfig(n_ctx=-5), "n_ctx"),
        ("IHConfig n_heads 0", lambda: ih.IHConfig(n_heads=0), "n_heads"),
        ("IHConfig window 0", lambda: ih.IHConfig(window=0), "window"),
        ("IHConfig max_degree -1", lambda: ih.IHConfig(max_degree=-1), "max_degree"),
        ("IHConfig max_degree above n_heads", lambda: ih.IHConfig(n_heads=3, max_degree=4), "max_degree"),
        ("IHConfig w_plus NaN", lambda: ih.IHConfig(w_plus=nan), "w_plus"),
        ("IHConfig w_minus inf", lambda: ih.IHConfig(w_minus=inf), "w_minus"),
        ("IHConfig c_init as text", lambda: ih.IHConfig(c_init="1"), "c_init"),
        ("IHConfig a_init NaN", lambda: ih.IHConfig(a_init=nan), "a_init"),
        ("IHConfig prob_floor 1", lambda: ih.IHConfig(prob_floor=1.0), "prob_floor"),
        ("IHConfig prob_floor -0.1", lambda: ih.IHConfig(prob_floor=-0.1), "prob_floor"),
        ("IHConfig prob_floor NaN", lambda: ih.IHConfig(prob_floor=nan), "prob_floor"),
        ("IHConfig dtype 'float16'", lambda: ih.IHConfig(dtype="float16"), "dtype"),
        ("IHConfig dtype torch.float32", lambda: ih.IHConfig(dtype=torch.float32), "dtype"),
        ("IHConfig copier 'fancy'", lambda: ih.IHConfig(copier="fancy"), "copier"),
        ("IHConfig layout 'random'", lambda: ih.IHConfig(layout="random"), "layout"),
        ("IHConfig seed -1", lambda: ih.IHConfig(seed=-1), "seed"),
        ("IHConfig device 'meta'", lambda: ih.IHConfig(device="meta"), "device"),
        ("IHTransformer on device 'meta'", lambda: ih.IHTransformer(ih.IHConfig(device="meta")), "device"),
        ("IHTransformer on device 'cuda:99'", lambda: ih.IHTransformer(ih.IHConfig(device="cuda:99")), "device"),
        (
            "IHTransformer full copier, seed 2**64",
            lambda: ih.IHTransformer(ih.IHConfig(copier="full", seed=2**64)),
            "seed",
        ),
        ("IHTransformer of a dict", lambda: ih.IHTransformer({"d_vocab": 3}), "cfg|config"),
        # IHTransformer forward
        ("forward negative token", lambda: tiny_model()(torch.tensor([[0, -1, 2]])), "tokens|d_vocab"),
        ("forward 3-D tokens", lambda: tiny_model()(torch.zeros(2, 3, 4, dtype=torch.long)), "tokens|shape"),
        ("forward 1-D tokens", lambda: tiny_model()(torch.tensor([0, 1, 2])), "tokens|shape"),
        ("forward longer than n_ctx", lambda: tiny_model()(torch.zeros(1, 21, dtype=torch.long)), "n_ctx"),
        ("forward empty tokens", lambda: tiny_model()(torch.zeros(1, 0, dtype=torch.long)), "tokens|empty|position"),
        ("forward bool tokens", lambda: tiny_model()(torch.ones(1, 4, dtype=torch.bool)), "integer|dtype|bool"),
        ("forward float tokens", lambda: tiny_model()(torch.tensor([[0.0, 1.0, 2.0]])), "integer|dtype|float"),
        ("forward a list of ids", lambda: tiny_model()([[0, 1, 2]]), "tokens|tensor"),
        ("forward return_type 'logits'", lambda: tiny_model()(tokens(), return_type="logits"), "return_type"),
        ("forward loss_positions None", lambda: tiny_model()(tokens(), "loss", None), "loss_positions"),
        (
            "forward loss of one position",
            lambda: tiny_model()(torch.zeros(2, 1, dtype=torch.long), return_type="loss"),
            "position",
        ),
        ("query_log_probs of one position", lambda: tiny_model().query_log_probs(tokens()[:, :1]), "position"),
        ("run_with_cache of float tokens", lambda: tiny_model().run_with_cache(tokens().float()), "integer|dtype"),
        # train_preset
        ("train_preset unknown preset", lambda: ih.train_preset("nope", steps=2, quiet=True), "preset"),
        ("train_preset steps 0", lambda: ih.train_preset("cwa", steps=0, quiet=True), "steps"),
        ("train_preset steps -1", lambda: ih.train_preset("cwa", steps=-1, quiet=True), "steps"),
        ("train_preset steps 2.5", lambda: ih.train_preset("cwa", steps=2.5, quiet=True), "steps"),
        ("train_preset lr NaN", lambda: short_run(steps=2, lr=nan), r"\blr\b"),
        ("train_preset lr -1", lambda: short_run(steps=2, lr=-1.0), r"\blr\b"),
        ("train_preset lr inf", lambda: short_run(steps=2, lr=inf), r"\blr\b"),
        ("train_preset lr 1e300", lambda: short_run(steps=2, lr=1e300), r"\blr\b"),
        ("train_preset batch_size 0", lambda: ih.train_preset("cwa", steps=2, batch_size=0, quiet=True), "batch_size"),
        ("train_preset batch_size 1.5", lambda: ih.train_preset("cwa", steps=2, batch_size=1.5, quiet=True), "batch"),
        (
            "train_preset eval_size 0",
            lambda: ih.train_preset("cwa", steps=2, batch_size=64, eval_size=0, quiet=True),
            "eval_size",
        ),
        ("train_preset record_every 0", lambda: short_run(steps=2, record_every=0), "record_every"),
        ("train_preset unknown override", lambda: short_run(steps=2, learning_rate=0.1), "learning_rate"),
        ("train_preset seed -1", lambda: short_run(seed=-1, steps=2), "seed"),
        ("train_preset optimizer 'lbfgs'", lambda: short_run(steps=2, optimizer="lbfgs"), "optimizer"),
        ("train_preset objective 'first'", lambda: short_run(steps=2, objective="first"), "objective"),
        ("train_preset loss 'mse'", lambda: short_run(steps=2, loss="mse"), "loss"),
        ("train_preset data 'stream'", lambda: short_run(steps=2, data="stream"), "data"),
        ("train_preset window 0", lambda: short_run(steps=2, window=0), "window"),
        ("train_preset vocab_size 1", lambda: short_run(steps=2, vocab_size=1), "vocab_size"),
        ("train_preset device 'meta'", lambda: short_run(steps=2, device="meta"), "device"),
        ("train_preset parents (1, 5), window 3", lambda: short_run(steps=2, parents=(1, 5)), "window"),
        # the theory
        ("selection_scores vocab_size 1", lambda: ih.theory.selection_scores(1, (1,)), "vocab_size"),
        ("selection_scores n_kernels 0", lambda: ih.theory.selection_scores(3, (1,), n_kernels=0), "n_kernels"),
        ("selection_scores n_kernels 1", lambda: ih.theory.selection_scores(3, (1,), n_kernels=1), "n_kernels"),
        ("selection_scores window 0", lambda: ih.theory.selection_scores(3, (1,), window=0), "window"),
        ("selection_scores alpha NaN", lambda: ih.theory.selection_scores(3, (1,), nan, n_kernels=10), "alpha"),
        ("selection_scores alpha -1", lambda: ih.theory.selection_scores(3, (1,), -1.0, n_kernels=10), "alpha"),
        ("selection_scores method 'fast'", lambda: ih.theory.selection_scores(3, (1,), method="fast"), "method"),
        (
            "selection_scores n_samples 1",
            lambda: ih.theory.selection_scores(3, (1,), method="monte_carlo", n_samples=1),
            "n_samples",
        ),
        (
            "selection_scores n_samples with exact",
            lambda: ih.theory.selection_scores(3, (1,), method="exact", n_samples=100),
            "n_samples",
        ),
        (
            "selection_scores subset outside window",
            lambda: ih.theory.selection_scores(3, (1,), subsets=[(9,)]),
            "subset",
        ),
        ("selection_scores seed -1", lambda: ih.theory.selection_scores(3, (1,), n_kernels=10, seed=-1), "seed"),
        ("selection_scores seed 2**64", lambda: ih.theory.selection_scores(3, (1,), n_kernels=10, seed=2**64), "seed"),
        ("best(-1)", lambda: ih.theory.selection_scores(3, (1,), n_kernels=10).best(-1), "max_degree"),
        ("best(1.5)", lambda: ih.theory.selection_scores(3, (1,), n_kernels=10).best(1.5), "max_degree"),
        (
            "predicted_parent_set max_degree -1",
            lambda: ih.theory.predicted_parent_set(3, (1,), max_degree=-1),
            "degree",
        ),
        ("modified_chi2_mi parents (0,)", lambda: ih.theory.modified_chi2_mi(3, (0,)), "parents"),
        (
            "stationary_window_law length 0",
            lambda: ih.theory.stationary_window_law(torch.full((1, 3, 3), 1 / 3), (1,), 3, 0),
            "length",
        ),
        ("cli theory --max-degree -1", lambda: cli("theory", "--max-degree", "-1"), "max.degree"),
        ("cli theory --vocab-size 1", lambda: cli("theory", "--vocab-size", "1"), "vocab.size"),
        ("cli theory --alpha nan", lambda: cli("theory", "--alpha", "nan"), "alpha"),
        ("cli theory --n-kernels 0", lambda: cli("theory", "--n-kernels", "0"), "n.kernels"),
        ("cli theory --window 0", lambda: cli("theory", "--window", "0"), "window"),
        ("cli theory --n-samples 1", lambda: cli("theory", "--method", "monte_carlo", "--n-samples", "1"), "n.samples"),
        # parent probes (every probe takes (model, data))
        (
            "find_parents n_sequences 0",
            lambda: ih.probes.find_parents(tiny_model(), tiny_task(), n_sequences=0),
            "n_seq",
        ),
        (
            "find_parents n_sequences 4",
            lambda: ih.probes.find_parents(tiny_model(), tiny_task(), n_sequences=4),
            "n_seq",
        ),
        (
            "find_parents n_sequences 2.5",
            lambda: ih.probes.find_parents(tiny_model(), tiny_task(), n_sequences=2.5),
            "n_seq",
        ),
        ("find_parents seed -1", lambda: ih.probes.find_parents(tiny_model(), tiny_task(), seed=-1), "seed"),
        ("find_parents max_lag 0", lambda: ih.probes.find_parents(tiny_model(), tiny_task(), max_lag=0), "max_lag"),
        (
            "find_parents query_layer -1",
            lambda: ih.probes.find_parents(tiny_model(), tiny_task(), query_layer=-1),
            "query_layer",
        ),
        (
            "behavioural_probe threshold 0",
            lambda: ih.probes.behavioural_probe(tiny_model(), tiny_task(), threshold=0.0),
            "threshold",
        ),
        (
            "behavioural_probe threshold 1.5",
            lambda: ih.probes.behavioural_probe(tiny_model(), tiny_task(), threshold=1.5),
            "threshold",
        ),
        (
            "behavioural_probe threshold NaN",
            lambda: ih.probes.behavioural_probe(tiny_model(), tiny_task(), threshold=nan),
            "threshold",
        ),
        (
            "behavioural_probe floor -1",
            lambda: ih.probes.behavioural_probe(tiny_model(), tiny_task(), floor=-1.0),
            "floor",
        ),
        (
            "behavioural_probe floor NaN",
            lambda: ih.probes.behavioural_probe(tiny_model(), tiny_task(), floor=nan),
            "floor",
        ),
        ("find_parents data as text", lambda: ih.probes.find_parents(tiny_model(), "0121"), "data"),
        ("find_parents float tokens", lambda: ih.probes.find_parents(tiny_model(), tokens().float()), "data|integer"),
        ("find_parents 1-D tokens", lambda: ih.probes.find_parents(tiny_model(), tokens()[0]), "data|shape"),
        ("find_parents tokens outside d_vocab", lambda: ih.probes.find_parents(tiny_model(), tokens() + 3), "d_vocab"),
        ("find_parents one sequence", lambda: ih.probes.find_parents(tiny_model(), tokens()[:1]), "data|sequence"),
        (
            "find_parents task vocabulary 5, model 3",
            lambda: ih.probes.find_parents(tiny_model(), tiny_task(vocab_size=5)),
            "vocab",
        ),
        (
            "find_parents task longer than n_ctx",
            lambda: ih.probes.find_parents(tiny_model(), tiny_task(seq_len=30)),
            "n_ctx",
        ),
        ("find_parents of a string model", lambda: ih.probes.find_parents("gpt2", tiny_task()), "model"),
        ("head_patching lag 0", lambda: ih.probes.head_patching(tiny_model(), tiny_task(), lag=0), r"\blag"),
        ("head_patching lag 99", lambda: ih.probes.head_patching(tiny_model(), tiny_task(), lag=99), r"\blag"),
        ("scan_heads lags (0,)", lambda: ih.probes.scan_heads(tiny_model(), tiny_task(), lags=(0,)), "lags"),
        ("scan_heads lags (99,)", lambda: ih.probes.scan_heads(tiny_model(), tiny_task(), lags=(99,)), "lags"),
        ("classifier_probe lags (99,)", lambda: ih.probes.classifier_probe(tiny_model(), tiny_task(), (99,)), "lags"),
        ("copier_probe layer 5", lambda: ih.probes.copier_probe(tiny_model(), tiny_task(), layer=5), "layer"),
        ("copier_probe layer -1", lambda: ih.probes.copier_probe(tiny_model(), tiny_task(), layer=-1), "layer"),
        (
            "representational_probe n_sequences 0",
            lambda: ih.probes.representational_probe(tiny_model(), tiny_task(), n_sequences=0),
            "n_seq",
        ),
        # decomposition_test
        (
            "decomposition_test kl_threshold NaN",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), kl_threshold=nan),
            "kl_threshold",
        ),
        (
            "decomposition_test kl_threshold -1",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), kl_threshold=-1.0),
            "kl_threshold",
        ),
        (
            "decomposition_test kl_threshold inf",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), kl_threshold=inf),
            "kl_threshold",
        ),
        (
            "decomposition_test recovered_threshold NaN",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), recovered_threshold=nan),
            "recovered_threshold",
        ),
        (
            "decomposition_test recovered_threshold -0.5",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), recovered_threshold=-0.5),
            "recovered_threshold",
        ),
        (
            "decomposition_test control_ratio -1",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), control_ratio=-1.0),
            "control_ratio",
        ),
        (
            "decomposition_test lags ()",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), lags=()),
            "lags",
        ),
        (
            "decomposition_test lags (1, 99)",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), lags=(1, 99)),
            "lags",
        ),
        (
            "decomposition_test n_sequences 0",
            lambda: ih.probes.decomposition_test(tiny_model(), tiny_task(), n_sequences=0),
            "n_seq",
        ),
        # attention_view
        ("attention_view last 0", lambda: ih.views.attention_view(tiny_model(), tokens()[0], 0, last=0), "last"),
        ("attention_view last -1", lambda: ih.views.attention_view(tiny_model(), tokens()[0], 0, last=-1), "last"),
        ("attention_view layer 2", lambda: ih.views.attention_view(tiny_model(), tokens()[0], 2), "layer"),
        ("attention_view layer -1", lambda: ih.views.attention_view(tiny_model(), tokens()[0], -1), "layer"),
        ("attention_view batch of 2", lambda: ih.views.attention_view(tiny_model(), tokens()[:2], 0), "one sequence"),
        (
            "attention_view float tokens",
            lambda: ih.views.attention_view(tiny_model(), tokens()[0].float(), 0),
            "integer|dtype",
        ),
        (
            "attention_view tokens outside d_vocab",
            lambda: ih.views.attention_view(tiny_model(), tokens()[0] + 3, 0),
            "d_vocab",
        ),
        (
            "attention_view longer than n_ctx",
            lambda: ih.views.attention_view(tiny_model(), torch.zeros(30, dtype=torch.long), 0),
            "n_ctx",
        ),
        ("attention_view lags (0,)", lambda: ih.views.attention_view(tiny_model(), tokens()[0], 1, lags=(0,)), "lags"),
        # model averaging and the Bayes predictors
        ("model_averaging no candidates", lambda: ih.model_averaging(tokens(), []), "candidates"),
        ("model_averaging candidate (0,)", lambda: ih.model_averaging(tokens(), [(0,)]), "candidates"),
        ("model_averaging candidates as text", lambda: ih.model_averaging(tokens(), "12"), "candidates"),
        ("model_averaging alpha -1", lambda: ih.model_averaging(tokens(), [(1,)], -1.0), "alpha"),
        ("model_averaging alpha NaN", lambda: ih.model_averaging(tokens(), [(1,)], nan), "alpha"),
        ("model_averaging float tokens", lambda: ih.model_averaging(tokens().float(), [(1,)]), "tokens"),
        (
            "model_averaging d_vocab below the tokens",
            lambda: ih.model_averaging(tokens(), [(1,)], d_vocab=2),
            "d_vocab",
        ),
        ("model_averaging_predictive window 0", lambda: ih.model_averaging_predictive(tokens(), 0), "window"),
        (
            "model_averaging_predictive max_size above window",
            lambda: ih.model_averaging_predictive(tokens(), 2, max_size=5),
            "max_size",
        ),
        (
            "model_averaging_predictive max_size -1",
            lambda: ih.model_averaging_predictive(tokens(), 2, max_size=-1),
            "max_size",
        ),
        ("bayes_predictive alpha 0", lambda: ih.bayes_predictive(tokens(), (1, 2), 0.0), "alpha"),
        ("bayes_predictive alpha inf", lambda: ih.bayes_predictive(tokens(), (1, 2), inf), "alpha"),
        ("bayes_predictive parents (0,)", lambda: ih.bayes_predictive(tokens(), (0,)), "parents|lags"),
        ("bayes_predictive 1-D tokens", lambda: ih.bayes_predictive(tokens()[0], (1,)), "tokens|shape"),
        ("bayes_predictive d_vocab 0", lambda: ih.bayes_predictive(tokens(), (1,), d_vocab=0), "d_vocab"),
        ("gih_predictive a NaN", lambda: ih.gih_predictive(tokens(), (1,), nan), r"\ba\b"),
        ("gih_predictive a -inf", lambda: ih.gih_predictive(tokens(), (1,), -inf), r"\ba\b"),
        ("unigram_predictive alpha -1", lambda: ih.unigram_predictive(tokens(), -1.0), "alpha"),
        (
            "oracle_predictive kernels of the wrong shape",
            lambda: ih.oracle_predictive(tokens(), torch.full((8, 4, 3), 1 / 3), (1, 2)),
            "kernels",
        ),
        (
            "kl_divergence shapes differ",
            lambda: ih.kl_divergence(torch.full((2, 3), 1 / 3), torch.full((3, 3), 1 / 3)),
            "shape",
        ),
        (
            "last_position_nll of logits",
            lambda: ih.last_position_nll(torch.randn(8, 20, 3) * 5, tokens()),
            "logits|probabilities",
        ),
        (
            "next_token_nll kind 'x'",
            lambda: ih.next_token_nll(torch.full((8, 20, 3), 1 / 3), tokens(), kind="x"),
            "kind",
        ),
        (
            "accuracy probs of the wrong shape",
            lambda: ih.accuracy(torch.full((8, 19, 3), 1 / 3), tokens()),
            "probs|shape",
        ),
        # set_memory_limit
        ("set_memory_limit -1", lambda: ih.set_memory_limit(-1), "limit"),
        ("set_memory_limit 0", lambda: ih.set_memory_limit(0), "limit"),
        ("set_memory_limit NaN", lambda: ih.set_memory_limit(nan), "limit"),
        ("set_memory_limit inf", lambda: ih.set_memory_limit(inf), "limit"),
        ("set_memory_limit True", lambda: ih.set_memory_limit(True), "limit"),
        ("set_memory_limit 'lots'", lambda: ih.set_memory_limit("lots"), "limit"),
        ("set_memory_limit '2 parsecs'", lambda: ih.set_memory_limit("2 parsecs"), "limit"),
        ("set_memory_limit '1e400GB'", lambda: ih.set_memory_limit("1e400GB"), "limit"),
        ("set_memory_limit '0.5B'", lambda: ih.set_memory_limit("0.5B"), "limit"),
        ("set_memory_limit a list", lambda: ih.set_memory_limit([2]), "limit"),
    ]


for name, call, error in bad_inputs():
    case(f"bad input: {name}", error=error)(lambda directory, call=call: call())


@case("bad input: IH_CIRCUITS_MEMORY_LIMIT=lots, then a sample", error="IH_CIRCUITS_MEMORY_LIMIT")
def _(directory: Path) -> None:
    os.environ["IH_CIRCUITS_MEMORY_LIMIT"] = "lots"
    ih.set_memory_limit(None)
    ih.NGramTask(3, (1,), 10).sample(2, seed=0)


@case("set_memory_limit('2GB') takes effect and returns the previous setting")
def _(directory: Path) -> None:
    previous = ih.set_memory_limit("2GB")
    assert ih.memory_limit() == 2 * 10**9, f"memory_limit() is {ih.memory_limit()} after set_memory_limit('2GB')"
    assert ih.set_memory_limit(previous) == 2 * 10**9, "set_memory_limit did not return the previous setting"


@case("train_preset seed 2**64: works or names seed", error="seed", must_fail=False)
def _(directory: Path) -> None:
    run = short_run(seed=2**64, steps=2)
    assert run.history["eval_loss"].notna().all(), "NaN losses"


@case("int8 tokens: model, model_averaging and Bayes give what int64 tokens give")
def _(directory: Path) -> None:
    tokens = tiny_tokens()
    small = tokens.to(torch.int8)
    model = tiny_model()
    assert torch.equal(model(small), model(tokens)), "the model's output differs on int8 tokens"
    a, b = ih.model_averaging(small, [(1,), (1, 2)]), ih.model_averaging(tokens, [(1,), (1, 2)])
    assert torch.equal(a.probs, b.probs) and torch.equal(a.posterior, b.posterior), "model_averaging differs on int8"
    assert torch.equal(ih.bayes_predictive(small, (1, 2)), ih.bayes_predictive(tokens, (1, 2))), "Bayes differs"


@case("selector_probe(model, data) works, as every probe takes (model, data)")
def _(directory: Path) -> None:
    shares = ih.probes.selector_probe(tiny_model(), tiny_task())
    assert isinstance(shares, dict) and shares, f"selector_probe returned {shares!r}"
    assert abs(sum(shares.values()) - 1.0) < 1e-5, f"selector shares sum to {sum(shares.values())}"


@case("selector_probe of an ordinary TransformerLens model", error="IHTransformer|selector")
def _(directory: Path) -> None:
    from ih_circuits.baselines import ordinary_transformer

    ih.probes.selector_probe(ordinary_transformer(tiny_task(), d_model=16, n_heads=2), tiny_task())


@case("find_parents of a 2-layer TransformerLens model at query_layer 5", error="query_layer")
def _(directory: Path) -> None:
    from ih_circuits.baselines import ordinary_transformer

    model = ordinary_transformer(tiny_task(), d_model=16, n_heads=2)
    ih.probes.find_parents(model, tiny_task(), n_sequences=16, query_layer=5)


@case("attention_view of one sequence is a self-contained circuitsvis view")
def _(directory: Path) -> None:
    view = ih.views.attention_view(tiny_model(), tiny_tokens()[0], 1, task=tiny_task())
    assert "CircuitsVis" in view.html and "*" in view.html, "the view has no circuitsvis bundle or no marked key"


# ---- data sources: bad tokens are refused, naming the source, before a model sees them ----
section("data sources")


@dataclass
class BadSource:
    """A user data source (``sample``, ``vocab_size``, ``seq_len``) whose samples are made by ``make(n, seed)``."""

    make: Callable[[int, int], object]
    vocab_size: int = 3
    seq_len: int = 20
    parents: tuple[int, ...] | None = None

    def sample(self, n: int, *, seed: int | None = None) -> object:
        return self.make(n, 0 if seed is None else seed)


def source_tokens(n: int, seed: int, seq_len: int = 20) -> torch.Tensor:
    return ih.NGramTask(3, (1, 2), seq_len).sample(n, seed=seed).tokens


SOURCE_ERROR = r"BadSource|source|\.sample"
for name, make in [
    ("tokens outside the vocabulary", lambda n, seed: source_tokens(n, seed) * 3),
    ("negative tokens", lambda n, seed: source_tokens(n, seed) - 1),
    ("1-D tokens", lambda n, seed: source_tokens(n, seed).flatten()),
    ("3-D tokens", lambda n, seed: source_tokens(n, seed)[:, None, :]),
    ("fewer positions than its seq_len", lambda n, seed: source_tokens(n, seed, seq_len=12)),
    ("float tokens", lambda n, seed: source_tokens(n, seed).float()),
    ("bool tokens", lambda n, seed: source_tokens(n, seed) > 0),
    ("a list of lists", lambda n, seed: source_tokens(n, seed).tolist()),
    ("fewer sequences than asked", lambda n, seed: source_tokens(max(1, n // 2), seed)),
]:
    case(f"data source returning {name}: find_parents", error=SOURCE_ERROR)(
        lambda directory, make=make: ih.probes.find_parents(tiny_model(), BadSource(make), n_sequences=16)
    )


@case("data source returning tokens outside the vocabulary: train_on_source", error=SOURCE_ERROR)
def _(directory: Path) -> None:
    from ih_circuits.baselines import train_on_source

    train_on_source(tiny_model(), BadSource(lambda n, seed: source_tokens(n, seed) * 3), steps=1, batch_size=8)


@case("data source with a good sample: find_parents works")
def _(directory: Path) -> None:
    report = ih.probes.find_parents(tiny_model(), BadSource(source_tokens), n_sequences=16)
    assert isinstance(report.lags, tuple), f"lags {report.lags!r}"


# ---- loads of hand-edited saves (checksums rewritten, as a careless script would) ----
section("loads")


def optimizer_with_wrong_adam_moment(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    moments = state["state"]["state"][0]
    moments["exp_avg"] = torch.zeros(moments["exp_avg"].numel() + 5)
    torch.save(state, path)


for name, file, edit, error in [
    ("task alpha -1 with a valid prior", "run.json", edit_json(lambda d: d["task"].update(alpha=-1)), "alpha"),
    ("config d_vocab 0", "model/config.json", edit_json(lambda d: d.update(d_vocab=0)), "d_vocab"),
    ("config n_ctx -101", "model/config.json", edit_json(lambda d: d.update(n_ctx=-101)), "n_ctx"),
    ("config a_init NaN", "model/config.json", edit_json(lambda d: d.update(a_init=float("nan"))), "a_init"),
    ("step beyond the planned steps", "run.json", edit_json(lambda d: d.update(step=10**6)), "step"),
    ("task seq_len 0", "run.json", edit_json(lambda d: d["task"].update(seq_len=0)), "seq_len"),
    ("stage lr NaN", "run.json", edit_json(lambda d: d["train_config"]["stages"][0].update(lr=float("nan"))), "lr"),
]:
    case(f"load: {name}", error=error)(lambda directory, file=file, edit=edit: edited_run(directory, file, edit))


@case("load: model manifest format 99", error="format")
def _(directory: Path) -> None:
    from ih_circuits.checkpoint import write_manifest

    save(short_run(), directory / "run")
    edit_json(lambda d: d.update(format=99))(directory / "run" / "model" / "manifest.json")
    write_manifest(directory / "run", "TrainingRun")  # the run's manifest agrees with the edited model manifest
    ih.TrainingRun.load(directory / "run")


@case("load: run manifest format 99", error="format")
def _(directory: Path) -> None:
    save(short_run(), directory / "run")
    edit_json(lambda d: d.update(format=99))(directory / "run" / "manifest.json")
    ih.TrainingRun.load(directory / "run")


@case("load: run manifest files []", error="manifest|files")
def _(directory: Path) -> None:
    save(short_run(), directory / "run")
    edit_json(lambda d: d.update(files=[]))(directory / "run" / "manifest.json")
    ih.TrainingRun.load(directory / "run")


@case("load: Adam moment of the wrong size, then resume", error="optimizer|exp_avg")
def _(directory: Path) -> None:
    run = short_run(steps=4, optimizer="adam", callback=stop_at(2))
    assert run.interrupted and run.step == 2, f"the run did not stop at step 2 (step {run.step})"
    save(run, directory / "run")
    optimizer_with_wrong_adam_moment(directory / "run" / "optimizer.pt")
    rewrite_manifests(directory / "run")
    ih.TrainingRun.load(directory / "run").resume(quiet=True)


@case("load: an interrupted Adam run resumes to the uninterrupted one")
def _(directory: Path) -> None:
    whole = short_run(steps=4, optimizer="adam")
    save(short_run(steps=4, optimizer="adam", callback=stop_at(2)), directory / "run")
    resumed = ih.TrainingRun.load(directory / "run").resume(quiet=True)
    assert same_run(resumed, whole), "the resumed run differs from the uninterrupted one"


# ---- memory and time: refused with the size and the argument to lower, never a hang or an allocation ----
section("memory and time")


@case("train batch_size 10**7", error=both("memory", "batch_size"), timeout=60)
def _(directory: Path) -> None:
    ih.train_preset("cwa", batch_size=10**7, steps=2, quiet=True)


@case("run_with_cache at n_ctx 4000, batch 64", error=both("memory", "batch|pos|seq|length|names_filter"), timeout=60)
def _(directory: Path) -> None:
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=4000))
    tokens = torch.randint(0, 3, (64, 4000), generator=torch.Generator().manual_seed(0))
    model.run_with_cache(tokens)


@case("sample seq_len 10**7 at batch 64", error=both("memory", "seq_len|batch_size"), timeout=30)
def _(directory: Path) -> None:
    ih.NGramTask(3, (1,), 10**7).sample(64, seed=0)


@case("theory exact at vocabulary 50", error="method|vocab", must_fail=False, timeout=60)
def _(directory: Path) -> None:
    scores = ih.theory.selection_scores(50, (1, 2), 0.1, method="exact")
    assert scores.best(2) == (1, 2), f"argmax {scores.best(2)}"


@case("sweep of 10**8 runs", error="max_runs", timeout=30)
def _(directory: Path) -> None:
    from ih_circuits.sweep import run_sweep

    grid = {"alpha": [0.01 + i * 1e-6 for i in range(10**4)], "lr": [0.1 + i * 1e-6 for i in range(10**4)]}
    run_sweep({"preset": "cwa", "seeds": [0], "steps": 2, "grid": grid}, directory / "sweep", quiet=True)


@case("cli train --parents 1,5 with the default window", error="window")
def _(directory: Path) -> None:
    cli(
        "train", "--preset", "cwa", "--parents", "1,5", "--steps", "2", "--batch-size", "64", "--quiet",
        "--out", str(directory / "run"),
    )  # fmt: skip


# ---- sweeps ----
section("sweeps")


@case("cli sweep whose every run fails exits 2", timeout=120)
def _(directory: Path) -> None:
    spec = directory / "spec.toml"
    spec.write_text('preset = "cwa"\nseeds = [0, 1]\nsteps = 2\n[fixed]\nlr = 1e300\nbatch_size = 32\n')
    out = directory / "sweep"
    code, stdout, stderr = run_cli("sweep", str(spec), "--out", str(out), "--quiet", "--workers", "1")
    assert code == 2, f"exit status {code} (stdout {stdout.strip()[-200:]!r}, stderr {stderr.strip()[-200:]!r})"


@case("cli report of a sweep: from its records, not a hand-edited results.csv", timeout=120)
def _(directory: Path) -> None:
    import pandas as pd

    out = finished_sweep(directory)
    table = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    table["verdict"] = "EDITED-BY-HAND"
    table.to_csv(out / "results.csv", index=False)
    cli("report", str(out))
    page = (out / "report.html").read_text()
    assert "EDITED-BY-HAND" not in page, "report.html shows a verdict typed into results.csv, not the run's record"


@case("cli report of a sweep with a garbage results.csv", error="results.csv", must_fail=False, timeout=120)
def _(directory: Path) -> None:
    out = finished_sweep(directory)
    (out / "results.csv").write_bytes(b'\x00\xff\xfe garbage,,\nno,header\n"unterminated\n')
    cli("report", str(out))
    assert (out / "report.html").is_file(), "exit status 0 but no report.html"


@case(
    "two sweeps with different specs into one directory at once",
    error="lock|another sweep|other sweep|different sweep|in use|running",
    timeout=180,
)
def _(directory: Path) -> None:
    """Both sweeps meet at the spec write (``store.atomic_write_text``, the race a lock must close; a sweep that is
    refused before it gets there leaves the other to go on after 5 s); exactly one may run."""
    from ih_circuits.sweep import run_sweep, store

    out, meeting = directory / "sweep", directory / "meeting"
    meeting.mkdir()
    original = store.atomic_write_text

    def meet(path: Path, text: str) -> Path:
        (meeting / str(os.getpid())).touch()
        deadline = time.monotonic() + 5
        while len(list(meeting.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return original(path, text)

    store.atomic_write_text = meet
    children = []
    for alpha in (0.1, 0.3):
        child = os.fork()
        if child == 0:
            outcome: list = ["ok", ""]
            try:
                run_sweep(tiny_spec(alpha=alpha), out, workers=1, quiet=True)
            except BaseException as error:  # noqa: BLE001 - reported to the parent
                outcome = ["clear" if isinstance(error, CLEAR) else "other", f"{type(error).__name__}: {error}"]
            (directory / f"outcome-{alpha}").write_text(json.dumps(outcome))
            os._exit(0)
        children.append(child)
    for child in children:
        os.waitpid(child, 0)
    outcomes = [json.loads((directory / f"outcome-{alpha}").read_text()) for alpha in (0.1, 0.3)]
    refused = [message for status, message in outcomes if status != "ok"]
    if not refused:
        spec = json.loads((out / "sweep.json").read_text())["fixed"]["alpha"]
        rows = (out / "results.csv").read_text().splitlines()
        raise AssertionError(f"both sweeps ran into one directory (sweep.json alpha {spec}; results.csv {rows[1:]})")
    assert len(refused) == 1, f"both sweeps failed: {refused}"
    status = next(status for status, _ in outcomes if status != "ok")
    raise (ValueError if status == "clear" else RuntimeError)(refused[0])


@case("a save leaves another writer's staging directory alone", timeout=120)
def _(directory: Path) -> None:
    """A second process saves B into the same directory and pauses inside its save (after its staging directory
    exists); this process saves A meanwhile; the other's staging directory must survive, and its save finish."""
    a, b = short_run(seed=0), short_run(seed=1)
    target, ready, go = directory / "run", directory / "ready", directory / "go"
    save(a, target)
    child = os.fork()
    if child == 0:
        original = b.model.save_pretrained

        def paused(path, **kwargs):
            ready.touch()
            deadline = time.monotonic() + 60
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return original(path, **kwargs)

        b.model.save_pretrained = paused
        try:
            save(b, target, overwrite=True)
        except BaseException:  # noqa: BLE001 - its exit status tells the parent
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    theirs = sorted(p.name for p in directory.iterdir() if p.name.startswith(".run."))
    try:
        save(a, target, overwrite=True)
    finally:
        gone = [name for name in theirs if not (directory / name).exists()]
        go.touch()
        _, status = os.waitpid(child, 0)
    assert not gone, f"a save removed {gone}, the staging directory of another writer's save in progress"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the other writer's save failed"
    loaded = ih.TrainingRun.load(target)
    assert same_run(loaded, a) or same_run(loaded, b), "the directory loads a mix of two saves"


# ---- the CLI, interrupts, links, full disks and extreme scales ----
section("CLI, interrupts, links, full disks, extreme scales")


@case("cli train: Ctrl-C during start-up exits 130 or 1 with one line")
def _(directory: Path) -> None:
    from ih_circuits import presets

    original = presets.preset_parts

    def ctrl_c_first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    presets.preset_parts = ctrl_c_first
    code, _, stderr = run_cli(
        "train", "--preset", "cwa", "--steps", "3", "--batch-size", "64", "--quiet", "--out", str(directory / "run")
    )
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, f"a traceback: {stderr[-300:]!r}"
    assert code in (1, 130) and len(lines) == 1, f"exit status {code}, stderr {stderr[-300:]!r}"


@case("save(overwrite=True) onto a symlink to a saved run", error="linked-run", must_fail=False)
def _(directory: Path) -> None:
    a, b = short_run(seed=0), short_run(seed=1)
    real, link = directory / "real", directory / "linked-run"
    save(a, real)
    link.symlink_to(real, target_is_directory=True)
    try:
        save(b, link, overwrite=True)
    finally:
        for path in (link, real):
            try:
                loaded = ih.TrainingRun.load(path)
            except Exception as error:  # noqa: BLE001 - any failure to load is a half-save here
                raise AssertionError(f"{path.name} no longer loads: {error}") from None
            assert same_run(loaded, a) or same_run(loaded, b), f"{path.name} loads a mix of two saves"
    assert same_run(ih.TrainingRun.load(link), b), "the save through the link did not land"


@case("save onto a full disk (writes fail with EFBIG)", error="full-disk-run")
def _(directory: Path) -> None:
    a, b = short_run(seed=0), short_run(seed=1)
    target = directory / "full-disk-run"
    save(a, target)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # files of a save beyond 1 KB cannot be written
    try:
        save(b, target, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        try:
            loaded = ih.TrainingRun.load(target)
        except Exception as error:  # noqa: BLE001 - the previous save must survive a failed one
            raise AssertionError(f"the previous save no longer loads: {error}") from None
        assert same_run(loaded, a) or same_run(loaded, b), "the directory loads a mix of two saves"
    raise AssertionError("a save whose writes failed with EFBIG reported success")


def same_loss_on_both_paths(a_init: float) -> None:
    """The loss of the fast path (``model(tokens, return_type="loss")``, query row and every row) equals the one
    read from the hooked path's log-probabilities (``run_with_cache``) within 1e-3 nats."""
    model = ih.IHTransformer(ih.IHConfig(d_vocab=3, n_ctx=101, a_init=a_init))
    tokens = ih.NGramTask(3, (1, 2), 101).sample(32, seed=0).tokens
    with torch.no_grad():
        fast_last = float(model(tokens, return_type="loss"))
        fast_all = float(model(tokens, return_type="loss", loss_positions="all"))
        log_probs, _ = model.run_with_cache(tokens)
    hooked_last = float(-log_probs[:, -2].gather(-1, tokens[:, -1:]).mean())
    hooked_all = float(-log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).mean())
    for what, fast, hooked in (("last", fast_last, hooked_last), ("all", fast_all, hooked_all)):
        assert math.isfinite(fast) and math.isfinite(hooked), f"loss ({what}): fast {fast}, hooked {hooked}"
        assert abs(fast - hooked) <= 1e-3, f"loss ({what}): fast path {fast:.6f}, hooked path {hooked:.6f}"


for a_init in (1e30, 1e12, 1e4, -1e4):
    case(f"a_init {a_init:g}: refused, or one loss on the fast and the hooked path", error="a_init", must_fail=False)(
        lambda directory, a_init=a_init: same_loss_on_both_paths(a_init)
    )


@case("train_preset a_init 1e30: refused, or finite", error="a_init", must_fail=False)
def _(directory: Path) -> None:
    run = short_run(steps=2, a_init=1e30)
    assert run.history["eval_loss"].map(math.isfinite).all(), f"eval losses {run.history['eval_loss'].tolist()}"


# ---- thread counts ----
section("thread counts")


@case("theory: the same I~ at 2 threads and 1 (vocabulary 20, window 5: the 400-state batched solve)")
def _(directory: Path) -> None:
    arguments = {"vocab_size": 20, "parents": (1, 2), "alpha": 0.1, "window": 5, "n_kernels": 40, "n_samples": 2000}
    torch.set_num_threads(2)
    two = ih.theory.modified_chi2_mi(**arguments)
    torch.set_num_threads(1)
    one = ih.theory.modified_chi2_mi(**arguments)
    worst = max(abs(two[s] - one[s]) for s in one)
    assert worst <= 1e-9 * max(abs(v) for v in one.values()), f"I~ differs by {worst:.3g} between 2 threads and 1"


@case("stationary_window_law: the same law at 2 threads and 1 (400 states, 64 kernels)")
def _(directory: Path) -> None:
    kernels = ih.DirichletPrior(0.1).sample_rows(64, 400, 20, torch.Generator().manual_seed(0), torch.float64)
    torch.set_num_threads(2)
    two = ih.theory.stationary_window_law(kernels, (1, 2), 20, 2)
    torch.set_num_threads(1)
    one = ih.theory.stationary_window_law(kernels, (1, 2), 20, 2)
    assert torch.isfinite(two).all() and torch.isfinite(one).all(), "non-finite stationary law"
    worst = float((two - one).abs().max())
    assert worst <= 1e-12, f"the law differs by {worst:.3g} between 2 threads and 1"


# ---- the runner ----


def run_in_child(test: Case) -> tuple[str, str]:
    """Fork, run the case under the address-space limit, and read back (outcome, detail)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.setsid()  # the kill cases' own children die with this one
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        quiet = os.open(os.devnull, os.O_WRONLY)  # progress bars and warnings of the case, not the battery's lines
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        with tempfile.TemporaryDirectory() as scratch:
            outcome = classify(test, Path(scratch))
        os.write(write, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], test.timeout)
    data = os.read(read, 1 << 16) if ready else b""
    if not ready:
        os.killpg(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    os.close(read)
    if data:
        return tuple(json.loads(data))
    if not ready:
        return "crash", f"timed out after {test.timeout:g} s"
    return "crash", f"killed by signal {os.WTERMSIG(status)} (out of memory?)" if os.WIFSIGNALED(status) else "died"


def _raised_here(error: BaseException) -> bool:
    """Whether an exception was raised by this script (a case's own check) rather than by the code it calls."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve() == Path(__file__).resolve()


def classify(test: Case, directory: Path) -> list[str]:
    try:
        test.run(directory)
    except AssertionError as error:
        if not _raised_here(error):  # an assert inside a library (torch's "not compiled with CUDA") is a crash
            return ["crash", f"AssertionError: {str(error).splitlines()[0][:200] if str(error) else ''}"]
        return ["silent wrong result", str(error)]
    except CLEAR as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if test.error is not None and re.search(test.error, str(error), re.IGNORECASE):
            return ["clear error", message[:200]]
        return ["unclear error", f"{type(error).__name__}: {message[:200]}"]
    except BaseException as error:  # noqa: BLE001 - every other failure is what the battery counts as a crash
        return ["crash", f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"]
    if test.must_fail:
        return ["silent wrong result", "accepted"]
    return ["right result", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--every", action="store_true", help="print a line for every case, with its detail")
    args = parser.parse_args()
    os.environ.setdefault("IH_CIRCUITS_MEMORY_LIMIT", "4GB")  # below ADDRESS_SPACE, so a guard can speak first
    torch.set_num_threads(1)
    for name in getattr(ih, "__all__", ()):  # load lazily imported modules once here, not in every forked case
        getattr(ih, name, None)
    with contextlib.suppress(ImportError):
        import ih_circuits.cli  # noqa: F401 - the CLI cases' import, done once
    print(f"ih_circuits from {Path(ih.__file__).parent}")
    totals: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = {}
    started = time.perf_counter()
    for test in CASES:
        if args.only not in test.name:
            continue
        outcome, detail = run_in_child(test)
        totals[outcome] += 1
        by_category.setdefault(test.category, Counter())[outcome] += 1
        if args.every or outcome not in ("right result", "clear error"):
            print(f"{outcome:>20}: {test.name}: {detail}", flush=True)
    for category, counts in by_category.items():
        print(f"{category:>52}: {sum(counts.values()):3d} cases, " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES))
    print(
        f"{sum(totals.values())} cases in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{totals[o]} {o}" for o in OUTCOMES)
    )


if __name__ == "__main__":
    sys.exit(main())
