"""``pullgate config``: check a config file and show the effective configuration (file +
``PULLGATE_*`` environment overrides + embedded defaults), the way ``serve`` would load it.

The dump holds no secret: upstream passwords and token keys live in environment variables
that the config only names (``password_env``, ``token_secret_env``), and client passwords
live hashed in the htpasswd file the config points at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from proxy.config.settings import load_config
from proxy.errors import ConfigError

EXAMPLES = """\
examples:
  pullgate config check /etc/pullgate/config.yaml
  pullgate config show --config /etc/pullgate/config.yaml       # YAML, durations in seconds
  PULLGATE_CACHE__TAG_TTL=10m pullgate config show --json
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "config",
        help="check a config file, show the effective configuration",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = parser.add_subparsers(title="tools", dest="tool", metavar="TOOL", required=True)
    check = tools.add_parser("check", help="load a config file; exit 2 naming the bad key")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_check)
    show = tools.add_parser("show", help="print the effective configuration (no secrets)")
    show.add_argument("--config", type=Path, default=os.environ.get("PULLGATE_CONFIG"), help="YAML config file")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=_show)


def _check(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        print(f"pullgate config: {exc.message}", file=sys.stderr)
        return 2
    print(f"ok: {args.file}")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"pullgate config: {exc.message}", file=sys.stderr)
        return 2
    dump = config.redacted()
    print(json.dumps(dump, indent=2) if args.json else yaml.safe_dump(dump, sort_keys=False), end="")
    return 0
