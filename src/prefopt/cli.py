"""The ``prefopt`` command line: ``prefopt demo`` (the tour) and ``prefopt diagnose`` (entanglement tables)."""

from __future__ import annotations

import argparse
import sys


def _version() -> str:
    from prefopt import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short offline tour on SmolLM2-135M-Instruct and built-in pairs")
    demo.add_argument("--out", default="prefopt-out", help="output folder for figures (default: prefopt-out)")
    demo.add_argument("--steps", type=int, default=16, help="training steps per loss (default: 16)")
    demo.add_argument(
        "--losses", default=None, help="comma-separated pairwise losses (default: dpo,pairwise_normalized)"
    )
    demo.add_argument("--jbond-steps", type=int, default=8, help="J-BOND steps (default: 8; 0 skips)")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random model (no download, for tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the cores not already busy)"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from prefopt.diagnostics.cli import add_diagnose_parser

    add_diagnose_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from prefopt.demo import run_demo

        losses = [s.strip() for s in args.losses.split(",") if s.strip()] if args.losses else None
        try:
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
        except (ValueError, FileNotFoundError) as exc:
            print(f"prefopt demo: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "diagnose":
        from prefopt.diagnostics.cli import run_diagnose

        return run_diagnose(args)
    return 1  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
