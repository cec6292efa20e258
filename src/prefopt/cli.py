"""Command-line entry point (placeholder while the foundation lands)."""


def main(argv: list[str] | None = None) -> int:
    print("prefopt")
    return 0
