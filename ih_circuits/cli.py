"""The ``ih-circuits`` command line: ``theory`` and ``demo`` (see ``ih-circuits --help``).

Every command prints plain text; a bad argument is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ih_circuits.predictors import last_position_nll, unigram_predictive
from ih_circuits.task import NGramTask
from ih_circuits.theory import selection_scores


def _lags(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
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


def _demo(args: argparse.Namespace) -> None:
    task = NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1, window=3)
    batch = task.sample(args.batch, seed=args.seed)
    bayes = last_position_nll(task.bayes_predictive(batch.tokens), batch.tokens)
    unigram = last_position_nll(unigram_predictive(batch.tokens, task.alpha, d_vocab=3), batch.tokens)
    oracle = last_position_nll(task.oracle_predictive(batch), batch.tokens)
    predicted = selection_scores(3, task.parents, task.alpha, n_kernels=2000, seed=args.seed, window=3).best(2)
    print(f"task: d=3, parents={task.parents}, T=100 context tokens, alpha={task.alpha}, {args.batch} sequences")
    print(f"theory's predicted parent set (argmax I~, |S| <= 2): {predicted}")
    print(
        f"last-position loss, nats: oracle {oracle.mean():.4f}  Bayes {bayes.mean():.4f}  "
        f"in-context unigram {unigram.mean():.4f}"
    )


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
    demo = commands.add_parser("demo", help="sample the paper's task and print the theory and the baselines")
    demo.add_argument("--batch", type=int, default=4096)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"ih-circuits {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
