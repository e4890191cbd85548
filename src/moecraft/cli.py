"""``moecraft`` command line: one sub-command per module in :mod:`moecraft.commands`.

A command module defines ``CONFIG`` (a config dataclass, see :mod:`moecraft.config`) and
``run(cfg) -> int | None``; its docstring is the help text. Adding a command is adding a module.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from moecraft import commands
from moecraft.compat import check_supported_versions
from moecraft.config import ConfigError, add_arguments, dump_yaml, resolve
from moecraft.errors import MoecraftError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield info.name.replace("_", "-"), importlib.import_module(f"moecraft.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    from moecraft import __version__

    parser = argparse.ArgumentParser(
        prog="moecraft",
        description="Expert-level fine-tuning of Mixture-of-Experts LLMs (ESFT) and dense-to-MoE crafting (PESC).",
    )
    parser.add_argument("--version", action="version", version=f"moecraft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _command_modules():
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(
            name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add_arguments(p, module.CONFIG)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 1
    module = args._module
    try:
        if args.command != "env":  # env reports the versions, whatever they are
            check_supported_versions()
        cfg = resolve(module.CONFIG, args)
        if args._print_config:
            print(dump_yaml(cfg), end="")
            return 0
        return int(module.run(cfg) or 0)
    except (MoecraftError, ConfigError) as exc:
        print(f"moecraft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
