"""The ``xkv`` command line: the only package that prints or draws.

One module per command or group of commands, each holding its argument table (``add_*_parser``) and the function
that runs it (``cmd_*``): ``demo``; ``documents`` (``compress``, ``ask``); ``evaluate`` (``eval``, ``report``);
``tune``; ``bench``; ``analyze``; ``config``. ``common`` holds the checks made before any model loads and the shared
options. This module builds the parser and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from xkv.cli.analyze import add_analyze_parser, cmd_analyze
from xkv.cli.bench import add_bench_parser, cmd_bench
from xkv.cli.config import add_config_parser, cmd_config
from xkv.cli.demo import add_demo_parser, cmd_demo
from xkv.cli.documents import add_ask_parser, add_compress_parser, cmd_ask, cmd_compress
from xkv.cli.evaluate import add_eval_parser, add_report_parser, cmd_eval, cmd_report
from xkv.cli.tune import add_tune_parser, cmd_tune

__all__ = [
    "build_parser",
    "cmd_analyze",
    "cmd_ask",
    "cmd_bench",
    "cmd_compress",
    "cmd_config",
    "cmd_demo",
    "cmd_eval",
    "cmd_report",
    "cmd_tune",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``xkv`` argument parser with one sub-command per job.

    Each command runs the ``cmd_*`` function this module holds when the parser is built (so replacing
    ``xkv.cli.cmd_demo`` replaces what ``xkv demo`` runs).
    """
    parser = argparse.ArgumentParser(
        prog="xkv", description="Cross-layer SVD KV-cache compression (xKV) for Hugging Face transformers."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser, run in (
        (add_demo_parser, cmd_demo),
        (add_eval_parser, cmd_eval),
        (add_report_parser, cmd_report),
        (add_compress_parser, cmd_compress),
        (add_ask_parser, cmd_ask),
        (add_analyze_parser, cmd_analyze),
        (add_tune_parser, cmd_tune),
        (add_bench_parser, cmd_bench),
        (add_config_parser, cmd_config),
    ):
        add_parser(commands).set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xkv`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "xkv " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except (ValueError, OSError, NotImplementedError) as err:  # bad arguments or files, the hub's answer
        print(f"xkv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xkv {args.command}: interrupted", file=sys.stderr)
        return 130
