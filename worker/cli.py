"""The ``coc-worker`` command line (placeholder until the worker lands)."""

from __future__ import annotations

import argparse
import sys

from schemas.export import write_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coc-worker")
    sub = parser.add_subparsers(dest="command", required=True)
    schema = sub.add_parser("schema", help="write the JSON Schemas")
    schema.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "schema":
        for path in write_all():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
