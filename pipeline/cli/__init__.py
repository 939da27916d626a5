"""The `sparsegen` console script.

Each module in this package is one group of subcommands and defines ``register(subparsers)``; the module
adds its parsers and sets ``func`` on each, a callable taking the parsed ``argparse.Namespace`` and returning
an exit code. Modules import heavy libraries (torch, ray, mlflow) inside ``func`` only, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsegen",
        description="Train and evaluate sparse AND-OR generator networks (Xing et al., CVPR 2020) on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.register(subparsers)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command: errors the user can act on are one line, --debug adds the traceback."""
    if not any("--debug" in action.option_strings for action in parser._actions):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="on an error, also print its traceback (or set SPARSEGEN_DEBUG=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):
                _add_debug_flag(subparser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before any tensor exists: keep freed host memory in the process (see pipeline/host_memory.py).
    from pipeline.host_memory import configure_host_allocator

    configure_host_allocator()
    from pipeline.config import ConfigError
    from pipeline.data.errors import DataError
    from pipeline.preflight import PreflightError, report

    try:
        return int(args.func(args) or 0)
    except (PreflightError, DataError, ConfigError) as exc:  # the user's input: one line naming the fix
        return report(f"sparsegen {args.command}", exc, args)


if __name__ == "__main__":
    sys.exit(main())
