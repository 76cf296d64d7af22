"""The ``ih-circuits`` command line: ``train``, ``probe``, ``report``, ``theory``, ``sweep`` and ``demo``.

Every command prints plain text. Exit status: 0 done; 1 interrupted (Ctrl-C; an interrupted ``train`` saves the
run so far, and ``train --resume DIR`` continues it); 2 failed, with one line on stderr and no traceback (a bad
argument, an occupied or unwritable output, a damaged checkpoint, a diverged training run, a memory budget).
Output paths are checked before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NoReturn


def _lags(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2; got {text!r}") from error


def _theory(args: argparse.Namespace) -> None:
    from ih_circuits.checks import check_int
    from ih_circuits.theory import selection_scores

    check_int(args.max_degree, "--max-degree", 0)
    scores = selection_scores(
        args.vocab_size,
        args.parents,
        args.alpha,
        n_kernels=args.n_kernels,
        seed=args.seed,
        window=args.window,
        method=args.method,
        n_samples=args.n_samples,
    )
    how = "exact enumeration" if scores.method == "exact" else f"Monte Carlo, {scores.n_samples} windows per kernel"
    print(
        f"modified chi-square MI, d={args.vocab_size}, parents={args.parents}, alpha={args.alpha}, "
        f"{scores.n_kernels} kernels, {how}"
    )
    print(f"{'subset':<14}{'I~(S)':>11}{'stderr':>11}{'chi2 MI':>11}")
    for subset, value in sorted(scores.modified.items(), key=lambda kv: -kv[1]):
        print(f"{str(subset):<14}{value:>11.4g}{scores.modified_stderr[subset]:>11.2g}{scores.chi2[subset]:>11.4g}")
    print(f"predicted parent set (|S| <= {args.max_degree}): {scores.best(args.max_degree)}")


def _train(args: argparse.Namespace) -> int:
    from ih_circuits.checkpoint import check_target
    from ih_circuits.presets import train_preset
    from ih_circuits.training import TrainingDiverged, TrainingRun

    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "lr": args.lr,
            "parents": args.parents,
            "window": args.window,
            "alpha": args.alpha,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }
    if args.resume is not None:
        given = [
            f"--{name.replace('_', '-')}" for name in (*overrides, "preset", "out", "overwrite") if getattr(args, name)
        ]
        if given:
            raise ValueError(f"--resume continues a saved run as it was planned; drop {', '.join(given)}")
        out, saved = Path(args.resume), TrainingRun.load(args.resume)
        if saved.finished:
            print(f"{out} has finished all {saved.step} steps; nothing to resume")
            return 0
        print(f"resuming {out} at step {saved.step}/{saved.config.total_steps}")
        go_on = partial(saved.resume, quiet=args.quiet)
    elif args.preset is None:
        raise ValueError("train needs --preset NAME (or --resume DIR)")
    else:
        out = check_target(args.out or f"runs/{args.preset}-seed{args.seed}", overwrite=args.overwrite)
        go_on = partial(train_preset, args.preset, seed=args.seed, quiet=args.quiet, **overrides)
    try:
        run = go_on()
    except TrainingDiverged as error:
        error.run.save(out, overwrite=True)
        raise ValueError(f"{error} (saved to {out})") from None
    run.save(out, overwrite=True)  # out was checked (or is the run being resumed)
    print(run)
    if run.interrupted:
        print(f"interrupted at step {run.step}; saved to {out}; continue with: ih-circuits train --resume {out}")
        return 1
    print(f"saved run (checkpoint, trajectory) to {out}")
    return 0


def _probe(args: argparse.Namespace) -> None:
    from ih_circuits.probes import decomposition_test
    from ih_circuits.reporting import load_run

    run = load_run(args.checkpoint)
    decomposition = decomposition_test(run.model, run.task, n_sequences=args.n_sequences, seed=args.seed)
    print(decomposition.parents)
    print(decomposition)


def _report(args: argparse.Namespace) -> None:
    from ih_circuits.checkpoint import check_output_file
    from ih_circuits.sweep.store import is_sweep_directory

    if is_sweep_directory(args.checkpoint):
        from ih_circuits.sweep import sweep_report

        print(f"wrote {sweep_report(args.checkpoint, args.output)}")
        return
    from ih_circuits.reporting import report

    output = args.output or "report.html"
    check_output_file(output)
    print(f"wrote {report(args.checkpoint, output, seed=args.seed)}")


def _sweep(args: argparse.Namespace) -> int:
    """Exit status 0 when every run finished, 1 when some failed, 2 when all did."""
    from ih_circuits.sweep import agreement_rate, run_sweep

    results = run_sweep(
        args.spec,
        args.out,
        backend=args.backend,
        workers=args.workers,
        address=args.address,
        overwrite=args.overwrite,
        quiet=args.quiet,
        **({} if args.max_runs is None else {"max_runs": args.max_runs}),
    )
    failed = int((results["status"] != "ok").sum())
    summary = f"{len(results)} runs in {args.out}/results.csv: {len(results) - failed} finished, {failed} failed"
    if failed < len(results):
        summary += f"; selected = predicted in {agreement_rate(results):.0%} of the finished runs"
    print(summary)
    if not failed:
        return 0
    print(
        f"failed runs are run again by the same command; see the error column of {args.out}/results.csv",
        file=sys.stderr,
    )
    return 2 if failed == len(results) else 1


def _demo(args: argparse.Namespace) -> None:
    from ih_circuits.checkpoint import check_output_file, check_target
    from ih_circuits.presets import train_preset
    from ih_circuits.probes import decomposition_test
    from ih_circuits.reporting import report

    out = Path(args.out)
    check_target(out / "run", overwrite=True)
    check_output_file(out / "report.html")
    print("training the CWa preset (d=3, T=100, H=3, parents {1,2}, alpha=0.1, D=2) ...")
    run = train_preset("cwa", seed=args.seed, quiet=args.quiet)
    run.save(out / "run", overwrite=True)  # the demo regenerates its own output directory on every run
    print(run)
    decomposition = decomposition_test(run.model, run.task, seed=args.seed)
    print(decomposition.parents)
    print(decomposition)
    path = report(run, out / "report.html", seed=args.seed)
    print(f"report: {path.resolve()}")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (exit status 2) instead of usage text plus the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ih-circuits",
        description="Generalized induction heads, run and probed.",
        epilog="Exit status: 0 done, 1 interrupted (train saves the run; --resume continues it), 2 failed.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    theory = commands.add_parser("theory", help="print I~(S) for every candidate lag set")
    theory.add_argument("--vocab-size", type=int, default=3)
    theory.add_argument("--parents", type=_lags, default=(1, 2), help="comma-separated lags, e.g. 1,2")
    theory.add_argument("--alpha", type=float, default=0.1)
    theory.add_argument("--window", type=int, default=None)
    theory.add_argument("--max-degree", type=int, default=2)
    theory.add_argument(
        "--n-kernels", type=int, default=None, help="kernels drawn (default 2000 exact, 500 Monte Carlo)"
    )
    theory.add_argument("--method", choices=("auto", "exact", "monte_carlo"), default="auto")
    theory.add_argument("--n-samples", type=int, default=None, help="Monte Carlo windows per kernel (default 20000)")
    theory.add_argument("--seed", type=int, default=0)
    theory.set_defaults(run=_theory)
    train = commands.add_parser("train", help="train a preset and save the run")
    train.add_argument("--preset", default=None, help="cwa, c_w_a, c_w_a_d3, cw_a or full")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=None, help="total steps (stages rescaled)")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--parents", type=_lags, default=None)
    train.add_argument("--window", type=int, default=None, help="lags each copier head can read (default 3)")
    train.add_argument("--alpha", type=float, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--out", default=None, help="directory for the run (default runs/PRESET-seedSEED)")
    train.add_argument("--overwrite", action="store_true", help="replace a save already in --out")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run saved in DIR")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)
    probe = commands.add_parser("probe", help="find the parents and test the decomposition of a saved run")
    probe.add_argument("checkpoint", help="a directory written by train (or TrainingRun.save)")
    probe.add_argument("--n-sequences", type=int, default=512)
    probe.add_argument("--seed", type=int, default=0)
    probe.set_defaults(run=_probe)
    rep = commands.add_parser("report", help="write the self-contained HTML report of a saved run or a sweep")
    rep.add_argument("checkpoint", help="a saved run, or a sweep directory (written by sweep)")
    rep.add_argument("-o", "--output", default=None, help="default report.html; DIR/report.html for a sweep")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(run=_report)
    sweep = commands.add_parser("sweep", help="train and probe every run of a grid spec (TOML), theory vs practice")
    sweep.add_argument("spec", help="a TOML spec: preset, seeds, steps, [grid], [fixed], [probe]")
    sweep.add_argument("--out", required=True, help="the sweep directory (re-running skips finished runs)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local")
    sweep.add_argument("--workers", type=int, default=None, help="parallel runs (default: the cores available)")
    sweep.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001)")
    sweep.add_argument("--overwrite", action="store_true", help="replace a sweep already in --out")
    sweep.add_argument("--quiet", action="store_true", help="no estimate and no progress bar")
    sweep.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="refuse a spec of more runs, cells x seeds (default 10000, ih_circuits.sweep.spec.DEFAULT_MAX_RUNS)",
    )
    sweep.set_defaults(run=_sweep)
    demo = commands.add_parser("demo", help="train the CWa preset, probe it, write the report")
    demo.add_argument("--out", default="out/demo", help="directory for the run and report.html (rewritten each time)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status (0 done, 1 interrupted, 2 failed with one line on stderr; a sweep:
    1 when some of its runs failed, 2 when all did)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        print(f"ih-circuits {args.command}: interrupted", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"ih-circuits {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a failure we did not foresee: still one line, named by its type
        print(f"ih-circuits {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main())
