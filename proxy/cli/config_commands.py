"""``pullgate config``: check a config file the way ``serve`` would load it, and show the
effective configuration (file + ``PULLGATE_*`` environment overrides + embedded defaults).

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

from proxy.cli.preflight import preflight
from proxy.config.settings import load_config
from proxy.errors import ConfigError

DESCRIPTION = """\
Check a config file the way 'pullgate serve' loads it, and show the effective configuration
(file + PULLGATE_* environment overrides + embedded defaults).

The dump holds no secret: upstream passwords and token keys live in environment variables
that the config only names (password_env, token_secret_env), and client passwords live
hashed in the htpasswd file the config points at.
"""

CHECK_DESCRIPTION = """\
Load FILE exactly as 'pullgate serve' does and run the same start-up checks: every key and
value, PULLGATE_* environment overrides (a misspelled one is an error), the files the config
names (tls_cert/tls_key, admission TLS, access.htpasswd and access.tokens, the policies) exist
and load, and the variables it names as secrets (password_env, token_secret_env) are set.
Prints every problem as 'KEY: what is wrong' and exits 2, or prints 'ok: FILE' and exits 0.
"""

EXAMPLES = """\
examples:
  pullgate config check /etc/pullgate/config.yaml
  pullgate config check --no-env config.yaml     # for another machine: ignore this environment
  pullgate config show --config /etc/pullgate/config.yaml       # YAML, durations in seconds
  PULLGATE_CACHE__TAG_TTL=10m pullgate config show --json
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "config",
        help="check a config file, show the effective configuration",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = parser.add_subparsers(title="tools", dest="tool", metavar="TOOL", required=True)
    check = tools.add_parser(
        "check",
        help="run serve's start-up checks on a config file; exit 2 naming each bad key",
        description=CHECK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the YAML config file to check")
    check.add_argument(
        "--no-env",
        action="store_true",
        help="ignore this machine's environment: no PULLGATE_* overrides, secret variables not checked",
    )
    check.set_defaults(func=_check)
    show = tools.add_parser("show", help="print the effective configuration (no secrets)")
    show.add_argument("--config", type=Path, default=os.environ.get("PULLGATE_CONFIG") or None, help="YAML config file")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=_show)


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, use_environment=not args.no_env)
    except ConfigError as exc:
        print(f"pullgate config: {exc.message}", file=sys.stderr)
        return 2
    problems = preflight(config, environment=not args.no_env)
    for problem in problems:
        print(f"pullgate config: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"ok: {args.file}" + (" (environment not checked)" if args.no_env else ""))
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
