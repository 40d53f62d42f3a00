"""``lmcache`` command line: ``lmcache check-config`` shows the effective config and sources."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmcache.config import KEYS, KEYS_BY_NAME, ConfigError, LMCacheEngineConfig


def check_config() -> int:
    """Print every key's effective value and where it came from; exit 1 on a bad config."""
    try:
        config = LMCacheEngineConfig.load()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = [
        (key, "-" if value is None else str(value), str(source))
        for key, value, source in config.effective()
    ]
    width_key = max(len(r[0]) for r in rows)
    width_value = max(len(r[1]) for r in rows)
    for key, value, source in rows:
        print(f"{key:<{width_key}}  {value:<{width_value}}  {source}")
    return 0


def config_reference() -> str:
    """The configuration table of the README (kept in sync by a test)."""
    lines = ["| key | env var | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in KEYS:
        default = spec.default
        shown = (
            "-"
            if default is None
            else str(default).lower()
            if isinstance(default, bool)
            else default
        )
        lines.append(f"| `{spec.name}` | `{spec.env}` | `{shown}` | {spec.doc} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check-config",
        help="print the effective config (defaults < LMCACHE_CONFIG_FILE < LMCACHE_* env)",
        description="Keys: " + ", ".join(KEYS_BY_NAME),
    )
    commands.add_parser("config-reference", help="print the config keys as a Markdown table")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config()
    if args.command == "config-reference":
        print(config_reference())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
