"""``vlablocks convert lerobot SOURCE OUT``: its options (registered by :mod:`vlablocks.cli`,
which answers errors with one line) and the call (kept here, as ``serve``'s, so that ``cli.py``
stays readable in one sitting)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlablocks.convert.lerobot import convert_lerobot


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert_lerobot(args.source_dir, args.out, tokenizer=args.tokenizer, overrides=args.overrides,
                          revision=args.revision)
    sys.stdout.write(f"converted to {out}; load it with vlablocks.from_pretrained({str(out)!r}), "
                     f"fine-tune it with vlablocks train {out} --data ...\n")
    return 0


def add_convert_command(sub: Any) -> None:
    """``convert lerobot``, on the ``vlablocks`` subparsers ``sub``."""
    convert = sub.add_parser("convert", help="convert another toolkit's policy into a vlablocks checkpoint")
    convert_sub = convert.add_subparsers(dest="source", required=True)
    lerobot = convert_sub.add_parser("lerobot", help="a LeRobot pi0 / pi0.5 / SmolVLA policy directory or Hub id")
    lerobot.add_argument("source_dir", metavar="SOURCE", help="a LeRobot policy directory or a Hub model id")
    lerobot.add_argument("out", help="a new (or empty) output directory")
    lerobot.add_argument("overrides", nargs="*", help="key.path=value recipe overrides (e.g. sizes the files do not carry)")
    lerobot.add_argument("--tokenizer", default=None,
                         help="a local tokenizer directory or Hub id (default: the one the policy's processors name)")
    lerobot.add_argument("--revision", default=None, help="Hub revision of SOURCE")
    lerobot.set_defaults(fn=cmd_convert)
