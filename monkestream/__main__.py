"""``python -m monkestream``: read the configuration and run the server (or ``bench``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:
        from .bench.cli import main as bench_main
        return bench_main(args[1:])
    from .config import load
    from .errors import ConfigError
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"monkestream: {exc}", file=sys.stderr)
        return 2
    from .app import run
    try:
        run(config)
    except ConfigError as exc:  # a log file that cannot be opened
        print(f"monkestream: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
