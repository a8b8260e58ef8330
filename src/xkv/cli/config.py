"""``xkv config``: print the default config, or check a config file and print or write it."""

from __future__ import annotations

import argparse
import json

from xkv.cli.common import check_output_file, load_config


def add_config_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``config`` and its arguments to the sub-commands; return its parser."""
    config = commands.add_parser(
        "config",
        help="print the default config, or validate a config file",
        description="Print the default XKVConfig as JSON, or load FILE (YAML/JSON), validate it and print it.",
    )
    config.add_argument("file", nargs="?", help="config file to check")
    config.add_argument("--write", metavar="PATH", help="write the config to PATH (.yaml/.yml/.json)")
    return config


def cmd_config(args: argparse.Namespace) -> int:
    """Print the default config, or check and print a config file."""
    config = load_config(args.file)
    if args.write:
        check_output_file(args.write, "--write")
        config.save(args.write)
        print(f"wrote {args.write}")
    else:
        print(json.dumps(config.to_dict(), indent=2))
    return 0
