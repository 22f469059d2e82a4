"""Command line: ``pullgate serve`` and the operator tools.

Each tool module exposes ``register(subparsers)`` that adds its sub-command and sets
``func`` (taking the parsed namespace, returning an exit code); this module only wires them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import import_module

import structlog

from proxy import __version__
from proxy.config.settings import LogConfig
from proxy.ops.logs import configure_logging

# Modules that contribute sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "proxy.cli.serve_command",
    "proxy.cli.config_commands",
    "proxy.cli.policy_commands",
    "proxy.cli.verify_command",
    "proxy.cli.cache_commands",
)

Handler = Callable[[argparse.Namespace], int]


@contextlib.contextmanager
def logs_to_stderr() -> Iterator[None]:
    """Warnings of the mirror a tool opens go to stderr while it runs (stdout is the tool's
    report); the previous logging setup comes back afterwards (a command may run in-process)."""
    saved = structlog.get_config()
    configure_logging(LogConfig(level="warning", format="console"))
    try:
        yield
    finally:
        structlog.configure(**saved)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pullgate",
        description=(
            "Pull-through caching mirror for OCI/Docker registries and Kubernetes image-policy admission webhook."
        ),
        epilog="Run 'pullgate COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"pullgate {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)
