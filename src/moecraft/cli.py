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


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the one line ``moecraft <command>: error: ...`` (exit 2) that every
    other bad input gets, instead of the usage text followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    """Error messages stay one line even when they quote a value with line breaks in it."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def build_parser() -> argparse.ArgumentParser:
    from moecraft import __version__

    parser = _Parser(
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
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, so the line starts with `moecraft <command>: error:`
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
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
        print(f"moecraft {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)  # 130/143 for a training stopped by SIGINT/SIGTERM


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
