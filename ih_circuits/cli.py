"""The ``ih-circuits`` command line: ``train``, ``probe``, ``report``, ``theory`` and ``demo``.

Every command prints plain text; a bad argument is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ih_circuits.checkpoint import check_target
from ih_circuits.theory import selection_scores


def _lags(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except (ValueError, FileNotFoundError) as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2; got {text!r}") from error


def _theory(args: argparse.Namespace) -> None:
    scores = selection_scores(
        args.vocab_size,
        args.parents,
        args.alpha,
        n_kernels=args.n_kernels,
        seed=args.seed,
        window=args.window,
    )
    print(
        f"modified chi-square MI, d={args.vocab_size}, parents={args.parents}, alpha={args.alpha}, "
        f"{scores.n_kernels} kernels"
    )
    print(f"{'subset':<14}{'I~(S)':>10}{'stderr':>10}{'chi2 MI':>10}")
    for subset, value in sorted(scores.modified.items(), key=lambda kv: -kv[1]):
        print(f"{str(subset):<14}{value:>10.4f}{scores.modified_stderr[subset]:>10.4f}{scores.chi2[subset]:>10.4f}")
    print(f"predicted parent set (|S| <= {args.max_degree}): {scores.best(args.max_degree)}")


def _train(args: argparse.Namespace) -> None:
    from ih_circuits.training import train_preset

    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "lr": args.lr,
            "parents": args.parents,
            "alpha": args.alpha,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }
    out = check_target(args.out or f"runs/{args.preset}-seed{args.seed}", overwrite=args.overwrite)
    run = train_preset(args.preset, seed=args.seed, quiet=args.quiet, **overrides)
    run.save(out, overwrite=args.overwrite)
    print(run)
    print(f"saved run (checkpoint, trajectory) to {out}")


def _probe(args: argparse.Namespace) -> None:
    from ih_circuits.probes import decomposition_test
    from ih_circuits.reporting import load_run

    run = load_run(args.checkpoint)
    decomposition = decomposition_test(run.model, run.task, n_sequences=args.n_sequences, seed=args.seed)
    print(decomposition.parents)
    print(decomposition)


def _report(args: argparse.Namespace) -> None:
    from ih_circuits.reporting import report

    print(f"wrote {report(args.checkpoint, args.output, seed=args.seed)}")


def _demo(args: argparse.Namespace) -> None:
    from ih_circuits.probes import decomposition_test
    from ih_circuits.reporting import report
    from ih_circuits.training import train_preset

    out = Path(args.out)
    check_target(out / "run", overwrite=True)
    print("training the CWa preset (d=3, T=100, H=3, parents {1,2}, alpha=0.1, D=2) ...")
    run = train_preset("cwa", seed=args.seed, quiet=args.quiet)
    run.save(out / "run", overwrite=True)  # the demo regenerates its own output directory on every run
    print(run)
    decomposition = decomposition_test(run.model, run.task, seed=args.seed)
    print(decomposition.parents)
    print(decomposition)
    path = report(run, out / "report.html", seed=args.seed)
    print(f"report: {path.resolve()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ih-circuits", description="Generalized induction heads, run and probed.")
    commands = parser.add_subparsers(dest="command", required=True)
    theory = commands.add_parser("theory", help="print I~(S) for every candidate lag set")
    theory.add_argument("--vocab-size", type=int, default=3)
    theory.add_argument("--parents", type=_lags, default=(1, 2), help="comma-separated lags, e.g. 1,2")
    theory.add_argument("--alpha", type=float, default=0.1)
    theory.add_argument("--window", type=int, default=None)
    theory.add_argument("--max-degree", type=int, default=2)
    theory.add_argument("--n-kernels", type=int, default=2000)
    theory.add_argument("--seed", type=int, default=0)
    theory.set_defaults(run=_theory)
    train = commands.add_parser("train", help="train a preset and save the run")
    train.add_argument("--preset", required=True, help="cwa, c_w_a, c_w_a_d3, cw_a or full")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=None, help="total steps (stages rescaled)")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--parents", type=_lags, default=None)
    train.add_argument("--alpha", type=float, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--out", default=None, help="directory for the run (default runs/PRESET-seedSEED)")
    train.add_argument("--overwrite", action="store_true", help="replace a save already in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)
    probe = commands.add_parser("probe", help="find the parents and test the decomposition of a saved run")
    probe.add_argument("checkpoint", help="a directory written by train (or TrainingRun.save)")
    probe.add_argument("--n-sequences", type=int, default=512)
    probe.add_argument("--seed", type=int, default=0)
    probe.set_defaults(run=_probe)
    rep = commands.add_parser("report", help="write the self-contained HTML report of a saved run")
    rep.add_argument("checkpoint")
    rep.add_argument("-o", "--output", default="report.html")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(run=_report)
    demo = commands.add_parser("demo", help="train the CWa preset, probe it, write the report")
    demo.add_argument("--out", default="out/demo", help="directory for the run and report.html (rewritten each time)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ih-circuits {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
