"""A battery of bad inputs, extreme values, damaged files and kills, run against the installed ``ih_circuits``.

Each case runs in a forked child under an address-space limit and a timeout, and ends as one of:

- right result: it ran and its checks held;
- clear error: a ``ValueError`` (or ``KeyError``, ``FloatingPointError``, ``FileNotFoundError``,
  ``NotImplementedError``) whose message names what is wrong; for the CLI, exit status 2 (or 1 for an
  interrupted run) with one line on stderr;
- unclear error: one of those types, but the message does not say what the case expects it to say;
- silent wrong result: it accepted bad input, or returned a wrong, mixed or non-finite result;
- crash: any other exception (a traceback for the user), killed (out of memory) or timed out.

Run ``python benchmarks/battery.py`` (``make battery``); ``--only WORD`` runs the cases whose name contains
WORD. It prints one line per case that is not a right result or a clear error, then the totals. The
cases only use API that every version of the package since the first release has, so the same script
measures an older checkout (put it first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import select
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import ih_circuits as ih

ADDRESS_SPACE = 10 * 2**30  # per case: torch reserves about 2 GiB of address space before allocating
TIMEOUT_S = 300
CLEAR = (ValueError, KeyError, FloatingPointError, FileNotFoundError, NotImplementedError)
OUTCOMES = ("right result", "clear error", "unclear error", "silent wrong result", "crash")


@dataclass(frozen=True)
class Case:
    """``error``: what a clear error must say (a regex); ``must_fail``: whether finishing without one is wrong."""

    name: str
    run: Callable[[Path], None]
    error: str | None
    must_fail: bool


CASES: list[Case] = []


def case(
    name: str, error: str | None = None, must_fail: bool | None = None
) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register a case; by default one with an ``error`` must fail with it, one without must succeed."""

    def register(function: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES.append(Case(name, function, error, error is not None if must_fail is None else must_fail))
        return function

    return register


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


def kill_during_save(directory: Path, seed: int) -> None:
    """Save A; a child saves B over it (again and again) and is SIGKILLed at a random moment; the directory
    must load to exactly A or B, or refuse clearly."""
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


# ---- the runner ----


def run_in_child(test: Case) -> tuple[str, str]:
    """Fork, run the case under the address-space limit, and read back (outcome, detail)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.setsid()  # the kill cases' own children die with this one
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        with tempfile.TemporaryDirectory() as scratch:
            outcome = classify(test, Path(scratch))
        os.write(write, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], TIMEOUT_S)
    data = os.read(read, 1 << 16) if ready else b""
    if not ready:
        os.killpg(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    os.close(read)
    if data:
        return tuple(json.loads(data))
    if not ready:
        return "crash", f"timed out after {TIMEOUT_S} s"
    return "crash", f"killed by signal {os.WTERMSIG(status)} (out of memory?)" if os.WIFSIGNALED(status) else "died"


def classify(test: Case, directory: Path) -> list[str]:
    try:
        test.run(directory)
    except AssertionError as error:
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
    args = parser.parse_args()
    os.environ.setdefault("IH_CIRCUITS_MEMORY_LIMIT", "4GB")  # below ADDRESS_SPACE, so a guard can speak first
    torch.set_num_threads(1)
    print(f"ih_circuits from {Path(ih.__file__).parent}")
    totals: Counter[str] = Counter()
    started = time.perf_counter()
    for test in CASES:
        if args.only not in test.name:
            continue
        outcome, detail = run_in_child(test)
        totals[outcome] += 1
        if outcome not in ("right result", "clear error"):
            print(f"{outcome:>20}: {test.name}: {detail}", flush=True)
    print(
        f"{sum(totals.values())} cases in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{totals[o]} {o}" for o in OUTCOMES)
    )


if __name__ == "__main__":
    sys.exit(main())
